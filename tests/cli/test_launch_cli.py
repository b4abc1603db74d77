"""`paraplan launch`: the run directory's files and the printed command (--dry-run), for each backend; what the
training processes would fail on, refused before anything is written or started; a failed rank's own error."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, make_plan
from typer.testing import CliRunner

from paraplan.backends import launch
from paraplan.backends.data import ByteDataset, corpus_bytes
from paraplan.backends.launch import worker_error
from paraplan.cli.app import app
from paraplan.types import Plan

runner = CliRunner()


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    result = runner.invoke(app, ["plan", "llama-tiny", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "64",
                                 "--strategy", "dp=2", "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


@pytest.mark.parametrize("backend,config", [("deepspeed", "ds_config.json"), ("torch", "torch_parallel.json")])
def test_dry_run_writes_files_and_prints_torchrun(tmp_path, plan_file, backend, config):
    run_dir = tmp_path / backend
    result = runner.invoke(app, ["launch", str(plan_file), "--backend", backend, "--dry-run", "--steps", "3",
                                 "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "torch.distributed.run" in result.output and "--nproc-per-node=2" in result.output
    assert f"paraplan.backends.train_{backend}" in result.output
    for name in ("plan.json", "launch.json", config):
        assert (run_dir / name).is_file(), name
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["steps"] == 3 and launch["nproc_per_node"] == 2
    assert launch["data_paths"], "default data: the standard library's sources"
    assert not (run_dir / "metrics.jsonl").exists()


def test_unknown_backend(tmp_path, plan_file):
    result = runner.invoke(app, ["launch", str(plan_file), "--backend", "megatron", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1 and "use deepspeed or torch" in result.output


def test_missing_data_path(tmp_path, plan_file):
    result = runner.invoke(app, ["launch", str(plan_file), "--dry-run", "--data", str(tmp_path / "nope"),
                                 "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 1 and "no such file or directory" in result.output


# ---------------------------------------------------------------------------------------------------------------
# What would fail only inside the training processes is refused before any file is written or process started,
# for a dry run as for a launch.
# ---------------------------------------------------------------------------------------------------------------

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def started(monkeypatch) -> list:
    """The jobs `launch_plan` starts; none does (a refusal that came too late fails the test, not a real job)."""
    jobs: list = []

    def fake_run_job(command, *args, **kwargs):
        jobs.append(command)
        return 0

    monkeypatch.setattr(launch, "run_job", fake_run_job)
    return jobs


def _write(path: Path, plan: Plan, edit=None) -> Path:
    data = json.loads(plan.model_dump_json())
    if edit is not None:
        edit(data)
    path.write_text(json.dumps(data))
    return path


def _launch(plan_path: Path, run_dir: Path, *extra: str, dry_run: bool = True, backend: str = "torch"):
    args = ["launch", str(plan_path), "--backend", backend, "--steps", "2", "--run-dir", str(run_dir), *extra]
    return runner.invoke(app, args + (["--dry-run"] if dry_run else []))


def _assert_refused(result, run_dir: Path, started: list, *fragments: str) -> None:
    assert_user_error(result)
    flat = " ".join(result.output.split())  # rich wraps long messages
    for frag in fragments:
        assert frag in flat, result.output
    assert not run_dir.exists(), "a refused launch writes nothing"
    assert started == []


def _shift_stage_1(data: dict) -> None:
    data["strategy"]["stages"][1]["first_layer"] += 1  # a gap: chain layer 4 belongs to no stage


def _move_boundary(data: dict) -> None:
    # Still tiles the chain, but stage 0 now holds 4 blocks and stage 1 two, while each says (and was priced at) 3.
    data["strategy"]["stages"][0]["last_layer"] += 1
    data["strategy"]["stages"][1]["first_layer"] += 1


def _edit_grad_accum(data: dict) -> None:
    data["strategy"]["grad_accum"] = 1  # global batch 8 = dp 2 x micro-batch 2 x 2, not x 1


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "launch"])
@pytest.mark.parametrize(
    ("plan_kwargs", "edit", "backend", "says"),
    [
        # llama-tiny has 2048 positions (presets.py).
        (dict(dp=2, seq_len=4096), None, "torch", ["seq_len 4096 exceeds llama-tiny's max_seq_len 2048"]),
        (dict(cluster="cpu:4", dp=2), None, "torch", ["uses 2 devices", "cluster cpu:4 has 4"]),
        (dict(pp=2), _shift_stage_1, "torch", ["stage 1 covers chain layers 5..7 but should start at layer 4"]),
        (dict(pp=2), _move_boundary, "deepspeed", ["stage 0 says 3 blocks but its chain layers 0..4 hold 4"]),
        (dict(dp=2), _edit_grad_accum, "torch", ["2 x 2 x 1 = 4 sequences per step", "global_batch is 8"]),
        (dict(dp=2, zero_stage=1, offload_optimizer=True), None, "torch",
         ["the torch backend has no optimizer-only offload", "--backend deepspeed", "re-plan with --backend torch"]),
    ],
    ids=["seq-len", "world-size", "stage-gap", "stage-blocks", "grad-accum", "torch-offload"],
)
def test_plan_the_workers_would_fail_on_is_refused(tmp_path, started, plan_kwargs, edit, backend, says, dry_run):
    plan_path = _write(tmp_path / "plan.json", make_plan(**plan_kwargs), edit)
    run_dir = tmp_path / "run"
    _assert_refused(_launch(plan_path, run_dir, dry_run=dry_run, backend=backend), run_dir, started, *says)


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "launch"])
def test_data_smaller_than_one_sequence_is_refused(tmp_path, started, dry_run):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello")  # 5 bytes; seq_len 64 needs 64 tokens + 1 target + 1 start offset = 66
    run_dir = tmp_path / "run"
    result = _launch(_write(tmp_path / "plan.json", make_plan(dp=2)), run_dir, "--data", str(tiny), dry_run=dry_run)
    _assert_refused(result, run_dir, started, "holds 5 bytes", "needs at least 66")


def test_data_of_exactly_one_sequence_is_accepted(tmp_path, started):
    corpus = tmp_path / "data"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(b"x" * 40)
    (corpus / "b.txt").write_bytes(b"y" * 26)  # 66 bytes over two files: the sizes add up
    result = _launch(_write(tmp_path / "plan.json", make_plan(dp=2)), tmp_path / "run", "--data", str(corpus))
    assert result.exit_code == 0, result.output


def test_corpus_size_is_capped_like_the_dataset(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"y" * 100)
    assert corpus_bytes([a, b], max_bytes=150) == 150 == len(ByteDataset([a, b], seq_len=8, max_bytes=150).data)
    assert corpus_bytes([a, b]) == 200


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "launch"])
def test_factory_the_workers_cannot_import_is_refused(tmp_path, monkeypatch, started, dry_run):
    # The launcher can import it (as when `paraplan` runs where the module lies); the ranks, started with this
    # environment, could not: nothing puts examples/ on their path.
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    plan_path = _write(tmp_path / "plan.json", make_plan(model="custom_factory:build", dp=2))
    run_dir = tmp_path / "run"
    _assert_refused(_launch(plan_path, run_dir, dry_run=dry_run), run_dir, started,
                    "cannot import factory 'custom_factory:build'", "No module named 'custom_factory'", "PYTHONPATH")


def test_factory_on_pythonpath_is_accepted(tmp_path, monkeypatch, started):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))
    plan_path = _write(tmp_path / "plan.json", make_plan(model="custom_factory:build", dp=2))
    result = _launch(plan_path, tmp_path / "run")
    assert result.exit_code == 0, result.output


def test_factory_without_the_function_is_refused(tmp_path, monkeypatch, started):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))

    def rename(data: dict) -> None:
        data["model"]["factory"] = "custom_factory:nope"

    plan_path = _write(tmp_path / "plan.json", make_plan(model="custom_factory:build", dp=2), rename)
    run_dir = tmp_path / "run"
    _assert_refused(_launch(plan_path, run_dir), run_dir, started, "has no attribute 'nope'")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has the 2 GPUs the plan asks for")
def test_dry_run_skips_only_the_local_gpu_check(tmp_path, started):
    plan_path = _write(tmp_path / "plan.json", make_plan(cluster="2xH100-80GB", dp=2, dtype="bf16"))
    # A dry run prints the command for the machine that has the GPUs ...
    assert _launch(plan_path, tmp_path / "dry").exit_code == 0
    # ... a launch here is refused before it starts.
    run_dir = tmp_path / "run"
    _assert_refused(_launch(plan_path, run_dir, dry_run=False), run_dir, started, "needs 2 CUDA devices")


# ---------------------------------------------------------------------------------------------------------------
# Several nodes: every node's command, the SLURM script, DeepSpeed's hostfile; what a node could not start with.
# ---------------------------------------------------------------------------------------------------------------


def _sbatch_directives(script: str) -> dict[str, str]:
    return dict(line.removeprefix("#SBATCH --").split("=", 1) for line in script.splitlines()
                if line.startswith("#SBATCH --") and "=" in line)


def test_multi_node_dry_run_prints_every_nodes_command(tmp_path, started):
    plan_path = _write(tmp_path / "plan.json", make_plan(cluster="4x8xH100-80GB", dp=32, global_batch=64,
                                                         dtype="bf16"))
    run_dir = tmp_path / "run"
    result = _launch(plan_path, run_dir, "--rdzv-endpoint", "10.0.0.1:29400", "--checkpoint-every", "50")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    for k in range(4):
        assert (f"node {k}: paraplan launch {plan_path} --backend torch --steps 2 --run-dir {run_dir} --node-rank {k} "
                "--rdzv-endpoint 10.0.0.1:29400 --rdzv-id paraplan-run --checkpoint-every 50") in flat
    assert "--standalone" not in flat
    assert ("--nnodes=4 --rdzv-backend=c10d --rdzv-endpoint=10.0.0.1:29400 --rdzv-id=paraplan-run "
            "--nproc-per-node=8") in flat
    directives = _sbatch_directives((run_dir / "launch.sbatch").read_text())
    assert directives["nodes"] == "4" and directives["ntasks-per-node"] == "1" and directives["gpus-per-node"] == "8"
    for script in ("launch.sbatch", "commands.sh"):  # both are valid bash
        check = subprocess.run(["bash", "-n", str(run_dir / script)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr
    readme = (run_dir / "README.txt").read_text()
    assert "node 3: paraplan launch" in readme and "sbatch" in readme and "--resume" in readme
    assert started == []


def test_deepspeed_hostfile_and_command_parse_with_deepspeeds_own_launcher(tmp_path, started):
    from deepspeed.launcher.runner import fetch_hostfile, parse_args

    plan_path = _write(tmp_path / "plan.json", make_plan(cluster="2x8xH100-80GB", dp=16, global_batch=32,
                                                         dtype="bf16"))
    run_dir = tmp_path / "run"
    result = _launch(plan_path, run_dir, "--hosts", "gpu-a,gpu-b", backend="deepspeed")
    assert result.exit_code == 0, result.output
    assert fetch_hostfile(str(run_dir / "hostfile")) == {"gpu-a": 8, "gpu-b": 8}
    readme = (run_dir / "README.txt").read_text()
    command = shlex.split(next(line for line in readme.splitlines() if "deepspeed --hostfile" in line)
                          .split(":  ", 1)[1])
    args = parse_args(command[1:])
    assert args.hostfile == str((run_dir / "hostfile").absolute()) and args.master_addr == "gpu-a"
    assert args.module and args.no_local_rank and args.user_script == "paraplan.backends.train_deepspeed"
    assert args.user_args == ["--run-dir", str(run_dir.absolute())]


@pytest.mark.parametrize(("extra", "says"), [
    ((), ["plan is for 2 nodes", "--node-rank K --rdzv-endpoint NODE0_HOST:29500", "--slurm", "--dry-run"]),
    (("--node-rank", "2", "--rdzv-endpoint", "h:1"), ["--node-rank 2", "use 0..1"]),
    (("--rdzv-endpoint", "node0"), ["--rdzv-endpoint node0: give HOST:PORT"]),
    (("--hosts", "a,b,c"), ["--hosts names 3 host(s); the plan has 2 node(s)"]),
], ids=["no-endpoint", "node-rank", "endpoint", "hosts"])
def test_multi_node_launch_refuses_what_a_node_could_not_start_with(tmp_path, started, extra, says):
    cluster = tmp_path / "two_nodes.yaml"  # two nodes of one CPU process: nothing else about it is refused here
    cluster.write_text("name: cpu-2x1\ndevice: cpu\nnodes: 2\ndevices_per_node: 1\n")
    plan_path = _write(tmp_path / "plan.json", make_plan(cluster=str(cluster), dp=2))
    run_dir = tmp_path / "run"
    _assert_refused(_launch(plan_path, run_dir, *extra, dry_run=False), run_dir, started, *says)


def test_resume_of_a_directory_that_holds_no_run_is_refused(tmp_path, started):
    result = runner.invoke(app, ["launch", "--resume", str(tmp_path)])
    assert_user_error(result, "not a run directory of `paraplan launch`")
    assert_user_error(runner.invoke(app, ["launch"]), "give a plan.json")


# ---------------------------------------------------------------------------------------------------------------
# A job that fails inside a rank: the rank's own error, not torchrun's ChildFailedError summary.
# ---------------------------------------------------------------------------------------------------------------

# Excerpts of real train.log files (torch 2.13, 2 ranks). Once a rank's process group is up, torch prefixes its
# traceback lines with [rankN]:; before that (here: DeepSpeed's fp16 check) they come unprefixed. Both end in
# torchrun's own traceback and ChildFailedError summary.
_TORCHRUN_TAIL = """\
E1130 21:22:18.767000 3147 torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 1) local_rank: 0
Traceback (most recent call last):
  File "/venv/lib/python3.11/site-packages/torch/distributed/launcher/api.py", line 383, in launch_agent
    raise ChildFailedError(
torch.distributed.elastic.multiprocessing.errors.ChildFailedError: 
============================================================
paraplan.backends.train_torch FAILED
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_21:22:18
  host      : localhost
  rank      : {root} (local_rank: {root})
  exitcode  : 1 (pid: 3153) 
============================================================
"""
PREFIXED_LOG = """\
[rank1]: Traceback (most recent call last):
[rank1]:   File "/work/main/paraplan/backends/train_torch.py", line 129, in train
[rank1]:     dataset = build_dataset(plan, spec)
[rank1]: KeyError: 'offsets'
[rank1]: 
[rank1]: During handling of the above exception, another exception occurred:
[rank1]: 
[rank1]: Traceback (most recent call last):
[rank1]:   File "/work/main/paraplan/backends/data.py", line 63, in __init__
[rank1]: paraplan.errors.LaunchError: data has 5 bytes; need at least 66
[rank0]: Traceback (most recent call last):
[rank0]:   File "/work/main/paraplan/backends/train_torch.py", line 140, in train
[rank0]: RuntimeError: Connection closed by peer [127.0.0.1]:29500
""" + _TORCHRUN_TAIL.format(root=0)
UNPREFIXED_LOG = """\
Traceback (most recent call last):
  File "/work/main/paraplan/backends/train_deepspeed.py", line 193, in main
    raise LaunchError(
paraplan.errors.LaunchError: DeepSpeed's cpu accelerator has no fp16 support on this machine; re-plan with \
--dtype bf16 or fp32
W1130 21:27:36.506000 6371 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 6381 closing signal
""" + _TORCHRUN_TAIL.format(root=1)


def test_worker_error_is_the_first_failing_ranks_final_exception():
    # rank 1 failed first (rank 0 only lost its peer); its KeyError is a cause chained to the final LaunchError.
    assert worker_error(PREFIXED_LOG) == (1, "paraplan.errors.LaunchError: data has 5 bytes; need at least 66")
    rank, error = worker_error(UNPREFIXED_LOG)
    assert rank == 1 and error.startswith("paraplan.errors.LaunchError: DeepSpeed's cpu accelerator has no fp16")
    assert worker_error(_TORCHRUN_TAIL.format(root=0)) is None  # torchrun's own error is not a rank's


def test_failed_job_reports_the_ranks_error_and_the_log(tmp_path, monkeypatch):
    def failing_job(command, env, log_path, stopper, quiet, append=False):
        log_path.write_text(PREFIXED_LOG)
        return 1

    monkeypatch.setattr(launch, "run_job", failing_job)
    run_dir = tmp_path / "run"
    result = _launch(_write(tmp_path / "plan.json", make_plan(dp=2)), run_dir, dry_run=False)
    assert_user_error(result)
    flat = " ".join(result.output.split())
    assert "failed on rank 1: paraplan.errors.LaunchError: data has 5 bytes; need at least 66" in flat
    assert str(run_dir / "train.log") in flat
    assert "ChildFailedError" not in result.output and "Connection closed" not in result.output


@pytest.mark.integration
@pytest.mark.skipif(torch.ops.mkldnn._is_mkldnn_fp16_supported(), reason="this CPU runs DeepSpeed fp16")
def test_real_rank_failure_shows_the_ranks_error(tmp_path):
    # DeepSpeed's CPU accelerator refuses fp16 inside each rank, before training (about 10 s, no step runs).
    plan_path = _write(tmp_path / "plan.json", make_plan(dp=2, dtype="fp16"))
    run_dir = tmp_path / "run"
    result = _launch(plan_path, run_dir, dry_run=False, backend="deepspeed")
    assert_user_error(result)
    flat = " ".join(result.output.split())
    assert "training job failed on rank" in flat and "no fp16 support on this machine" in flat
    assert str(run_dir / "train.log") in flat and "ChildFailedError" not in result.output
