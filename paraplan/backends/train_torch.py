"""Built-in native-torch trainer: ``torchrun ... -m paraplan.backends.train_torch --run-dir DIR``.

Every rank builds the full model from the plan's seed (so every strategy starts from identical weights), keeps its
pipeline model chunks, applies ``torch_native.parallelize`` and trains for ``launch.json``'s ``steps`` with AdamW. At
step ``k`` data-parallel rank ``r`` trains on micro-batches ``j = 0..m-1`` starting at
``sample_start(k, B, r, dp, j, mb)``; tensor- and context-parallel ranks of one dp rank read the same data (context
parallelism then keeps each rank's shard of the sequence).

Gradients equal the single-process gradient of the global-batch mean loss: each micro-batch loss is a mean over its
``mb`` sequences, backward runs on ``loss / m`` (pipelining: ``scale_grads`` divides by ``m``), and DDP / FSDP2
average over the ``dp`` ranks, giving ``(1 / (dp m)) sum_r sum_j loss_rj``, the mean over the ``B = dp m mb``
sequences (with context parallelism each rank's loss is the mean over its share of the tokens and the average runs
over ``dp x cp`` ranks, the same mean). Each ``metrics.jsonl`` row adds ``grad_norm``, the L2 norm of that
whole-model gradient before the optimizer step, so runs of different strategies can be compared gradient for
gradient.

Blocks the plan pages (``StagePlan.offload_blocks``) with ``activation_tier`` nvme write their saved activations
under ``<run_dir>/activations/rank<RANK>``, one file per saved storage, each deleted once its backward has run;
their ``metrics.jsonl`` rows add ``paged_bytes``, what rank 0 paged out during the step.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.distributed as dist

from paraplan.backends.data import ByteDataset, sample_start
from paraplan.backends.torch_native import (
    ParallelModel, build_optimizer, load_torch_config, parallelize, reduce_partial_grads, step_context,
)
from paraplan.backends.train_common import (
    MetricsWriter, PagedActivationWrapper, StepTimer, build_dataset, device_for_rank, dist_backend, load_run, shutdown_distributed,
)
from paraplan.models.build import build_model, lm_loss
from paraplan.types import Plan

ACTIVATIONS_DIR = "activations"


def rank_batch(
    dataset: ByteDataset, plan: Plan, step: int, dp_rank: int, device: torch.device,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The ``m`` micro-batches ``(tokens, targets)``, each ``(mb, s)`` int64, of ``dp_rank`` at ``step``."""
    st = plan.strategy
    out = []
    for j in range(st.grad_accum):
        start = sample_start(step, plan.train.global_batch, dp_rank, st.dp, j, st.micro_batch_size)
        tokens, targets = dataset.batch(start, st.micro_batch_size)
        out.append((tokens.to(device), targets.to(device)))
    return out


def train_micro_batches(
    model: ParallelModel, batches: list[tuple[torch.Tensor, torch.Tensor]], mesh,
) -> torch.Tensor:
    """Forward and backward of one step's micro-batches without pipelining; returns their mean loss (scalar)."""
    m = len(batches)
    total = torch.zeros((), dtype=torch.float64)
    is_ddp = isinstance(model.module, torch.nn.parallel.DistributedDataParallel)
    for j, (tokens, targets) in enumerate(batches):
        # DDP all-reduces only on the last micro-batch; FSDP2 reduce-scatters every one (ZeRO-2/3 keep grad shards).
        sync = contextlib.nullcontext() if (j == m - 1 or not is_ddp) else model.module.no_sync()
        with sync, step_context(model, mesh, [tokens, targets]):
            loss = lm_loss(model.module(tokens), targets)
            (loss / m).backward()
        total += loss.detach().double().cpu()
    return total / m


def train_pipeline(
    model: ParallelModel, batches: list[tuple[torch.Tensor, torch.Tensor]], mesh,
) -> torch.Tensor | None:
    """One step of the plan's pipeline schedule; it splits the concatenated batch into the ``m`` micro-batches again.

    Returns:
        Mean micro-batch loss on the rank holding the last model chunk, None on the others.
    """
    tokens = torch.cat([t for t, _ in batches])
    targets = torch.cat([y for _, y in batches])
    args = (tokens,) if model.is_first else ()
    with step_context(model, mesh, [tokens, targets]):
        if model.is_last:
            losses: list[torch.Tensor] = []
            model.schedule.step(*args, target=targets, losses=losses)  # type: ignore[attr-defined]
            return torch.stack([x.detach().double().cpu() for x in losses]).mean()
        model.schedule.step(*args)  # type: ignore[attr-defined]
    return None


