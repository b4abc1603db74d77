"""Sharded initialization: ranks that never hold the whole model start from the unsharded model's weights.

The reference is computed in this process, without any distributed code: ``build_model(spec, seed)`` (the whole
chain, plain tensors) and its loss and gradient norm on step 0's global batch. FSDP2 ZeRO-3 (torch backend: the
chain built with parameters on meta, each rank initializing only its shards) and DeepSpeed ZeRO-3 (``zero.Init``,
then the per-parameter initialization through ``GatheredParameters``) on cpu:2 must log the same step-0 loss, and
the torch backend the same gradient norm (DeepSpeed's rows carry none): before any update only the summation order
differs (below 1e-7 relative measured). Weights that differ anywhere move it far more: llama-tiny's step-0 loss is
5.655 at seed 0 and 5.612 at seed 1, and copying block 2's up_proj weight into block 3 (a shard initialized under
the wrong name) moves it by 4e-3 relative and the gradient norm by 2e-2; REL = 1e-5 leaves a 400x margin.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_plan
from ds_runs import COMMON

from paraplan.backends.launch import launch_plan
from paraplan.backends.train_common import build_dataset
from paraplan.models.build import build_model, lm_loss

pytestmark = pytest.mark.integration

REL = 1e-5


def _unsharded_step0(plan, launch_spec) -> tuple[float, float]:
    """Loss and gradient L2 norm of the whole seeded model on step 0's global batch (the mean over its B sequences
    equals the trainers' mean of equal-sized micro-batch means)."""
    tokens, targets = build_dataset(plan, launch_spec).batch(0, plan.train.global_batch)
    chain = build_model(plan.model, seed=plan.train.seed)
    loss = lm_loss(chain(tokens), targets)
    loss.backward()
    grad_norm = torch.sqrt(sum(p.grad.double().square().sum() for p in chain.parameters()))
    return loss.item(), grad_norm.item()


def test_fsdp2_zero3_starts_from_the_unsharded_weights(tmp_path):
    plan = make_plan(**COMMON, cluster="cpu:2", dp=2, zero_stage=3)
    launch_spec, rows = launch_plan(plan, "torch", tmp_path / "run", steps=1, quiet=True)
    recipe = json.loads((tmp_path / "run" / "torch_parallel.json").read_text())
    assert (recipe["data_parallel"]["wrapper"], recipe["data_parallel"]["reshard_after_forward"]) == ("FSDP2", True)
    loss, grad_norm = _unsharded_step0(plan, launch_spec)
    assert rows[0]["loss"] == pytest.approx(loss, rel=REL)
    assert rows[0]["grad_norm"] == pytest.approx(grad_norm, rel=REL)


def test_deepspeed_zero3_starts_from_the_unsharded_weights(tmp_path):
    plan = make_plan(**COMMON, cluster="cpu:2", dp=2, zero_stage=3)
    launch_spec, rows = launch_plan(plan, "deepspeed", tmp_path / "run", steps=1, quiet=True)
    assert json.loads((tmp_path / "run" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 3
    loss, _ = _unsharded_step0(plan, launch_spec)
    assert rows[0]["loss"] == pytest.approx(loss, rel=REL)
