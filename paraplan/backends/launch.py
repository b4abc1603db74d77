"""Turn a plan into a run directory and start it with torchrun, on one node or many.

``launch_plan`` first checks everything that would otherwise fail only inside the training processes (the plan's
own consistency, the backend's support, the data, a factory model's importability, the checkpoint to resume), so a
refused launch writes nothing and starts nothing. It then writes the run directory (``plan.json``, ``launch.json``,
the backend's file: ``emit_deepspeed`` -> ``ds_config.json``, ``emit_torch`` -> ``torch_parallel.json``; the
per-node torchrun commands ``commands.sh``, the SLURM script ``launch.sbatch``, for DeepSpeed a ``hostfile``, and a
``README.txt``: ``jobscripts``), runs this node's torchrun command with its output in ``train.log``
(``train.node<K>.log`` on multi-node runs) and each rank's in ``logs/``, and reads back ``metrics.jsonl``.

One node: ``torchrun --standalone``. Several: every node runs ``paraplan launch PLAN --node-rank K
--rdzv-endpoint HOST:PORT`` (torchrun's c10d rendezvous on node 0's address, the same ``--rdzv-id`` everywhere),
or the SLURM script runs torchrun on each node of the allocation.

While the job runs, SIGINT and SIGTERM to the launcher stop the whole job (torchrun runs in its own session, so a
signal to the launcher alone would otherwise leave it and the ranks running) and ``launch_plan`` raises
:class:`LaunchInterrupted` carrying exit code ``128 + signal`` (130, 143).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from paraplan.backends.checks import check_stage_tiling, paged_layers
from paraplan.backends.data import check_corpus, resolve_data_paths
from paraplan.backends.deepspeed import DS_CONFIG_FILE, build_ds_config, emit_deepspeed, resolve_nvme_path, uses_nvme
from paraplan.backends.jobscripts import (
    COMMANDS_FILE, DEFAULT_RDZV_PORT, HOSTFILE, JOB_ENV, LOGS_DIR, PLACEHOLDER_HOST, README_FILE, SLURM_FILE,
    commands_script, deepspeed_command, deepspeed_hostfile, node_log_name, run_readme, slurm_script, torchrun_command,
)
from paraplan.backends.torch_native import CONFIG_FILE, build_torch_config, emit_torch
from paraplan.backends.train_common import METRICS_FILE
from paraplan.errors import LaunchError, LaunchInterrupted
from paraplan.files import write_atomic
from paraplan.types import Backend, LaunchSpec, ModelSpec, Plan
from paraplan.units import format_bytes

LOG_FILE = "train.log"
# After forwarding SIGINT/SIGTERM, how long torchrun gets to stop its ranks before every process of the job is
# killed. torchrun itself waits up to 30 s for its ranks; ranks stopped by SIGTERM exit at once, a rank blocked in a
# collective after SIGINT may not, and a scheduler's own grace period (SLURM KillWait) is typically 30 s.
SHUTDOWN_GRACE_S = 15.0
FACTORY_IMPORT_TIMEOUT_S = 120.0


def check_world_size(plan: Plan, local_devices: bool = True) -> None:
    """Refuse plans this machine cannot run.

    Args:
        plan: the plan to launch.
        local_devices: also require the CUDA devices on this machine (False for a dry run, whose command may be
            run elsewhere).

    Raises:
        LaunchError: a strategy world size other than the cluster's, or (``local_devices``) a CUDA plan with fewer
            local GPUs than devices per node.
    """
    world = plan.strategy.world_size
    cluster = plan.cluster
    if cluster.world_size != world:
        raise LaunchError(
            f"plan strategy uses {world} devices (dp={plan.strategy.dp} x tp={plan.strategy.tp} x "
            f"pp={plan.strategy.pp} x cp={plan.strategy.cp}) but its cluster {cluster.name} has "
            f"{cluster.world_size}; re-plan"
        )
    if local_devices and cluster.device.kind == "cuda":
        have = torch.cuda.device_count()
        if have < cluster.devices_per_node:
            raise LaunchError(
                f"plan needs {cluster.devices_per_node} CUDA devices on this node ({cluster.name}); this machine "
                f"has {have}. Plan for this machine (e.g. --cluster cpu:{world} or {max(have, 1)}x<GPU>) or run "
                "the command from --dry-run where the GPUs are"
            )


def check_plan(plan: Plan, backend: Backend, local_devices: bool = True, nvme_path: Path | None = None) -> None:
    """Everything about the plan itself that the training processes would otherwise fail on.

    Args:
        nvme_path: the deepspeed backend's NVMe directory (``--nvme-path``); None: the cluster's ``nvme_path``.

    Raises:
        LaunchError: see :func:`check_world_size`, ``checks.check_stage_tiling`` and the
            backend's own checks (``check_deepspeed_plan``, ``torch_native.check_supported``), including states on
            NVMe with no directory.
        TrainSpecError: a sequence length above the model's ``max_seq_len`` (``ModelSpec.check_seq_len``).
    """
    # The batch (dp x micro-batch x accumulation = global batch) is checked when the Plan is read.
    check_world_size(plan, local_devices=local_devices)
    check_stage_tiling(plan)
    plan.model.check_seq_len(plan.train.seq_len)
    # Built and dropped: what the backend refuses is refused before any file is written.
    if backend == "deepspeed":
        build_ds_config(plan, nvme_path)
    else:
        build_torch_config(plan)


def check_nvme_dir(plan: Plan, nvme_path: Path | None, run_dir: Path) -> None:
    """Refuse an NVMe directory the job could not swap into, before any process starts.

    The directory is ``nvme_path`` (else the cluster's ``nvme_path``) when the plan puts states on NVMe or pages
    activations to disk; activations paged to disk without one go under the run directory (checked at its nearest
    existing parent, as the run directory may not exist yet). The space needed is the plan's
    ``predicted.nvme_bytes`` (per device) times the processes on this node.

    Raises:
        LaunchError: the directory does not exist, is not a directory, is not writable, or its file system has less
            free space than needed.
    """
    paged_to_disk = plan.strategy.activation_tier == "nvme" and bool(paged_layers(plan))
    if not uses_nvme(plan) and not paged_to_disk:
        return
    directory = resolve_nvme_path(plan, nvme_path)
    what = "--nvme-path" if nvme_path is not None else f"nvme_path of cluster {plan.cluster.name}"
    if directory is None:  # only activations, under the run directory
        directory, what = Path(run_dir).absolute(), "run directory"
        while not directory.exists():
            directory = directory.parent
    elif not directory.exists():
        raise LaunchError(f"{what} {directory} does not exist; create it (a directory on a local NVMe drive) or "
                          "give another with --nvme-path")
    if not directory.is_dir():
        raise LaunchError(f"{what} {directory} is not a directory; give a directory with --nvme-path")
    if not _writable(directory):
        raise LaunchError(f"{what} {directory} is not writable by this user; give a writable directory with "
                          "--nvme-path")
    nproc = plan.cluster.devices_per_node
    needed = plan.predicted.nvme_bytes * nproc
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise LaunchError(
            f"{what} {directory} has {format_bytes(free)} free; the plan writes {format_bytes(needed)} there "
            f"({format_bytes(plan.predicted.nvme_bytes)} per process x {nproc} processes on this node). Free space, "
            "give a larger drive with --nvme-path, or re-plan with less offloaded to NVMe"
        )


def _writable(directory: Path) -> bool:
    """Whether a file can be created in ``directory`` (tried, not just permission bits: root, read-only mounts)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".paraplan-probe-"):
            return True
    except OSError:
        return False


