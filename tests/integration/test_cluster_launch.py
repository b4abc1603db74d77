"""`paraplan launch` as on a real cluster, on this machine: two nodes rendezvousing on 127.0.0.1, the SLURM script
run on an allocation faked by hand, a rank killed mid-run (torchrun restarts the job, which resumes from the last
checkpoint), the whole job killed and resumed, and a resume with another plan.

Every run trains llama-tiny with dp = 2 (one process per node on the two-node cluster) on the same data, so each
must reproduce the losses of one uninterrupted single-node run of two processes (the reference).
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_plan

from paraplan.backends.launch import read_metrics

pytestmark = pytest.mark.integration

STEPS = 6
REFERENCE_STEPS = 8  # the resume with another plan continues to step 8
CHECKPOINT_EVERY = 2
WARMUP = 4  # steps of linear learning-rate warmup: a resume at step 2 or 4 needs the scheduler's state
RUN_TIMEOUT_S = 300.0
# Data-parallel ranks on one node or two exchange the same gradients in the same order: losses agree to rounding.
REL = 1e-5
# Two agents of one process each on 2 cores: one thread per process, so the "nodes" do not fight for the cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TWO_NODES = "name: cpu-2x1\ndevice: cpu\nnodes: 2\ndevices_per_node: 1\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(plan: Path, run_dir: Path, *extra: str, steps: int = STEPS) -> list[str]:
    return [sys.executable, "-m", "paraplan", "launch", str(plan), "--steps", str(steps), "--run-dir", str(run_dir),
            *extra]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def _wait_all(procs: list[subprocess.Popen]) -> None:
    """Wait for every process (each started in a session of its own); one that fails stops the others."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.returncode not in (None, 0)]
            assert not failed and time.monotonic() < deadline, [p.stdout.read() for p in failed]
            time.sleep(0.5)
        for p in procs:
            assert p.returncode == 0, p.stdout.read()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_metrics(run_dir)]


def _plan(**kwargs) -> str:
    """A plan with a learning-rate warmup, so a resume must also restore the scheduler's position."""
    plan = make_plan(**kwargs)
    return plan.model_copy(update={"train": plan.train.model_copy(update={"warmup_steps": WARMUP})}).model_dump_json()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cluster")
    (path / "plan.json").write_text(_plan(dp=2))
    (path / "two_nodes.yaml").write_text(TWO_NODES)
    (path / "plan2n.json").write_text(_plan(cluster=str(path / "two_nodes.yaml"), dp=2))
    return path


@pytest.fixture(scope="module")
def reference(work) -> list[float]:
    """Losses of an uninterrupted single-node run of two processes."""
    result = _run(_launch(work / "plan.json", work / "reference", steps=REFERENCE_STEPS), work)
    assert result.returncode == 0, result.stdout + result.stderr
    losses = _losses(work / "reference")
    assert len(losses) == REFERENCE_STEPS
    return losses


def test_two_nodes_rendezvous_on_localhost_and_train_like_one(work, reference):
    run_dir = work / "two_nodes"
    endpoint = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(_launch(work / "plan2n.json", run_dir, "--node-rank", str(k), "--rdzv-endpoint", endpoint),
                         cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
        for k in (0, 1)
    ]
    _wait_all(procs)
    assert _losses(run_dir) == pytest.approx(reference[:STEPS], rel=REL)
    for k in (0, 1):
        assert (run_dir / f"train.node{k}.log").read_text(), f"node {k}'s log"
    # torchrun's per-rank logs: one rendezvous directory per agent, each with its rank's stdout.
    assert len(list((run_dir / "logs").glob("*/attempt_0/0/stdout.log"))) == 2


def test_slurm_script_runs_on_an_allocation_faked_by_hand(work, reference, tmp_path):
    run_dir = work / "slurm"
    result = _run(_launch(work / "plan2n.json", run_dir, "--slurm"), work)
    assert result.returncode == 0, result.stderr
    script = run_dir / "launch.sbatch"
    assert f"sbatch {script}" in result.stdout
    assert not (run_dir / "metrics.jsonl").exists(), "--slurm starts nothing"
    directives = dict(line.removeprefix("#SBATCH --").split("=", 1) for line in script.read_text().splitlines()
                      if line.startswith("#SBATCH --") and "=" in line)
    assert directives["nodes"] == "2" and directives["ntasks-per-node"] == "1"
    assert "gpus-per-node" not in directives  # a CPU cluster
    # srun and scontrol as SLURM would run them on each node of the allocation: srun runs its command with its
    # output in the --output file (%n: the node's index), scontrol lists the allocation's hosts.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(
        '#!/bin/bash\nout=/dev/null\nwhile [[ "$1" == --* ]]; do\n  case "$1" in --output=*) out="${1#--output=}";;'
        ' esac\n  shift\ndone\nexec "$@" > "${out//%n/$SLURM_NODEID}" 2>&1\n'
    )
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "$3"\n')  # scontrol show hostnames LIST
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    port = _free_port()
    procs = []
    for node in (0, 1):
        env = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "SLURM_NNODES": "2", "SLURM_NODEID": str(node),
               "SLURM_JOB_ID": f"fake{port}", "SLURM_JOB_NODELIST": "127.0.0.1", "PARAPLAN_RDZV_PORT": str(port)}
        procs.append(subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    _wait_all(procs)
    assert _losses(run_dir) == pytest.approx(reference[:STEPS], rel=REL)
    assert (run_dir / "train.node0.log").read_text() and (run_dir / "train.node1.log").read_text()
    # The script checks the allocation against the plan before it starts anything.
    env = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "SLURM_NNODES": "3", "SLURM_JOB_ID": "x",
           "SLURM_JOB_NODELIST": "127.0.0.1"}
    wrong = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1 and "this plan needs 2 nodes; the allocation has 3" in wrong.stderr


