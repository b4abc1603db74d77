"""Mixture-of-Experts models launched with expert parallelism (ep) on the torch backend: torchrun, gloo, 127.0.0.1.

A model trained with ep=2 on 2 processes must log, step for step, the loss and gradient norm of the same model
trained by one process (fp32, seq_len 32, global batch 8, micro-batch 2, 4 steps, same seed and samples): moe-tiny
(Mixtral layers, 4 experts top-2) under DDP (ZeRO 0) and deepseek-tiny (DeepSeek-V3 layers: latent attention, a
dense first layer, 8 routed experts top-2 and a shared expert) under FSDP2 (ZeRO 3). Each rank holds half the experts;
tokens travel to them and back by all-to-all. moe-tiny also runs dp=4 with ep=2 on 4 processes (two ranks per
expert, edp=2), and its ep=2 checkpoint resumes in one process.

The plans are written by :func:`plan_with_ep` in Python, not by ``paraplan plan``: this file tests the backend, and
must not depend on which ep the planner picks (nor on the planner's MoE support at all).

Tolerance. Measured differences to the 1-process run are below 1e-7 relative in loss and 5e-7 in gradient norm
(expert rows arrive from two ranks, so matmul blocking and gradient sums differ in order, and AdamW carries that
into the weights). REL = 1e-5 fails on each bug that matters, measured by planting it in the moe-tiny run: expert
gradients not divided by dp (each rank's experts get every ep rank's loss gradient through the all-to-all's
backward, so they are dp times too large) moves step 0's gradient norm by 4e-2 (the loss by only 3e-7 by step 2:
AdamW is nearly invariant to gradient scale, so grad_norm is compared too); both ranks initializing experts 0-1
instead of their own half moves step 0's loss by 2.5e-3.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import assert_user_error, make_plan, run_cli

from paraplan.backends.checkpoint import checkpoint_dir
from paraplan.types import Plan

pytestmark = pytest.mark.integration

STEPS = 4
EVERY = 2
REL = 1e-5
COMMON = dict(seq_len=32, global_batch=8, micro_batch_size=2, dtype="fp32")


def plan_with_ep(model: str, cluster: str, dp: int = 1, ep: int = 1, **kwargs) -> Plan:
    """A hand-built plan (``conftest.make_plan``: blocks split evenly over the stages, zero predictions) of ``model``
    on ``cluster`` with data parallelism ``dp`` and expert parallelism ``ep``; ``kwargs`` go to ``make_plan``
    (zero_stage, tp, pp, ...). The strategy is re-validated with ep set, so Plan's own rules (ep divides the experts
    and dp x cp x tp) hold."""
    data = make_plan(model, cluster=cluster, dp=dp, **{**COMMON, **kwargs}).model_dump()
    data["strategy"]["ep"] = ep
    return Plan.model_validate(data)


def _write(plan: Plan, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "plan.json"
    path.write_text(plan.model_dump_json(indent=2))
    return path


def _launch(plan: Plan, run_dir: Path, *args: str) -> list[dict]:
    """``paraplan launch PLAN --run-dir RUN_DIR --steps STEPS ARGS``; the metrics rows (the last row of each step)."""
    result = run_cli("launch", str(_write(plan, run_dir.parent / f"{run_dir.name}-plan")), "--run-dir", str(run_dir),
                     "--steps", str(STEPS), *args)
    assert result.exit_code == 0, result.output
    rows: dict[int, dict] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def _assert_same_training(rows: list[dict], reference: list[dict], steps: range = range(STEPS)) -> None:
    assert [r["step"] for r in rows] == list(steps)
    for got in rows:
        want = reference[got["step"]]
        assert got["loss"] == pytest.approx(want["loss"], rel=REL), f"step {got['step']}"
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=REL), f"step {got['step']}"


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict[str, list[dict]]:
    """One process, no parallelism, per model: what every ep run must reproduce."""
    out = {}
    for model in ("moe-tiny", "deepseek-tiny"):
        out[model] = _launch(plan_with_ep(model, "cpu:1"), tmp_path_factory.mktemp(f"{model}-ref") / "run")
        assert out[model][-1]["loss"] < 0.9 * out[model][0]["loss"]  # it trains, not just agrees
    return out


@pytest.fixture(scope="module")
def mixtral_ep2(tmp_path_factory) -> tuple[Path, list[dict]]:
    """moe-tiny, dp=2 with ep=2 under DDP, checkpointing every EVERY steps."""
    run_dir = tmp_path_factory.mktemp("moe-tiny-ep2") / "run"
    rows = _launch(plan_with_ep("moe-tiny", "cpu:2", dp=2, ep=2, zero_stage=0), run_dir,
                   "--checkpoint-every", str(EVERY))
    return run_dir, rows


def test_mixtral_ep2_under_ddp_trains_like_one_process(mixtral_ep2, references):
    run_dir, rows = mixtral_ep2
    recipe = json.loads((run_dir / "torch_parallel.json").read_text())
    assert recipe["data_parallel"]["wrapper"] == "DDP"
    assert (recipe["expert_parallel"]["degree"], recipe["expert_parallel"]["mesh_shape"]) == (2, [1, 1, 2])
    _assert_same_training(rows, references["moe-tiny"])


def test_deepseek_ep2_under_fsdp2_zero3_trains_like_one_process(tmp_path, references):
    run_dir = tmp_path / "run"
    rows = _launch(plan_with_ep("deepseek-tiny", "cpu:2", dp=2, ep=2, zero_stage=3), run_dir)
    assert json.loads((run_dir / "torch_parallel.json").read_text())["data_parallel"]["wrapper"] == "FSDP2"
    _assert_same_training(rows, references["deepseek-tiny"])


def test_ep2_over_four_ranks_reduces_expert_gradients_over_edp(tmp_path, references):
    """dp=4, ep=2 (4 processes): two ranks hold each expert (edp=2) and sum its gradient before dividing by dp."""
    rows = _launch(plan_with_ep("moe-tiny", "cpu:4", dp=4, ep=2, zero_stage=0), tmp_path / "run")
    _assert_same_training(rows, references["moe-tiny"])


def test_ep2_checkpoint_resumes_in_one_process(tmp_path, mixtral_ep2, references):
    """The ep=2 run's step-2 checkpoint (DCP: each rank wrote its experts as slices of the whole tensors, keyed by
    whole-model names) resumed by the 1-process plan: steps 2-3 are the 1-process run's, so the weights (step 2) and
    the AdamW moments (step 3) were reassembled."""
    source, _ = mixtral_ep2
    run_dir = tmp_path / "run"  # the ep=2 run as it was after step 2: its files and its step-2 checkpoint only
    shutil.copytree(checkpoint_dir(source, EVERY), checkpoint_dir(run_dir, EVERY))
    for name in ("plan.json", "launch.json"):
        shutil.copy(source / name, run_dir / name)
    plan = _write(plan_with_ep("moe-tiny", "cpu:1"), tmp_path / "plan")
    result = run_cli("launch", str(plan), "--resume", str(run_dir), "--steps", str(STEPS))
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    _assert_same_training(rows, references["moe-tiny"], range(EVERY, STEPS))


@pytest.mark.parametrize(("kwargs", "backend", "fragments"), [
    (dict(dp=2, ep=2, zero_stage=1), "torch", ["ep=2 at ZeRO stage 1", "zero=0"]),
    (dict(dp=2, ep=2), "deepspeed", ["does not run expert parallelism", "--backend torch"]),
    (dict(tp=2), "torch", ["tp=2 for the Mixture-of-Experts model", "tp=1"]),
])
def test_unsupported_moe_plans_are_refused_before_any_process_starts(tmp_path, kwargs, backend, fragments):
    plan = _write(plan_with_ep("moe-tiny", "cpu:2", **kwargs), tmp_path)
    run_dir = tmp_path / "run"
    assert_user_error(run_cli("launch", str(plan), "--backend", backend, "--dry-run", "--run-dir", str(run_dir)),
                      *fragments)
    assert not run_dir.exists()


def test_sharded_expert_states_over_edp_are_refused(tmp_path):
    """dp=4, ep=2 leaves edp=2 ranks per expert, whose states ZeRO-2/3 would have to shard (the plan priced that)."""
    plan = _write(plan_with_ep("moe-tiny", "cpu:4", dp=4, ep=2, zero_stage=2), tmp_path)
    assert_user_error(run_cli("launch", str(plan), "--dry-run", "--run-dir", str(tmp_path / "run")),
                      "edp=2", "zero=0")