def check_factory_importable(spec: ModelSpec, env: dict[str, str]) -> None:
    """Import a factory model's module in a fresh interpreter, as the training processes will.

    The ranks run ``sys.executable -m ...`` with ``env`` in the current directory, so that is what is checked: the
    launcher's own ``sys.path`` (an installed console script, an in-process test) can differ from theirs.

    Raises:
        LaunchError: the module does not import or lacks the function; the message has the import error.
    """
    if spec.factory is None:
        return
    module, _, func = spec.factory.partition(":")
    code = "import importlib, sys; getattr(importlib.import_module(sys.argv[1]), sys.argv[2])"
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, module, func], env=env, capture_output=True, text=True,
            timeout=FACTORY_IMPORT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise LaunchError(
            f"importing factory module '{module}' took over {FACTORY_IMPORT_TIMEOUT_S:.0f} s; the training "
            "processes would hang the same way"
        ) from None
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if _ERROR_LINE.match(line)]
        why = (errors or lines or [f"exit code {result.returncode}"])[-1]
        raise LaunchError(
            f"the training processes cannot import factory '{spec.factory}' ({sys.executable} in {Path.cwd()}): "
            f"{why}. Put the directory holding '{module.split('.')[0]}' on PYTHONPATH (export "
            "PYTHONPATH=/that/dir) or install it, then launch again"
        )