def test_deepspeeds_own_launcher_runs_the_printed_command(work, reference):
    run_dir = work / "deepspeed_launcher"
    result = _run(_launch(work / "plan.json", run_dir, "--backend", "deepspeed", "--dry-run", steps=2), work)
    assert result.returncode == 0, result.stderr
    readme = (run_dir / "README.txt").read_text()
    command = shlex.split(next(line for line in readme.splitlines() if "deepspeed --hostfile" in line)
                          .split(":  ", 1)[1])
    port = _free_port()
    command = [a if not a.startswith("--master_port=") else f"--master_port={port}" for a in command]
    bin_dir = Path(sys.executable).parent  # the deepspeed console script of this environment
    env = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}"}
    ran = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert _losses(run_dir) == pytest.approx(reference[:2], rel=REL)


# ---------------------------------------------------------------------------------------------------------------
# Failures: a rank killed mid-run, the whole job killed, a resume with another plan.
# ---------------------------------------------------------------------------------------------------------------


def _job_pids(run_dir: Path) -> dict[str, list[int]]:
    """Live processes of the job in ``run_dir`` (their command line names it): ``{"agent": [...], "0": [...], ...}``
    with the ranks keyed by their RANK."""
    found: dict[str, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(run_dir) not in cmdline or " launch " in cmdline:
                continue
            environ = dict(item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item)
        except OSError:
            continue
        key = "agent" if "torch.distributed.run" in cmdline else environ.get(b"RANK", b"?").decode()
        found.setdefault(key, []).append(int(entry.name))
    return found


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not any(row["step"] >= step for row in read_metrics(run_dir)):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"step {step} not reached"
        time.sleep(0.2)


def _rows(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_killed_rank_restarts_the_job_from_the_last_checkpoint(work, reference):
    run_dir = work / "killed_rank"
    launcher = subprocess.Popen(
        _launch(work / "plan.json", run_dir, "--checkpoint-every", str(CHECKPOINT_EVERY), "--max-restarts", "1"),
        cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_step(run_dir, CHECKPOINT_EVERY, launcher)  # the step-2 checkpoint is complete before step 2 runs
        os.kill(_job_pids(run_dir)["1"][0], signal.SIGKILL)
        _wait_all([launcher])
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    assert _losses(run_dir) == pytest.approx(reference[:STEPS], rel=REL)
    rows = _rows(run_dir)
    restarted = [row["step"] for row in rows if row["restart"] == 1]
    # The restart resumed from the last complete checkpoint: it re-ran only the steps after it.
    last_checkpoint = max(s for s in range(0, STEPS + 1, CHECKPOINT_EVERY) if s <= min(restarted))
    assert restarted == list(range(last_checkpoint, STEPS)) and last_checkpoint >= CHECKPOINT_EVERY
    assert "attempt_1" in {p.name for p in (run_dir / "logs").glob("*/attempt_*")}


@pytest.fixture(scope="module")
def killed_and_resumed(work) -> Path:
    """A run whose whole job was killed (SIGKILL, no chance to clean up) after step 2, then resumed."""
    run_dir = work / "killed_job"
    launcher = subprocess.Popen(
        _launch(work / "plan.json", run_dir, "--checkpoint-every", str(CHECKPOINT_EVERY)),
        cwd=work, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for_step(run_dir, CHECKPOINT_EVERY + 1, launcher)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        for pids in _job_pids(run_dir).values():  # torchrun and the ranks run in sessions of their own
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        launcher.wait()
    result = _run([sys.executable, "-m", "paraplan", "launch", "--resume", str(run_dir)], work)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed" in result.stdout
    return run_dir


def test_killed_job_resumes_where_it_stopped(killed_and_resumed, reference):
    assert _losses(killed_and_resumed) == pytest.approx(reference[:STEPS], rel=REL)
    steps = [row["step"] for row in _rows(killed_and_resumed)]
    assert steps[0] == 0 and steps[-1] == STEPS - 1  # appended, never overwritten


def test_resume_with_another_plan_reshards_the_checkpoint(work, killed_and_resumed, reference):
    plan_pp = work / "plan_pp2.json"
    plan_pp.write_text(_plan(pp=2))
    result = _run([sys.executable, "-m", "paraplan", "launch", str(plan_pp), "--resume", str(killed_and_resumed),
                   "--steps", str(REFERENCE_STEPS)], work)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_metrics(killed_and_resumed)
    assert [r["step"] for r in rows] == list(range(REFERENCE_STEPS))
    # pp = 2 sums the micro-batch gradients in another order than dp = 2: equal up to fp32 rounding.
    assert [r["loss"] for r in rows[STEPS:]] == pytest.approx(reference[STEPS:], rel=1e-4)
    assert (killed_and_resumed / "plan.previous-1.json").is_file()
