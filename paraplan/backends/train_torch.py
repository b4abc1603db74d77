"""Built-in native-torch trainer: ``torchrun ... -m paraplan.backends.train_torch --run-dir DIR``.

Every rank builds the model with its parameters on the meta device, keeps its pipeline model chunks and applies
``torch_native.parallelize``, which allocates only the rank's shards and fills them with the per-parameter
initialization of the plan's seed (``build.init_parameter``), so every strategy starts from the unsharded model's
weights and no rank holds the whole model (a factory model is still built in full); it then trains for
``launch.json``'s ``steps`` with AdamW. At step ``k`` data-parallel rank ``r`` trains on micro-batches
``j = 0..m-1`` starting at ``sample_start(k, B, r, dp, j, mb)``; tensor- and context-parallel ranks of one dp
rank read the same data (context parallelism then keeps each rank's shard of the sequence).

Gradients equal the single-process gradient of the global-batch mean loss: each micro-batch loss is a mean over its
``mb`` sequences, backward runs on ``loss / m`` (pipelining: ``scale_grads`` divides by ``m``), and DDP / FSDP2
average over the ``dp`` ranks, giving ``(1 / (dp m)) sum_r sum_j loss_rj``, the mean over the ``B = dp m mb``
sequences (with context parallelism each rank's loss is the mean over its share of the tokens and the average runs
over ``dp x cp`` ranks, the same mean; with expert parallelism each expert shard's gradient is summed over the edp
ranks holding it and divided by dp, ``torch_expert_parallel.ExpertParallel.reduce_gradients``, the same mean too).
Each ``metrics.jsonl`` row adds ``grad_norm``, the L2 norm of that whole-model gradient before the optimizer step, so
runs of different strategies can be compared gradient for gradient.

Blocks the plan pages (``StagePlan.offload_blocks``) with ``activation_tier`` nvme write their saved activations
under ``<run_dir>/activations/rank<RANK>``, one file per saved storage, each deleted once its backward has run;
their ``metrics.jsonl`` rows add ``paged_bytes``, what rank 0 paged out during the step.

Checkpoints (``checkpoint``: layout, atomic save, retention): with ``launch.json``'s ``checkpoint_every`` > 0 the
trainer saves every that many steps and after the last, with ``torch.distributed.checkpoint`` (DCP) of the
parameters and AdamW states keyed by whole-model names (:func:`checkpoint_tensors`), so a plan with other degrees
loads them resharded; ``trainer.json`` holds the step and the learning-rate scheduler. At start, a run directory
holding a checkpoint resumes from the newest at its step (how torchrun ``--max-restarts`` restarts resume too).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from paraplan.backends.checkpoint import (
    CHECKPOINT_SCHEMA_VERSION, Checkpoint, checkpoint_due, load_rng_state, resume_run, save_checkpoint,
)
from paraplan.backends.data import ByteDataset, sample_start
from paraplan.backends.phases import PhaseRecorder
from paraplan.backends.torch_native import (
    ParallelModel, build_optimizer, load_torch_config, parallelize, reduce_partial_grads, step_context,
)
from paraplan.backends.train_common import (
    MetricsWriter, PagedActivationWrapper, StepTimer, build_dataset, build_lr_scheduler, device_for_rank, dist_backend,
    load_run, shutdown_distributed,
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
    recorder: PhaseRecorder | None = None,
) -> torch.Tensor:
    """Forward and backward of one step's micro-batches without pipelining; returns their mean loss (scalar).
    ``recorder``: marks the forward and backward ranges of a profiled step (``phases``)."""
    phase = recorder.range if recorder is not None else (lambda name: contextlib.nullcontext())
    m = len(batches)
    total = torch.zeros((), dtype=torch.float64)
    is_ddp = isinstance(model.module, torch.nn.parallel.DistributedDataParallel)
    for j, (tokens, targets) in enumerate(batches):
        # DDP all-reduces only on the last micro-batch; FSDP2 reduce-scatters every one (ZeRO-2/3 keep grad shards).
        sync = contextlib.nullcontext() if (j == m - 1 or not is_ddp) else model.module.no_sync()
        with sync, step_context(model, mesh, [tokens, targets]):
            with phase("forward"):
                loss = lm_loss(model.module(tokens), targets)
            with phase("backward"):
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
    dimensions (FSDP2 over TP shards uses ``_StridedShard``, which ``is_shard()`` does not report; an expert-parallel
    shard, ``Shard(0)`` over the ep mesh, has ``dp / ep`` = edp copies, tp = cp = 1); a TP-sharded
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


TRAINER_FILE = "trainer.json"


def _local_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's states: ZeRO-1's local ``.optim`` (its share of the parameters)."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer


def _global_view(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``t`` (the parameter or a state of its shape) as DCP must see it: a TP shard that DDP holds as a plain local
    tensor (``_st_info``, ``tensor.parallel.ddp``) becomes the DTensor it is a shard of, sharing its storage;
    anything else (plain, or already a DTensor under FSDP2 or TP without DDP) stays as it is."""
    spec = getattr(param, "_st_info", None)
    if spec is None or isinstance(t, DTensor) or t.shape != param.shape:
        return t
    return DTensor.from_local(t, spec.mesh, spec.placements, run_check=False, shape=spec.shape, stride=spec.stride)


