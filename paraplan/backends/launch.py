"""Turn a plan into a run directory and start it with torchrun.

``launch_plan`` writes ``plan.json``, ``launch.json`` and the backend's files (``emit_deepspeed`` ->
``ds_config.json``; ``emit_torch`` -> ``torch_parallel.json``) into the run directory, then runs
``torchrun --standalone --nproc-per-node N -m paraplan.backends.train_<backend> --run-dir DIR`` and reads back
``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from paraplan.backends.data import resolve_data_paths
from paraplan.backends.deepspeed import DS_CONFIG_FILE, emit_deepspeed
from paraplan.backends.torch_native import CONFIG_FILE, emit_torch
from paraplan.backends.train_common import METRICS_FILE
from paraplan.errors import LaunchError
from paraplan.files import write_atomic
from paraplan.types import Backend, LaunchSpec, Plan


def check_world_size(plan: Plan) -> None:
    """Refuse plans this machine cannot run.

    Raises:
        LaunchError: a CUDA plan with fewer local GPUs than devices per node, or a CPU plan whose process count
            differs from the strategy's world size.
    """
    world = plan.strategy.world_size
    cluster = plan.cluster
    if cluster.world_size != world:
        raise LaunchError(
            f"plan strategy uses {world} devices (dp={plan.strategy.dp} x tp={plan.strategy.tp} x "
            f"pp={plan.strategy.pp}) but its cluster {cluster.name} has {cluster.world_size}; re-plan"
        )
    if cluster.nodes > 1:
        raise LaunchError(
            f"plan is for {cluster.nodes} nodes ({cluster.name}); `paraplan launch` starts single-node jobs. "
            "Run the printed command (--dry-run) on every node with --nnodes/--node-rank set"
        )
    if cluster.device.kind == "cuda":
        have = torch.cuda.device_count()
        if have < cluster.devices_per_node:
            raise LaunchError(
                f"plan needs {cluster.devices_per_node} CUDA devices on this node ({cluster.name}); this machine "
                f"has {have}. Plan for this machine (e.g. --cluster cpu:{world} or {max(have, 1)}x<GPU>) or run "
                "the command from --dry-run where the GPUs are"
            )


def build_launch_spec(plan: Plan, backend: Backend, run_dir: Path, steps: int, data: list[str] | None) -> LaunchSpec:
    paths = resolve_data_paths(data)
    module = f"paraplan.backends.train_{backend}"
    # `python -m torch.distributed.run` is torchrun, found without relying on PATH (e.g. a venv not activated).
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.cluster.devices_per_node}",
        "-m", module, "--run-dir", str(run_dir),
    ]
    files = ["plan.json", "launch.json", DS_CONFIG_FILE if backend == "deepspeed" else CONFIG_FILE]
    return LaunchSpec(
        backend=backend, run_dir=str(run_dir), nproc_per_node=plan.cluster.devices_per_node,
        nnodes=plan.cluster.nodes, steps=steps, data_paths=[str(p) for p in paths], command=command, files=files,
    )


def emit_run_dir(plan: Plan, backend: Backend, run_dir: Path, steps: int, data: list[str] | None) -> LaunchSpec:
    """Write every file of the run into ``run_dir`` (created if missing) and return the LaunchSpec."""
    spec = build_launch_spec(plan, backend, run_dir, steps, data)
    emit = emit_deepspeed if backend == "deepspeed" else emit_torch
    emit(plan, run_dir)  # writes through write_atomic, which creates run_dir
    write_atomic(run_dir / "plan.json", plan.model_dump_json(indent=2))
    write_atomic(run_dir / "launch.json", spec.model_dump_json(indent=2))
    return spec


def launch_plan(
    plan: Plan, backend: Backend, run_dir: Path, steps: int = 20, data: list[str] | None = None,
    dry_run: bool = False, quiet: bool = False,
) -> tuple[LaunchSpec, list[dict]]:
    """Write the run directory and (unless ``dry_run``) run the job to completion.

    Returns:
        The LaunchSpec and the metrics rows (one dict per step; empty for a dry run).

    Raises:
        LaunchError: world-size mismatch, or the job exited non-zero (its output tail is in the message).
    """
    if not dry_run:
        check_world_size(plan)
    spec = emit_run_dir(plan, backend, run_dir, steps, data)
    if dry_run:
        return spec, []
    threads = os.environ.get("OMP_NUM_THREADS", str(cpu_threads_per_process(spec.nproc_per_node)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads}
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    log_path = run_dir / "train.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(spec.command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if not quiet and line.startswith("step "):
                sys.stdout.write(line)
                sys.stdout.flush()
        code = proc.wait()
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-30:])
        raise LaunchError(f"training job exited with code {code}; last lines of {log_path}:\n{tail}")
    return spec, read_metrics(run_dir)


def cpu_threads_per_process(nproc: int) -> int:
    """Intra-op threads each of ``nproc`` local training processes gets: the cores split evenly, at least 1."""
    return max(1, (os.cpu_count() or 1) // nproc)


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