def check_rendezvous(plan: Plan, node_rank: int, rdzv_endpoint: str | None, dry_run: bool) -> None:
    """Refuse a node rank or rendezvous the job could not start with.

    Raises:
        LaunchError: a node rank outside ``0..nodes-1``; a multi-node plan launched for real without
            ``--rdzv-endpoint`` (the message gives every node's command); an endpoint that is not ``HOST:PORT``.
    """
    nodes = plan.cluster.nodes
    if not 0 <= node_rank < nodes:
        raise LaunchError(f"--node-rank {node_rank}: the plan has {nodes} node{'s' if nodes > 1 else ''} "
                          f"({plan.cluster.name}); use 0..{nodes - 1}")
    if rdzv_endpoint is not None:
        host, _, port = rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise LaunchError(f"--rdzv-endpoint {rdzv_endpoint}: give HOST:PORT (node 0's address and a free port, "
                              f"e.g. node0:{DEFAULT_RDZV_PORT})")
    elif nodes > 1 and not dry_run:
        raise LaunchError(
            f"plan is for {nodes} nodes ({plan.cluster.name}): run `paraplan launch PLAN --node-rank K "
            f"--rdzv-endpoint NODE0_HOST:{DEFAULT_RDZV_PORT}` on every node K = 0..{nodes - 1} (the same "
            "--run-dir on a shared file system), or `--slurm` for a SLURM batch script, or `--dry-run` to print "
            "each node's command"
        )


def build_launch_spec(
    plan: Plan, backend: Backend, run_dir: Path, steps: int, data: list[str] | None, *, node_rank: int = 0,
    rdzv_endpoint: str | None = None, rdzv_id: str | None = None, checkpoint_every: int = 0, max_restarts: int = 0,
    phase_times: bool = False,
) -> LaunchSpec:
    """The LaunchSpec of this node: its torchrun command (``--standalone`` without a rendezvous endpoint).

    Data paths are made absolute, so every node (and a SLURM job started elsewhere) reads the same files.
    """
    paths = resolve_data_paths(data)
    nodes = plan.cluster.nodes
    if nodes > 1 and rdzv_endpoint is None:  # a dry run or a SLURM script: a placeholder the user replaces
        rdzv_endpoint = f"{PLACEHOLDER_HOST}:{DEFAULT_RDZV_PORT}"
    if rdzv_endpoint is not None and rdzv_id is None:
        rdzv_id = f"paraplan-{Path(run_dir).absolute().name}"
    command = torchrun_command(
        backend, run_dir, nodes, plan.cluster.devices_per_node, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id,
        max_restarts=max_restarts, log_dir=Path(run_dir) / LOGS_DIR,
    )
    files = ["plan.json", "launch.json", DS_CONFIG_FILE if backend == "deepspeed" else CONFIG_FILE, COMMANDS_FILE,
             SLURM_FILE, README_FILE]
    if backend == "deepspeed":
        files.append(HOSTFILE)
    return LaunchSpec(
        backend=backend, run_dir=str(run_dir), nproc_per_node=plan.cluster.devices_per_node, nnodes=nodes,
        steps=steps, data_paths=[str(p.absolute()) for p in paths], command=command, files=files,
        node_rank=node_rank, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id, checkpoint_every=checkpoint_every,
        max_restarts=max_restarts, phase_times=phase_times,
    )