def checkpoint_tensors(named_params: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
                       ) -> dict[str, torch.Tensor]:
    """This rank's part of the training state, as the live tensors DCP saves from and loads into in place.

    Keys are whole-model names (``ParallelModel.named_parameters``), so they do not depend on the plan:
    ``model.<name>`` for each parameter the rank holds and ``optim.<name>.<state>`` (AdamW's ``exp_avg``,
    ``exp_avg_sq``, ``step``) for each whose optimizer states it holds. Sharded tensors are DTensors (FSDP2, TP), so
    DCP records where each shard lies in the whole tensor and a plan with other degrees reads its own pieces.
    Replicated tensors (DDP, tp copies) appear on several ranks under one key and DCP writes one copy. ZeRO-1's
    states (``ZeroRedundancyOptimizer``) are only on the rank that owns their parameter: each rank contributes its
    share and DCP's metadata joins them, so ZeRO-1 needs no gather to rank 0.

    Args:
        named_params: ``(whole-model name, parameter)`` of this rank, taken before the first forward (under DDP
            with tp > 1 the TP hooks take sharded weights out of ``parameters()`` afterwards).
        optimizer: the run's optimizer, states created (:func:`init_optimizer_states` before a load).
    """
    states = _local_optimizer(optimizer).state
    out: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        out[f"model.{name}"] = _global_view(p.detach(), p)
        for key, value in states.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                out[f"optim.{name}.{key}"] = _global_view(value, p)
    return out


