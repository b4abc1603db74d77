"""Real DeepSpeed runs (torchrun, 2 CPU processes, gloo) compared step by step with a single-process run.

Every strategy starts from the same seeded weights and sees the same global batch per step, and the trainer logs
the global-batch mean loss, so a correct data-, tensor- or pipeline-parallel run reproduces the single-process
losses up to floating-point reduction order.

Tolerance: fp32 everywhere. Step 0 is computed before any update, so only the summation order of the loss mean
differs (~1e-7 relative). Later steps differ because gradients are summed in a different order (all-reduce over dp
ranks, ZeRO reduce-scatter, row-parallel all-reduce in tp, per-stage accumulation in pp): ~1e-6 relative in each
gradient, which Adam's g / sqrt(v) update can enlarge for entries whose gradient is near zero. After 3 steps at
lr 1e-3 that stays far below 2e-3 relative (differences below 1e-5 were measured), while a real error (a dp rank's
gradient dropped, a wrong data slice, a missing tp all-reduce) moves the loss by percents. Where the pipeline cut
falls does not change the losses, so the pipeline test also checks the cut in the trainer's log.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from conftest import make_plan
from paraplan.backends.launch import launch_plan
from paraplan.types import Plan, StagePlan

# DeepSpeed's JIT-built ops (cpu_adam) are cached where .ci/run builds them, unless TORCH_EXTENSIONS_DIR says otherwise.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[2] / "build" / "torch_extensions"))

pytestmark = pytest.mark.integration

STEPS = 4
COMPARED_STEPS = 3
REL_TOL = 2e-3
COMMON = dict(model="llama-tiny", seq_len=64, global_batch=8, micro_batch_size=2, dtype="fp32")


def _losses(run_dir: Path, plan: Plan) -> list[float]:
    _, rows = launch_plan(plan, "deepspeed", run_dir, steps=STEPS, quiet=True)
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert all(r["step_time_s"] > 0 for r in rows)
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> list[float]:
    """One process, dp=1 (4 micro-batches of 2 per step), ZeRO 0: the run every strategy must reproduce."""
    return _losses(tmp_path_factory.mktemp("ds-reference"), make_plan(**COMMON, cluster="cpu:1", dp=1))


def _check_against_reference(losses: list[float], reference: list[float]) -> None:
    for step in range(COMPARED_STEPS):
        assert math.isclose(losses[step], reference[step], rel_tol=REL_TOL), (step, losses, reference)
    # A freshly initialised byte-level model predicts near-uniformly: loss ~ ln(256) = 5.55 nats (5.81 measured).
    # A few AdamW steps at lr 1e-3 learn the byte frequencies of Python source (unigram entropy ~4.5-5 bits, i.e.
    # ~3.3 nats), so the loss must fall by well over 1 nat; a run whose updates do nothing stays near 5.5-5.8.
    assert losses[-1] < losses[0] - 1.0, losses


@pytest.mark.parametrize(
    "strategy",
    [
        pytest.param(dict(dp=2, zero_stage=0), id="dp2"),
        pytest.param(dict(dp=2, zero_stage=3, recompute_blocks=2), id="dp2-zero3-recompute"),
        pytest.param(dict(tp=2, recompute_blocks=2), id="tp2-autotp-recompute"),
        # The torch backend's selective recomputation on the blocks not fully recomputed, under ZeRO-3: the
        # attention policy (the SDPA call re-run in backward) and torchtitan's op policy.
        pytest.param(dict(dp=2, zero_stage=3, recompute_blocks=1, selective_recompute=True),
                     id="dp2-zero3-selective"),
        pytest.param(dict(dp=2, zero_stage=3, recompute_blocks=1, selective_recompute=True, selective_policy="op"),
                     id="dp2-zero3-selective-op"),
    ],
)
def test_two_process_run_matches_single_process(tmp_path, reference_losses, strategy):
    losses = _losses(tmp_path / "run", make_plan(**COMMON, cluster="cpu:2", **strategy))
    _check_against_reference(losses, reference_losses)


def test_pipeline_runs_the_planned_cut_and_matches_single_process(tmp_path, reference_losses):
    # Stage 0 = embed + blocks 1..2 (chain 0..2), stage 1 = blocks 3..6 + head (chain 3..7), first block of each
    # checkpointed. DeepSpeed's own 'uniform' and 'parameters' partitions would both cut at [0, 4, 8], so the log
    # lines show that the plan's cut, not DeepSpeed's, ran.
    plan = make_plan(**COMMON, cluster="cpu:2", pp=2, zero_stage=1)
    stages = [
        StagePlan(index=0, first_layer=0, last_layer=2, n_blocks=2, recompute_blocks=1, time_per_micro_batch_s=0.0,
                  memory_bytes=0.0),
        StagePlan(index=1, first_layer=3, last_layer=7, n_blocks=4, recompute_blocks=1, time_per_micro_batch_s=0.0,
                  memory_bytes=0.0),
    ]
    plan = plan.model_copy(update={"strategy": plan.strategy.model_copy(update={"stages": stages})})
    losses = _losses(tmp_path / "run", plan)
    _check_against_reference(losses, reference_losses)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "pipeline stage 0: chain layers 0..2, checkpointed [1]" in log
    assert "pipeline stage 1: chain layers 3..7, checkpointed [3]" in log


def _cpu_adam_built() -> bool:
    """DeepSpeedCPUAdam already compiled in torch's extension cache (its JIT build takes minutes on 2 cores)."""
    from torch.utils.cpp_extension import _get_build_directory

    return any(Path(_get_build_directory("cpu_adam", verbose=False)).glob("cpu_adam*.so"))


@pytest.mark.skipif(
    not _cpu_adam_built(),
    reason="DeepSpeedCPUAdam is not built yet and its JIT build takes minutes on a 2-core machine; build it once "
    "with .ci/run, or: TORCH_EXTENSIONS_DIR=build/torch_extensions DS_ACCELERATOR=cpu python -c 'from "
    "deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()'",
)
def test_zero2_with_optimizer_offload_matches_single_process(tmp_path, reference_losses):
    plan = make_plan(**COMMON, cluster="cpu:2", dp=2, zero_stage=2, offload_optimizer="cpu")
    losses = _losses(tmp_path / "run", plan)
    _check_against_reference(losses, reference_losses)