def _write_run_dir(plan: Plan, spec: LaunchSpec, nvme_path: Path | None = None, hosts: list[str] | None = None) -> None:
    run_dir = Path(spec.run_dir)
    # Both write through write_atomic, which creates run_dir.
    if spec.backend == "deepspeed":
        emit_deepspeed(plan, run_dir, nvme_path)
    else:
        emit_torch(plan, run_dir)
    write_atomic(run_dir / "plan.json", plan.model_dump_json(indent=2))
    write_atomic(run_dir / "launch.json", spec.model_dump_json(indent=2))
    write_atomic(run_dir / COMMANDS_FILE, commands_script(spec, Path.cwd()))
    write_atomic(run_dir / SLURM_FILE, slurm_script(plan, spec.backend, run_dir, spec.max_restarts, Path.cwd()))
    ds_launch = None
    if spec.backend == "deepspeed":
        master = (spec.rdzv_endpoint or "localhost:0").rpartition(":")[0]
        if hosts is None:
            hosts = [master if spec.nnodes > 1 else "localhost", *(f"node{k}" for k in range(1, spec.nnodes))]
        write_atomic(run_dir / HOSTFILE, deepspeed_hostfile(hosts, spec.nproc_per_node))
        ds_launch = deepspeed_command(run_dir, hosts[0], spec.nnodes)
    write_atomic(run_dir / README_FILE, run_readme(plan, spec, ds_launch))


def job_env(nproc_per_node: int) -> dict[str, str]:
    """The environment torchrun and the ranks run with (the launcher's, plus unbuffered output, a TCP store of
    the workers' own for restarts on gloo, and threads)."""
    threads = os.environ.get("OMP_NUM_THREADS", str(cpu_threads_per_process(nproc_per_node)))
    env = {**os.environ, **JOB_ENV, "OMP_NUM_THREADS": threads}
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    return env


def launch_plan(
    plan: Plan, backend: Backend, run_dir: Path, steps: int = 20, data: list[str] | None = None,
    dry_run: bool = False, quiet: bool = False, nvme_path: Path | None = None, *, node_rank: int = 0,
    rdzv_endpoint: str | None = None, rdzv_id: str | None = None, hosts: list[str] | None = None,
    checkpoint_every: int = 0, max_restarts: int = 0, resume: bool = False,
    before_write: Callable[[], None] | None = None, phase_times: bool = False,
) -> tuple[LaunchSpec, list[dict]]:
    """Check the plan, write the run directory and (unless ``dry_run``) run this node's part of the job to
    completion.

    Every check runs before the first file is written, for a dry run too (except what concerns this machine, the
    local CUDA device count and the NVMe directory: a dry run prints the commands for other machines).

    Args:
        nvme_path: directory for the states the plan puts on NVMe (deepspeed backend); None: the cluster file's
            ``nvme_path``. Required when the plan puts optimizer states or parameters on NVMe.
        node_rank: this node (0..nodes-1).
        rdzv_endpoint: ``HOST:PORT`` of the c10d rendezvous on node 0; required to run a multi-node plan.
        rdzv_id: the job's rendezvous id (default ``paraplan-<run directory name>``), the same on every node.
        hosts: the nodes' host names for DeepSpeed's hostfile (default: the endpoint's host, then node1...).
        checkpoint_every: save a checkpoint every this many steps and after the last (0: never).
        max_restarts: torchrun ``--max-restarts``; each restart resumes from the last complete checkpoint.
        resume: ``run_dir`` holds an earlier run to continue: its latest complete checkpoint is checked first, the
            log is appended to.
        before_write: called after every check, before the first file is written (``launch --resume`` keeps
            the run's earlier plan there).
        phase_times: profile one step and record its per-phase times in metrics.jsonl
            (``paraplan.backends.phases``; what ``paraplan calibrate`` fits).

    Returns:
        The LaunchSpec and the metrics rows (one dict per step, the last row of a step that ran more than once;
        empty for a dry run or a node whose run directory rank 0 does not write).

    Raises:
        LaunchError: a plan, data, factory model, rendezvous, checkpoint or NVMe directory the job would fail on
            (see :func:`check_plan`, :func:`check_rendezvous`, ``data.check_corpus``,
            :func:`check_factory_importable`, :func:`check_nvme_dir`, ``checkpoint.check_checkpointing`` and
            ``checkpoint.check_resumable``), or the job exited non-zero (the failing rank's error line and the
            log's path are in the message).
        LaunchInterrupted: SIGINT or SIGTERM stopped the job; ``exit_code`` is 130 or 143.
        TrainSpecError: a sequence length above the model's positions.
    """
    check_plan(plan, backend, local_devices=not dry_run, nvme_path=nvme_path)
    check_rendezvous(plan, node_rank, rdzv_endpoint, dry_run)
    if checkpoint_every or max_restarts or resume:
        from paraplan.backends.checkpoint import check_checkpointing, check_resumable

        check_checkpointing(plan, backend)
        if resume:
            check_resumable(run_dir, plan, backend)
    if backend == "deepspeed" and not dry_run:
        check_nvme_dir(plan, nvme_path, run_dir)
    spec = build_launch_spec(plan, backend, run_dir, steps, data, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                             rdzv_id=rdzv_id, checkpoint_every=checkpoint_every, max_restarts=max_restarts,
                             phase_times=phase_times)
    check_corpus([Path(p) for p in spec.data_paths], plan.train.seq_len)
    env = job_env(spec.nproc_per_node)
    check_factory_importable(plan.model, env)
    if before_write is not None:
        before_write()
    _write_run_dir(plan, spec, nvme_path, hosts)
    if dry_run:
        return spec, []
    log_path = run_dir / node_log_name(spec.nnodes, node_rank)
    stopper = JobStopper()
    code = run_job(spec.command, env, log_path, stopper, quiet, append=resume)
    if stopper.signum is not None:
        name = signal.Signals(stopper.signum).name
        raise LaunchInterrupted(
            f"{name} received: stopped the training job; steps done are in {run_dir / METRICS_FILE}, its output "
            f"in {log_path}", exit_code=128 + stopper.signum,
        )
    if code != 0:
        raise LaunchError(job_failure_message(code, log_path))
    return spec, read_metrics(run_dir)


