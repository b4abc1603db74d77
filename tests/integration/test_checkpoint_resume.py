"""Checkpoint and resume under torchrun (2 processes, gloo), both backends.

llama-tiny (fp32, seq_len 64, global batch 8, micro-batch 2) trains 4 steps with a checkpoint every 2 and a
4-step linear warmup, so resuming at step 2 needs all of the saved state: the weights (step 2's loss), the AdamW
moments and the scheduler's position (step 3's loss). A resumed run must log the losses of the uninterrupted run.

Measured: a same-layout resume logs losses and gradient norms bit-identical to the uninterrupted run's (torch
ZeRO-1, DeepSpeed ZeRO-1, ZeRO-3 and pp=2), and so does the torch ZeRO-1 checkpoint resumed under pp=2; resumed
under ZeRO-3 (FSDP2), and a ZeRO-3 checkpoint under ZeRO-1 or tp=2, they differ by at most 3e-8 relative (FSDP2's
reduce-scatter sums in another order than DDP's all-reduce).
REL = 1e-5 fails on each bug that matters, measured by planting it in the same-layout torch resume: nothing loaded
moves step 2's loss by 26% (5.51 instead of 4.37); AdamW moments not loaded (zero) moves step 3's by 25%; the
scheduler's state not loaded (warmup restarted: step 2 at lr/4 instead of 3lr/4) moves step 3's by 2.4%.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import make_plan

from paraplan.backends.checkpoint import checkpoint_dir
from paraplan.backends.launch import launch_plan

pytestmark = pytest.mark.integration

# DeepSpeed's JIT-built ops are cached where .ci/run builds them, unless TORCH_EXTENSIONS_DIR says otherwise.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / "build" / "torch_extensions"))

STEPS = 4
EVERY = 2
WARMUP = 4
REL = 1e-5
SOURCE = dict(dp=2, zero_stage=1)  # torch: DDP + ZeroRedundancyOptimizer, each rank holding half the AdamW states


def _plan(**kwargs):
    plan = make_plan(cluster="cpu:2", **kwargs)
    return plan.model_copy(update={"train": plan.train.model_copy(update={"warmup_steps": WARMUP})})


def _launch(run_dir: Path, backend: str, steps: int, resume: bool = False, **kwargs) -> list[dict]:
    _, rows = launch_plan(_plan(**kwargs), backend, run_dir, steps=steps, quiet=True, checkpoint_every=EVERY,
                          resume=resume)
    return rows


def _resume_copy(source: Path, run_dir: Path, backend: str, **kwargs) -> list[dict]:
    """A fresh run directory holding only ``source``'s step-2 checkpoint, resumed to STEPS by ``kwargs``'s plan."""
    shutil.copytree(checkpoint_dir(source, EVERY), checkpoint_dir(run_dir, EVERY))
    return _launch(run_dir, backend, STEPS, resume=True, **kwargs)


def _assert_continues(rows: list[dict], reference: list[dict], keys=("loss", "grad_norm")) -> None:
    assert [r["step"] for r in rows] == list(range(EVERY, STEPS))
    for got, want in zip(rows, reference[EVERY:]):
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=REL), (key, got["step"])


@pytest.fixture(scope="module")
def torch_reference(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The uninterrupted run (which also leaves its step-2 checkpoint for the resharding tests)."""
    run_dir = tmp_path_factory.mktemp("torch_uninterrupted")
    rows = _launch(run_dir, "torch", STEPS, **SOURCE)
    assert [r["step"] for r in rows] == list(range(STEPS))
    return run_dir, rows


def test_torch_checkpoint_of_one_layout_resumes_under_another(tmp_path, torch_reference):
    # FSDP2: each rank loads its DTensor shards of a checkpoint DDP + ZeroRedundancyOptimizer wrote. (A resume of the
    # same layout after a killed job, and under pp = 2, are in test_cluster_launch.py.)
    source, reference = torch_reference
    rows = _resume_copy(source, tmp_path, "torch", dp=2, zero_stage=3)
    _assert_continues(rows, reference)
    assert "resharded" in (tmp_path / "train.log").read_text()


def test_deepspeed_zero3_resumes_as_if_never_stopped(tmp_path):
    source = tmp_path / "uninterrupted"
    zero3 = dict(dp=2, zero_stage=3)
    reference = _launch(source, "deepspeed", STEPS, **zero3)
    assert (checkpoint_dir(source, EVERY) / "deepspeed").is_dir()
    rows = _resume_copy(source, tmp_path / "resumed", "deepspeed", **zero3)
    _assert_continues(rows, reference, keys=("loss",))
