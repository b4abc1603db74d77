"""Pieces shared by the built-in trainers (``train_deepspeed``, ``train_torch``) that run under torchrun.

A run directory holds ``plan.json`` (the Plan), ``launch.json`` (the LaunchSpec: steps, data paths) and the
backend's own files. Rank 0 appends one JSON line per step to ``metrics.jsonl``:
``{"step", "loss", "step_time_s", "tokens_per_s", "peak_memory_bytes": [per rank]}``.

Also the selective activation checkpointing both trainers apply to the blocks a plan does not recompute in full
(:func:`selective_checkpoint`).
"""

from __future__ import annotations

import json
import os
import resource
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from paraplan.backends.data import ByteDataset
from paraplan.types import LaunchSpec, Plan

METRICS_FILE = "metrics.jsonl"

# Selective recomputation (Korthikanti et al. 2022, sec. 4.3): keep what is expensive to recompute, the outputs of
# the linear projections (every matmul), and recompute the attention core in backward. Every other op (norms,
# rotary embedding, activation function, the attention core, views, collectives) is recomputed too: under
# torch's selective checkpointing an op marked "save" caches its whole output, including outputs autograd itself
# would not keep (the o/down projection sums, pre-rotary q/k), so "save all but attention" kept 50% more than no
# checkpointing at all on llama-tiny (5.2 vs 3.5 MiB per block at b=2, s=64), while saving only the matmul outputs
# keeps 1.7 MiB. The elementwise ops recomputed add no matmul FLOPs. On CPU the attention op is
# aten._scaled_dot_product_flash_attention_for_cpu, which is not in the saved set, so it is recomputed.
_SAVED_MATMULS = frozenset({
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
})


def _matmul_save_policy(ctx, func, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if func in _SAVED_MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpoint(module: torch.nn.Module) -> torch.nn.Module:
    """Wrap ``module`` (one block) in selective activation checkpointing.

    In forward the block saves its input and the output of every matmul (the q/k/v/o and MLP projections); in
    backward it recomputes everything else from them, the attention core included, so neither the attention output
    nor its softmax statistics are kept between forward and backward.

    Args:
        module: a block mapping hidden ``(b, s, h)`` to hidden ``(b, s, h)``.

    Returns:
        The wrapped module (``checkpoint_wrapper``, non-reentrant); its parameters keep their names under
        ``_checkpoint_wrapped_module``.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return checkpoint_wrapper(
        module, checkpoint_impl=CheckpointImpl.NO_REENTRANT,
        context_fn=partial(create_selective_checkpoint_contexts, _matmul_save_policy),
    )


def load_run(run_dir: str | Path) -> tuple[Plan, LaunchSpec]:
    run = Path(run_dir)
    plan = Plan.model_validate_json((run / "plan.json").read_text())
    spec = LaunchSpec.model_validate_json((run / "launch.json").read_text())
    return plan, spec


def build_dataset(plan: Plan, spec: LaunchSpec) -> ByteDataset:
    return ByteDataset([Path(p) for p in spec.data_paths], plan.train.seq_len, seed=plan.train.seed)


def shutdown_distributed(clean: bool) -> None:
    """Destroy the process group. After a clean run every rank first meets at a barrier, so no rank closes its
    gloo connections while another still uses them (seen as a C++ "terminate called without an active exception"
    abort of one rank at exit, after all steps had run)."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def device_for_rank() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is present, else CPU."""
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def dist_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory of this process: CUDA max allocated, or peak resident set size on CPU (ru_maxrss KiB)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class MetricsWriter:
    """Collects per-step metrics from all ranks; rank 0 writes them (``metrics.jsonl``) and prints a line."""

    def __init__(self, run_dir: str | Path, plan: Plan, device: torch.device) -> None:
        self.path = Path(run_dir) / METRICS_FILE
        self.plan = plan
        self.device = device
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.tokens_per_step = plan.train.global_batch * plan.train.seq_len
        if self.rank == 0:
            self.path.write_text("")

    def log(self, step: int, loss: float, step_time_s: float, **extra: float) -> None:
        """Record one step. ``loss`` must already be the global-batch mean (identical on every rank that logs).

        ``extra`` values (for example ``grad_norm``) are appended to the row as rank 0 passes them.
        """
        mem = peak_memory_bytes(self.device)
        mems: list[int] = [mem]
        if dist.is_initialized():
            gathered: list[int | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, mem)
            mems = [int(m or 0) for m in gathered]
        if self.rank == 0:
            row = {
                "step": step, "loss": loss, "step_time_s": step_time_s,
                "tokens_per_s": self.tokens_per_step / step_time_s if step_time_s > 0 else 0.0,
                "peak_memory_bytes": mems, **extra,
            }
            # Opened per row and closed (flushed) at once, in one write: a run killed mid-way keeps every step
            # it finished, each a whole line.
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"step {step:4d}  loss {loss:.4f}  step {step_time_s * 1e3:8.1f} ms", flush=True)


class StepTimer:
    """Wall-clock timer of one step, synchronizing CUDA first."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.t0 = 0.0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - self.t0