def global_mean_loss(local: torch.Tensor | None, plan: Plan, device: torch.device) -> float:
    """Global-batch mean loss on every rank.

    The ``dp * cp * tp`` ranks of the last model chunk each hold their dp rank's mean (tp ranks hold identical
    copies, cp ranks the means over equal shares of the tokens); the others hold None and contribute 0. Summing over
    the world and dividing by ``dp * cp * tp`` gives the mean over dp ranks.
    """
    st = plan.strategy
    value = local.item() if local is not None else 0.0
    buf = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return buf.item() / (st.dp * st.cp * st.tp)


def global_grad_norm(model: ParallelModel, plan: Plan, device: torch.device) -> float:
    """L2 norm of the whole model's gradient (what a single process would see), identical on every rank.

    Each rank adds the squares of the gradient elements it holds divided by how many ranks hold the same elements
    (copies over dp, cp and tp; pipeline chunks hold disjoint layers), so the sum over the world counts each element
    once. A DTensor gradient's copies are ``dp * cp * tp`` divided by the sizes of its non-replicated mesh
    dimensions (FSDP2 over TP shards uses ``_StridedShard``, which ``is_shard()`` does not report); a TP-sharded
    parameter that DDP sees as a plain local shard (``_st_info``) has ``dp * cp`` copies, a replicated one (a
    sequence-parallel norm weight) ``dp * cp * tp``.
    """
    from torch.distributed.tensor import DTensor

    copies_all = plan.strategy.dp * plan.strategy.cp * plan.strategy.tp
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.params:
        if p.grad is None:
            continue
        grad, copies = p.grad, copies_all
        if isinstance(grad, DTensor):
            for dim, placement in enumerate(grad.placements):
                if not placement.is_replicate():
                    copies //= grad.device_mesh.size(dim)
            grad = grad.to_local()
        elif hasattr(p, "_st_info"):  # DDP's local view of a DTensor: its placements over the tp mesh
            for placement in p._st_info.placements:
                if not placement.is_replicate():
                    copies //= plan.strategy.tp
        total += grad.detach().double().square().sum().to(device) / copies
    dist.all_reduce(total)
    return total.sqrt().item()


def take_paged_bytes(model: ParallelModel) -> int:
    """Bytes this rank's paged blocks paged out since the last call (their counters are reset)."""
    total = 0
    for module in model.modules:
        for sub in module.modules():
            if isinstance(sub, PagedActivationWrapper):
                total, sub.pager.paged_bytes = total + sub.pager.paged_bytes, 0
    return total


def train(run_dir: Path, device: torch.device) -> None:
    """Run the job described by ``run_dir`` on this rank (process group already initialized on ``device``)."""
    from torch.distributed.device_mesh import init_device_mesh

    plan, spec = load_run(run_dir)
    config = load_torch_config(run_dir, plan)
    mesh = init_device_mesh(device.type, tuple(config.mesh.shape), mesh_dim_names=tuple(config.mesh.dim_names))
    activation_dir = run_dir / ACTIVATIONS_DIR / f"rank{dist.get_rank()}"  # used only for activations paged to disk
    model = parallelize(build_model(plan.model, device=device, seed=plan.train.seed), plan, mesh, device,
                        activation_dir)
    optimizer = build_optimizer(model, plan)
    dataset = build_dataset(plan, spec)
    dp_rank = mesh["dp"].get_local_rank()
    writer, timer = MetricsWriter(run_dir, plan, device), StepTimer(device)
    for step in range(spec.steps):
        timer.start()
        optimizer.zero_grad(set_to_none=True)
        batches = rank_batch(dataset, plan, step, dp_rank, device)
        if model.schedule is not None:
            local = train_pipeline(model, batches, mesh)
        else:
            local = train_micro_batches(model, batches, mesh)
        reduce_partial_grads(model.params)
        grad_norm = global_grad_norm(model, plan, device)
        optimizer.step()
        loss = global_mean_loss(local, plan, device)
        extra = {"paged_bytes": take_paged_bytes(model)} if config.paged_blocks else {}
        writer.log(step, loss, timer.stop(), grad_norm=grad_norm, **extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="paraplan native-torch trainer (run under torchrun)")
    parser.add_argument("--run-dir", required=True, type=Path, help="directory written by `paraplan launch`")
    args = parser.parse_args(argv)
    device = device_for_rank()  # before init, so NCCL binds this rank's GPU
    dist.init_process_group(backend=dist_backend())
    clean = False
    try:
        train(args.run_dir, device)
        clean = True
    finally:
        shutdown_distributed(clean)


if __name__ == "__main__":
    main()
