"""What the DeepSpeed integration tests share: the tiny problem, one run's losses, and the comparison with the
single-process reference (tolerance and loss drop argued in ``test_deepspeed_launch.py``'s docstring)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from conftest import make_plan
from paraplan.backends.launch import launch_plan
from paraplan.types import Plan

# DeepSpeed's JIT-built ops are cached where .ci/run builds them, unless TORCH_EXTENSIONS_DIR says otherwise.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / "build" / "torch_extensions"))

STEPS = 4
COMPARED_STEPS = 3
REL_TOL = 2e-3
COMMON = dict(model="llama-tiny", seq_len=64, global_batch=8, micro_batch_size=2, dtype="fp32")


def run_losses(run_dir: Path, plan: Plan) -> list[float]:
    """Launch ``plan`` with the DeepSpeed backend for STEPS steps; the logged losses."""
    _, rows = launch_plan(plan, "deepspeed", run_dir, steps=STEPS, quiet=True)
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert all(r["step_time_s"] > 0 for r in rows)
    return [r["loss"] for r in rows]


def reference(run_dir: Path) -> list[float]:
    """One process, dp=1 (4 micro-batches of 2 per step), ZeRO 0, nothing offloaded or paged: the run every
    strategy must reproduce."""
    return run_losses(run_dir, make_plan(**COMMON, cluster="cpu:1", dp=1))


def check_against_reference(got: list[float], ref: list[float]) -> None:
    for step in range(COMPARED_STEPS):
        assert math.isclose(got[step], ref[step], rel_tol=REL_TOL), (step, got, ref)
    # A freshly initialised byte-level model predicts near-uniformly: loss ~ ln(256) = 5.55 nats (5.81 measured).
    # A few AdamW steps at lr 1e-3 learn the byte frequencies of Python source (unigram entropy ~4.5-5 bits, i.e.
    # ~3.3 nats), so the loss must fall by well over 1 nat; a run whose updates do nothing stays near 5.5-5.8.
    assert got[-1] < got[0] - 1.0, got
