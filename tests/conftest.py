"""Shared test helpers: hand-built plans, so backend tests do not depend on the planner's choices; the CLI runner."""

from __future__ import annotations

import pytest

from paraplan.catalog import load_cluster_spec
from paraplan.models.presets import load_model_spec
from paraplan.types import (
    MemoryBreakdown, Plan, Prediction, SolverInfo, StagePlan, Strategy, TrainSpec, place_stages,
)


def make_plan(
    model: str = "llama-tiny", cluster: str = "cpu:2", dp: int = 1, tp: int = 1, pp: int = 1,
    micro_batch_size: int = 2, global_batch: int = 8, seq_len: int = 64, zero_stage: int = 0,
    offload_optimizer: bool | str = False, recompute_blocks: int = 0, dtype: str = "fp32", lr: float = 1e-3,
    sequence_parallel: bool = False, selective_recompute: bool = False, selective_policy: str = "attention",
    cp: int = 1, vpp: int = 1, schedule: str | None = None, offload_param: str = "none",
    offload_ratio: float = 1.0, offload_blocks: int = 0, activation_tier: str | None = None,
) -> Plan:
    """A Plan with blocks split as evenly as possible over ``pp`` stages (earlier stages get the remainder).

    Predictions are zeros: these plans exercise backends, not cost models. With ``vpp`` > 1 each stage's blocks
    are split over its chunks as evenly as possible (earlier chunks get the remainder) and the schedule defaults to
    interleaved_1f1b; ``selective_recompute`` selects every block not recomputed in full; ``offload_blocks`` pages
    that many blocks per stage (after the recomputed ones) to ``activation_tier`` (default: host memory on GPUs, disk
    on CPU clusters).
    """
    schedule = schedule or ("interleaved_1f1b" if vpp > 1 else "1f1b")
    spec = load_model_spec(model)
    clus = load_cluster_spec(cluster)
    n_layers = spec.n_layers or 0
    stages = []
    first = 0
    for s in range(pp):
        n = n_layers // pp + (1 if s < n_layers % pp else 0)
        last = first + n + (1 if s == 0 else 0) + (1 if s == pp - 1 else 0) - 1
        r = min(recompute_blocks, n)
        sel = n - r if selective_recompute else 0
        chunks = [n // vpp + (1 if c < n % vpp else 0) for c in range(vpp)] if vpp > 1 else None
        stages.append(StagePlan(index=s, first_layer=first, last_layer=last, n_blocks=n, recompute_blocks=r,
                                selective_blocks=sel, offload_blocks=min(offload_blocks, n - r - sel),
                                chunk_blocks=chunks,
                                time_per_micro_batch_s=0.0, memory_bytes=0.0))
        first = last + 1
    grad_accum = global_batch // (dp * micro_batch_size)
    strategy = Strategy(dp=dp, tp=tp, pp=pp, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                        zero_stage=zero_stage, offload_optimizer=offload_optimizer, offload_param=offload_param,
                        offload_ratio=offload_ratio,
                        activation_tier=activation_tier or ("nvme" if clus.device.kind == "cpu" else "cpu"),
                        stages=place_stages(stages, vpp, schedule),
                        sequence_parallel=sequence_parallel, selective_recompute=selective_recompute,
                        selective_policy=selective_policy, cp=cp, vpp=vpp, schedule=schedule)
    zero = MemoryBreakdown(params=0, grads=0, optimizer=0, activations=0, other=0)
    pred = Prediction(step_time_s=1.0, compute_s=1.0, bubble_s=0.0, dp_comm_s=0.0, offload_s=0.0, optimizer_s=0.0,
                      peak_memory_bytes=0.0, memory_capacity_bytes=clus.device.memory_bytes,
                      memory_breakdown_bytes=zero, tokens_per_s=0.0, model_flops_per_step=0.0, mfu=0.0,
                      compute_source="analytic")
    solver = SolverInfo(status="optimal", solver="hand", candidates=1, milps_solved=0, search_time_s=0.0)
    train = TrainSpec(global_batch=global_batch, seq_len=seq_len, dtype=dtype, lr=lr)
    return Plan(model=spec, cluster=clus, train=train, strategy=strategy, predicted=pred, solver=solver)


@pytest.fixture
def plan_factory():
    return make_plan


def run_cli(*args: str):
    """Invoke the ``paraplan`` CLI in-process (typer's runner)."""
    from typer.testing import CliRunner

    from paraplan.cli.app import app

    return CliRunner().invoke(app, list(args))


def assert_user_error(result, *fragments: str) -> None:
    """Exit code 1, no traceback, a clean SystemExit, and every fragment in the message."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert isinstance(result.exception, SystemExit)
    for frag in fragments:
        assert frag in result.output, result.output


def best_assignment(costs, modes, capacity_bytes: float, selective: bool = False, paging: bool = False,
                    recompute: bool = True) -> float:
    """Brute force over one candidate: the least step time (s) of every contiguous assignment of the blocks to
    ``costs.pp`` stages (each holding at least ``costs.min_blocks``), every count of fully recomputed blocks per
    stage (unless not ``recompute``) and, with ``selective``, of selectively recomputed ones, with ``paging`` of
    paged ones, and every mode,
    among those whose every stage fits ``capacity_bytes`` and the host and NVMe shares of a device; ``inf`` when
    none fits. Evaluated with the cost model's evaluator (``stage_cost`` + ``step_time_s``), independently of the
    MILP."""
    import itertools

    from paraplan.cost_models.costs import step_time_s

    L, p = costs.spec.n_layers, costs.pp
    best = float("inf")
    for cut in itertools.combinations_with_replacement(range(L + 1), p - 1):
        bounds = (0, *cut, L)
        n = [bounds[i + 1] - bounds[i] for i in range(p)]
        if any(n[s] < costs.min_blocks(s) for s in range(p)):
            continue
        splits = [[(r, q, a) for r in range(k + 1 if recompute else 1) for q in range(k - r + 1 if selective else 1)
                   for a in range(k - r - q + 1 if paging else 1)] for k in n]
        for rqa in itertools.product(*splits):
            for mode in modes:
                stages = [costs.stage_cost(s, n[s], rqa[s][0], mode, rqa[s][1], rqa[s][2]) for s in range(p)]
                if any(st.memory_bytes > capacity_bytes or st.host_bytes > costs.host_capacity_bytes
                       or st.nvme_bytes > costs.nvme_capacity_bytes for st in stages):
                    continue
                best = min(best, step_time_s(costs, stages)[0])
    return best



def retained_bytes(module, x, exclude=()):
    """Forward ``module`` on ``x`` and return (bytes of the storages created during the forward that are still alive
    afterwards, the output): what autograd, a selective-checkpoint cache or a paging hook keeps for backward,
    whichever mechanism holds it. Parameters, ``exclude`` and the output itself are not counted."""
    import torch
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    skip = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *exclude]}
    refs: dict[int, tuple] = {}

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in skip:
                    storage = t.untyped_storage()
                    refs[storage.data_ptr()] = (StorageWeakRef(storage), storage.nbytes())
            return out

    with Track():
        y = module(x)
    out_ptr = y.untyped_storage().data_ptr()
    return sum(n for ptr, (ref, n) in refs.items() if not ref.expired() and ptr != out_ptr), y


def hf_config_dir(cfg, tmp_path, folder: str):
    """``tmp_path/folder/config.json`` holding transformers config ``cfg`` (as ``save_pretrained`` writes it);
    returns the folder."""
    d = tmp_path / folder
    d.mkdir()
    cfg.to_json_file(d / "config.json")
    return d