def init_optimizer_states(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Create the optimizer's states (AdamW makes them on its first step) so a load has tensors to fill: one step
    on zero gradients at lr 0, which leaves every parameter as it is (as ``torch.distributed.checkpoint.
    state_dict._init_optim_state`` does); the loaded states then replace what it made."""
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def save_torch_checkpoint(run_dir: Path, step: int, plan: Plan, named_params: list[tuple[str, nn.Parameter]],
                          optimizer: torch.optim.Optimizer, scheduler) -> Path:
    """Save the state after ``step`` completed steps (every rank calls it): DCP of :func:`checkpoint_tensors`,
    rank 0's ``trainer.json`` (step, scheduler ``state_dict``), each rank's RNG state (``checkpoint``)."""
    import torch.distributed.checkpoint as dcp

    def write(directory: Path) -> None:
        dcp.save(checkpoint_tensors(named_params, optimizer), checkpoint_id=directory)
        if dist.get_rank() == 0:
            trainer = {"schema_version": CHECKPOINT_SCHEMA_VERSION, "step": step,
                       "lr_scheduler": scheduler.state_dict()}
            (directory / TRAINER_FILE).write_text(json.dumps(trainer, indent=2) + "\n")

    return save_checkpoint(run_dir, step, plan, "torch", write)


def load_torch_checkpoint(ckpt: Checkpoint, plan: Plan, named_params: list[tuple[str, nn.Parameter]],
                          params: list[nn.Parameter], optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Load ``ckpt`` into this rank's parameters, optimizer states and scheduler (resharded by DCP when the plan
    splits them otherwise), and its RNG state when the layout is the checkpoint's."""
    import torch.distributed.checkpoint as dcp

    init_optimizer_states(optimizer, params)
    dcp.load(checkpoint_tensors(named_params, optimizer), checkpoint_id=ckpt.path)
    trainer = json.loads((ckpt.path / TRAINER_FILE).read_text())
    scheduler.load_state_dict(_scheduler_state_for(trainer["lr_scheduler"], len(optimizer.param_groups)))
    # LambdaLR's state sets only its own counters; the optimizer runs at the lr it had set last.
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr
    load_rng_state(ckpt, plan)


def _scheduler_state_for(state: dict, n_groups: int) -> dict:
    """A saved LR scheduler state for an optimizer of ``n_groups`` parameter groups. Every group of the trainer's
    optimizer shares one lr and one schedule (expert-parallel shards are a group of their own, see
    ``torch_native.build_optimizer``), so a state saved under another grouping repeats its first group's values."""
    out = dict(state)
    for key in ("base_lrs", "_last_lr", "lr_lambdas"):
        values = state.get(key)
        if isinstance(values, list) and values and len(values) != n_groups:
            out[key] = [values[0]] * n_groups
    return out


def train(run_dir: Path, device: torch.device) -> None:
    """Run the job described by ``run_dir`` on this rank (process group already initialized on ``device``)."""
    from torch.distributed.device_mesh import init_device_mesh

    plan, spec = load_run(run_dir)
    config = load_torch_config(run_dir, plan)
    mesh = init_device_mesh(device.type, tuple(config.mesh.shape), mesh_dim_names=tuple(config.mesh.dim_names))
    activation_dir = run_dir / ACTIVATIONS_DIR / f"rank{dist.get_rank()}"  # used only for activations paged to disk
    # Parameters on meta: parallelize allocates and initializes only this rank's shards (build.init_parameter).
    model = parallelize(build_model(plan.model, device=device, seed=plan.train.seed, meta_params=True), plan,
                        mesh, device, activation_dir)
    optimizer = build_optimizer(model, plan)
    scheduler = build_lr_scheduler(optimizer, plan)
    named_params = model.named_parameters()  # before any forward (see checkpoint_tensors)
    start = resume_run(run_dir, plan, "torch", spec.checkpoint_every,
                       lambda ckpt: load_torch_checkpoint(ckpt, plan, named_params, model.params, optimizer, scheduler))
    dataset = build_dataset(plan, spec)
    dp_rank = mesh["dp"].get_local_rank()
    writer, timer = MetricsWriter(run_dir, plan, device), StepTimer(device)
    recorder = PhaseRecorder(spec.phase_times, spec.steps, device)
    for step in range(start, spec.steps):
        timer.start()
        with recorder.step(step):
            optimizer.zero_grad(set_to_none=True)
            batches = rank_batch(dataset, plan, step, dp_rank, device)
            if model.schedule is not None:  # the schedule marks its own Forward/Backward ranges
                local = train_pipeline(model, batches, mesh)
            else:
                local = train_micro_batches(model, batches, mesh, recorder)
            if model.expert_parallel is not None:  # expert shards: summed over edp, divided by dp (DDP/FSDP2 skip)
                model.expert_parallel.reduce_gradients()
            reduce_partial_grads(model.params)
            grad_norm = global_grad_norm(model, plan, device)
            with recorder.range("optimizer"):
                optimizer.step()
                scheduler.step()
            loss = global_mean_loss(local, plan, device)
        extra = {"paged_bytes": take_paged_bytes(model)} if config.paged_blocks else {}
        writer.log(step, loss, timer.stop(), recorder.take(), grad_norm=grad_norm, **extra)
        if checkpoint_due(step + 1, spec.steps, spec.checkpoint_every):
            save_torch_checkpoint(run_dir, step + 1, plan, named_params, optimizer, scheduler)


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