def run_job(command: list[str], env: dict[str, str], log_path: Path, stopper: JobStopper, quiet: bool,
            append: bool = False) -> int:
    """Run ``command`` in its own session, its output into ``log_path`` (appended to with ``append``) and ``step``
    lines to stdout.

    Returns:
        torchrun's exit code (negative: killed by that signal).
    """
    # line-buffered: the log keeps up with the job
    with stopper, log_path.open("a" if append else "w", buffering=1) as log:
        # A session of its own: a terminal's Ctrl-C or a scheduler's signal reaches the job only through the
        # stopper, which stops every process of it (torchrun starts each rank in a session of its own too).
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        stopper.attach(proc)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            text = _TEE_PREFIX.sub("", line, count=1)  # torchrun --tee's "[default<local rank>]:"
            if not quiet and (text.startswith("step ") or text.startswith("resumed ")):
                sys.stdout.write(text)
                sys.stdout.flush()
        return proc.wait()


class JobStopper:
    """While a job runs, SIGINT and SIGTERM stop the job instead of (only) the launcher.

    The first signal is forwarded to torchrun's process group (torchrun then sends it to each rank's group and
    waits for them); after :data:`SHUTDOWN_GRACE_S` every process group of the job is killed. A second signal kills
    them at once. Handlers are installed only in the main thread (Python allows no other) and restored on exit.
    """

    def __init__(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        self.grace_s = grace_s
        self.signum: int | None = None
        self.proc: subprocess.Popen | None = None
        self._groups: set[int] = set()
        self._timer: threading.Timer | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> JobStopper:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.signum is not None:
            self.kill()  # nothing of the job outlives the launcher, even a rank torchrun lost track of
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def attach(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        if self.signum is not None:  # a signal arrived while the job was starting
            self._stop(self.signum)

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum is not None:
            self.kill()
            return
        self.signum = signum
        if self.proc is not None:
            self._stop(signum)

    def _stop(self, signum: int) -> None:
        assert self.proc is not None
        self._groups.update(self._job_groups())
        _signal_group(self.proc.pid, signum)
        self._timer = threading.Timer(self.grace_s, self.kill)
        self._timer.daemon = True
        self._timer.start()

    def _job_groups(self) -> set[int]:
        """Process groups of torchrun and of every process below it (each rank leads a session of its own)."""
        assert self.proc is not None
        return {self.proc.pid, *_descendants(self.proc.pid)}

    def kill(self) -> None:
        """SIGKILL every process group of the job seen so far."""
        if self.proc is None:
            return
        if self.proc.poll() is None:  # once torchrun is reaped its pid may be reused: use what was seen before
            self._groups.update(self._job_groups())
        for group in list(self._groups):  # the grace timer's thread may call this too
            _signal_group(group, signal.SIGKILL)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass  # already gone (or a pid that no longer leads a group of ours)


def _descendants(pid: int) -> set[int]:
    """Pids of all processes below ``pid``, read from ``/proc`` (empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            stat = entry.read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ")".
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


# Once a rank's process group is up, torch prefixes its uncaught traceback lines with "[rank3]:"; an error before
# that (an import, a check before init) comes unprefixed, like torchrun's own output.
_RANK_PREFIX = re.compile(r"^\[(?:rank|default)(\d+)\]:\s?")
# torchrun --tee prefixes each line of local rank N with "[defaultN]:", before torch's own "[rankN]:".
_TEE_PREFIX = re.compile(r"^\[default\d+\]:")
# A Python exception line as a traceback ends: "ValueError: ...", "paraplan.errors.LaunchError: ...".
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*\w*(?:Error|Exception)\b.*:")
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
_TORCHRUN_ERRORS = "torch.distributed.elastic."  # ChildFailedError, SignalException: torchrun's, not a rank's
_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):\n\[\d+\]:\n(?:.*\n){0,3}?\s*rank\s*:\s*(\d+)")
_NOT_CONTINUATION = re.compile(r"^(Traceback|[WEIF]\d{4} |\s*$)")


def _final_error(lines: list[str]) -> str | None:
    """The first exception line that ends a traceback (not one a later exception was chained to), with the lines
    continuing its message."""
    for i, line in enumerate(lines):
        if not _ERROR_LINE.match(line) or line.startswith(_TORCHRUN_ERRORS):
            continue
        following = next((x for x in lines[i + 1:] if x.strip()), "")
        if following.startswith(_CHAINED):
            continue
        more = []
        for x in lines[i + 1: i + 6]:
            if _NOT_CONTINUATION.match(x):
                break
            more.append(x)
        return "\n".join([line, *more])
    return None


def worker_error(log_text: str) -> tuple[int | None, str] | None:
    """The error of the first rank that failed, from a torchrun log.

    The first rank to print an exception is taken as the first to fail (the others typically fail after it, on a
    closed connection); its error is the exception that ends its traceback (earlier ones are chained causes).
    Unprefixed tracebacks (a rank failing before its process group is up) are attributed to the rank torchrun names
    as the root cause, when it names one.

    Args:
        log_text: the job's combined output (``train.log``).

    Returns:
        ``(rank or None, error)`` with the rank prefix stripped (the error may continue on following lines), or
        None when no rank printed an exception.
    """
    by_rank: dict[int, list[str]] = {}
    plain: list[str] = []
    first_rank: int | None = None
    for raw in log_text.splitlines():
        tee = _TEE_PREFIX.match(raw)
        if tee is not None and _RANK_PREFIX.match(raw, tee.end()):
            raw = raw[tee.end():]  # torch's own [rankN]: (the global rank) follows torchrun's [defaultN]:
        m = _RANK_PREFIX.match(raw)
        if m is None:
            plain.append(raw)
            continue
        rank, text = int(m.group(1)), raw[m.end():]
        by_rank.setdefault(rank, []).append(text)
        if first_rank is None and _ERROR_LINE.match(text):
            first_rank = rank
    if first_rank is not None:
        error = _final_error(by_rank[first_rank])
        if error is not None:
            return first_rank, error
    error = _final_error(plain)
    if error is None:
        return None
    root = _ROOT_CAUSE.search(log_text)
    return (int(root.group(1)) if root else None), error


def job_failure_message(code: int, log_path: Path) -> str:
    """What to tell the user about a job that exited with ``code``: the failing rank's own error when the log
    has one (not torchrun's ChildFailedError summary), else the log's last lines; always the log's path."""
    text = log_path.read_text(errors="replace") if log_path.exists() else ""
    found = worker_error(text)
    if found is not None:
        rank, error = found
        where = f" on rank {rank}" if rank is not None else ""
        return f"training job failed{where}: {error}\n(full output: {log_path})"
    tail = "".join(text.splitlines(keepends=True)[-30:])
    return f"training job exited with code {code}; last lines of {log_path}:\n{tail}"


def cpu_threads_per_process(nproc: int) -> int:
    """Intra-op threads each of ``nproc`` local training processes gets: the cores split evenly, at least 1."""
    return max(1, (os.cpu_count() or 1) // nproc)


def read_metrics(run_dir: Path) -> list[dict]:
    """The step rows of ``metrics.jsonl`` in step order, one per step: the last written when a step ran more than
    once (a restart or resume re-runs the steps after the last checkpoint; the file keeps every row)."""
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            if "step" in row and "loss" in row:
                rows[row["step"]] = row
    return [rows[k] for k in sorted(rows)]
