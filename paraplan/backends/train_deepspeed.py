"""Built-in DeepSpeed trainer: ``torchrun ... -m paraplan.backends.train_deepspeed --run-dir DIR``.

Reads ``plan.json``, ``launch.json`` and ``ds_config.json`` (from ``emit_deepspeed``) and trains the plan's model
for ``launch.steps`` steps on byte-level data. Every strategy starts from the weights of the same seed
(``build.init_parameter``: a function of the seed and the parameter's name) and sees the same global batch each
step (``data.sample_start``); the logged loss is the global-batch mean, so runs of different strategies can be
compared step by step.

- pp == 1: ``deepspeed.initialize`` on the whole chain (ZeRO 0-3, optimizer offload to host memory or NVMe,
  AutoTP for tp > 1); each step runs ``gradient_accumulation_steps`` micro-batches through ``engine.backward`` /
  ``engine.step``. At ZeRO-3 the chain is built inside ``deepspeed.zero.Init``, so each parameter is partitioned
  (and swapped out, with ``offload_param``) as soon as its module is built and no rank ever holds the whole model
  (:func:`build_partitioned_model`); ZeRO 0-2 ranks hold full parameters anyway and build the whole chain.
- pp > 1: a ``PipelineModule`` cut at the plan's stage boundaries, trained with ``engine.train_batch`` (1F1B).

Blocks the plan pages (``StagePlan.offload_blocks``) run inside ``train_common.paged_activations``: their saved
activations go to host memory, or to files under ``<nvme_path or run dir>/activations/rank<R>``.

The learning rate follows ``train_common.build_lr_scheduler`` (linear warmup), passed to ``deepspeed.initialize``
so the engine steps it and saves it. Checkpoints (``checkpoint``: layout, atomic save, retention): with
``launch.json``'s ``checkpoint_every`` > 0, ``engine.save_checkpoint`` every that many steps and after the last,
into ``step_<k>/deepspeed/``; at start a run directory holding a checkpoint resumes from the newest
(``engine.load_checkpoint``), only under the layout that saved it (``checkpoint.check_resumable``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

from paraplan.backends.checkpoint import Checkpoint, checkpoint_due, load_rng_state, resume_run, save_checkpoint
from paraplan.backends.data import ByteDataset, sample_start
from paraplan.backends.deepspeed import DS_CONFIG_FILE, PARAPLAN_KEY
from paraplan.backends.phases import PhaseRecorder, wrap_deepspeed_pipe_instructions
from paraplan.backends.train_common import (
    MetricsWriter, StepTimer, build_dataset, build_lr_scheduler, device_for_rank, dist_backend, load_run,
    selective_checkpoint, shutdown_distributed,
)
from paraplan.errors import CheckpointError, LaunchError
from paraplan.files import read_mapping
from paraplan.models.build import build_model, hf_config, lm_loss
from paraplan.types import Plan

Batch = tuple[torch.Tensor, torch.Tensor]


class CheckpointedLayer(nn.Module):
    """Full activation checkpointing of one chain layer: keep only its input, recompute its forward in backward."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():
            return self.inner(x)
        # Non-reentrant: works when the input does not require grad, and re-runs module hooks (ZeRO-3 gathers).
        return checkpoint(self.inner, x, use_reentrant=False)


def apply_ac(
    layers: list[nn.Module], chain_layers: list[int], selective_layers: list[int] = (),
    selective_policy: str = "attention",
) -> list[nn.Module]:
    """Wrap the chain layers at indices ``chain_layers`` in :class:`CheckpointedLayer` and those at
    ``selective_layers`` in the torch backend's selective recomputation under ``selective_policy``
    (``train_common.selective_checkpoint``: attention or op); return the new list."""
    full, selective = set(chain_layers), set(selective_layers)
    return [
        CheckpointedLayer(layer) if i in full
        else selective_checkpoint(layer, selective_policy) if i in selective else layer
        for i, layer in enumerate(layers)
    ]


def apply_paging(layers: list[nn.Module], chain_layers: list[int], tier: str,
                 directory: Path | None) -> list[nn.Module]:
    """Wrap the chain layers at indices ``chain_layers`` in ``train_common.paged_activations`` (their saved
    activations paged to ``tier``: host memory, or files under ``directory`` for nvme); return the new list."""
    if not chain_layers:
        return list(layers)
    from paraplan.backends.train_common import paged_activations

    if directory is not None:
        directory.mkdir(parents=True, exist_ok=True)
    paged = set(chain_layers)
    return [paged_activations(layer, tier, directory) if i in paged else layer for i, layer in enumerate(layers)]


def paging_directory(ours: dict, run_dir: Path, rank: int) -> Path | None:
    """Where rank ``rank`` pages activations to disk: ``<nvme_path or run_dir>/activations/rank<rank>``; None for
    host memory."""
    paging = ours.get("activation_paging") or {}
    if paging.get("tier") != "nvme":
        return None
    base = Path(paging["nvme_path"]) if paging.get("nvme_path") else Path(run_dir)
    return base / "activations" / f"rank{rank}"


def wrap_layers(layers: list[nn.Module], ours: dict, run_dir: Path, rank: int) -> list[nn.Module]:
    """The chain with the plan's recomputation (:func:`apply_ac`) and activation paging (:func:`apply_paging`),
    from the ``paraplan`` section of ``ds_config.json``; the two never wrap the same layer."""
    layers = apply_ac(layers, *_ac_layers(ours))
    paging = ours.get("activation_paging") or {}
    return apply_paging(layers, paging.get("chain_layers", []), paging.get("tier", "cpu"),
                        paging_directory(ours, run_dir, rank))


def _ac_layers(ours: dict) -> tuple[list[int], list[int], str]:
    """Fully and selectively checkpointed chain layers and the selective policy of the ``paraplan`` section of
    ``ds_config.json``."""
    ac = ours["activation_checkpointing"]
    return ac["chain_layers"], ac["selective"]["chain_layers"], ac["selective"]["policy"]


def build_pipeline_module(plan: Plan, ours: dict, run_dir: Path | None = None) -> nn.Module:
    """This rank's stage of the chain as a DeepSpeed ``PipelineModule`` cut at the plan's stage boundaries.

    DeepSpeed's ``partition_method`` offers 'uniform', 'parameters' and 'type:<regex>'; none reproduces an arbitrary
    planned cut, so a subclass replaces ``_partition_layers`` (whose whole job is to set ``self.parts`` and this
    stage's bounds) with the plan's boundaries. The full chain is built first (same seed on every rank, so weights
    equal the single-process model's); only this stage's layers stay referenced afterwards.

    Args:
        plan: the plan; ``plan.strategy.pp`` stages.
        ours: the ``paraplan`` section of ``ds_config.json`` (stage boundaries, checkpointed and paged chain
            layers).
        run_dir: the run directory (activations paged to disk go under it when no nvme_path is set).

    Raises:
        LaunchError: boundaries that do not cut this model's chain into pp stages.
    """
    from deepspeed.pipe import PipelineModule

    class PlannedPipelineModule(PipelineModule):
        def __init__(self, layers: list[nn.Module], parts: list[int], **kwargs) -> None:
            self._planned_parts = list(parts)
            super().__init__(layers=layers, **kwargs)
            # DeepSpeed keeps the whole layer list after building this stage; drop other stages' layers.
            self._layer_specs = [
                spec if self._local_start <= i < self._local_stop else None for i, spec in enumerate(self._layer_specs)
            ]

        def _partition_layers(self, method: str = "uniform") -> None:
            if len(self._planned_parts) != self.num_stages + 1 or self._planned_parts[-1] != len(self._layer_specs):
                raise LaunchError(
                    f"plan stage boundaries {self._planned_parts} do not cut a chain of {len(self._layer_specs)} "
                    f"layers into {self.num_stages} stages; re-plan for this model"
                )
            self.parts = list(self._planned_parts)
            stage_id = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=self.parts[stage_id], stop=self.parts[stage_id + 1])

    chain = build_model(plan.model, seed=plan.train.seed)
    layers = wrap_layers(chain.layers(), ours, Path(run_dir or "."), dist.get_rank())
    with contextlib.redirect_stdout(io.StringIO()):  # PipelineModule prints its seed settings on rank 0
        return PlannedPipelineModule(
            layers, ours["stage_boundaries"], num_stages=plan.strategy.pp, loss_fn=lm_loss,
            partition_method="paraplan", activation_checkpoint_interval=0,
        )


def micro_batches(dataset: ByteDataset, plan: Plan, step: int, dp_rank: int) -> Iterator[Batch]:
    """The ``grad_accum`` micro-batches of data-parallel rank ``dp_rank`` at ``step``, each ``(mb, seq_len)``."""
    s = plan.strategy
    for j in range(s.grad_accum):
        start = sample_start(step, plan.train.global_batch, dp_rank, s.dp, j, s.micro_batch_size)
        yield dataset.batch(start, s.micro_batch_size)


def build_partitioned_model(plan: Plan, ds_config: dict) -> nn.Module:
    """ZeRO-3: the chain built under ``deepspeed.zero.Init`` (each parameter partitioned, and offloaded with
    ``offload_param``, as soon as its module is built), holding the unsharded model's weights.

    zero.Init builds with torch's default initialization; every parameter of a llama or gpt chain is then
    overwritten with ``build.init_parameter``, one parameter at a time, under
    ``deepspeed.zero.GatheredParameters(param, modifier_rank=0)``: DeepSpeed's documented way to modify partitioned
    weights (gathered on entry; on exit the modifier's value is broadcast and re-partitioned). Every rank writes the
    same value, so the broadcast changes nothing. A rank thus holds its partitions plus one whole parameter at a
    time. A factory model keeps its own initialization, from the seeded global generator as ``build_model`` does.
    """
    import deepspeed

    from paraplan.models.build import init_parameter

    # zero.Init replaces torch's tensor constructors, and transformers' lazy module import then fails
    # ("Signature mismatch ... tensor_pynew"): import every module the build needs first, on the meta device.
    build_model(plan.model, device="meta", seed=None)
    custom = plan.model.family == "custom"
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        chain = build_model(plan.model, seed=plan.train.seed if custom else None)
    if not custom:
        for name, param in chain.named_parameters():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0), torch.no_grad():
                param.data.copy_(init_parameter(name, param.shape, param.dtype, plan.model, plan.train.seed))
    return chain


def train_flat(plan: Plan, ds_config: dict, dataset: ByteDataset, steps: int, run_dir: Path,
               checkpoint_every: int = 0, phase_times: bool = False) -> None:
    """pp == 1: DeepSpeed engine (DDP or ZeRO, optionally AutoTP) around the whole chain; ``phase_times``: profile
    one step's phases (``phases``)."""
    import deepspeed
    from deepspeed.utils import groups

    device = device_for_rank()
    st = plan.strategy
    if st.zero_stage == 3:  # partitioned as each module is built: the full model is never materialised on a rank
        chain = build_partitioned_model(plan, ds_config)
    else:
        chain = build_model(plan.model, seed=plan.train.seed)
    layers = wrap_layers(chain.layers(), ds_config[PARAPLAN_KEY], run_dir, dist.get_rank())
    # Only blocks are ever checkpointed or paged; embed and head stay as built.
    chain.blocks = nn.ModuleList(layers[1:-1])
    if plan.strategy.tp > 1:
        chain.config = hf_config(plan.model)  # AutoTP reads head counts from model.config
    engine, _, _, _ = deepspeed.initialize(model=chain, model_parameters=chain.parameters(), config=ds_config,
                                           lr_scheduler=lambda opt: build_lr_scheduler(opt, plan))
    start = resume_run(run_dir, plan, "deepspeed", checkpoint_every, lambda ckpt: load_engine(engine, ckpt, plan))
    # Ranks of one tp group share a dp rank (DeepSpeed's (dp, tp) mesh): they must read the same micro-batches.
    dp_rank = groups.get_data_parallel_rank() if plan.strategy.tp > 1 else dist.get_rank()
    metrics, timer = MetricsWriter(run_dir, plan, device), StepTimer(device)
    recorder = PhaseRecorder(phase_times, steps, device)
    for step in range(start, steps):
        timer.start()
        with recorder.step(step):
            total = torch.zeros((), dtype=torch.float32, device=device)
            for tokens, targets in micro_batches(dataset, plan, step, dp_rank):
                with recorder.range("forward"):
                    loss = lm_loss(engine(tokens.to(device)), targets.to(device))
                with recorder.range("backward"):
                    engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
                with recorder.range("optimizer"):
                    engine.step()  # applies the update only at the accumulation boundary
                total += loss.detach().float()
            # Sum over all ranks of per-rank micro-batch sums; the tp ranks of a group hold equal copies, so divide
            # by world size (dp x tp) x micro-batches for the global-batch mean.
            dist.all_reduce(total)
        step_time_s = timer.stop()
        metrics.log(step, (total / (dist.get_world_size() * plan.strategy.grad_accum)).item(), step_time_s,
                    recorder.take())
        if checkpoint_due(step + 1, steps, checkpoint_every):
            save_engine(engine, run_dir, step + 1, plan)


def train_pipeline(plan: Plan, ds_config: dict, dataset: ByteDataset, steps: int, run_dir: Path,
                   checkpoint_every: int = 0, phase_times: bool = False) -> None:
    """pp > 1: ``PipelineModule`` at the plan's stage boundaries, 1F1B via ``engine.train_batch``; ``phase_times``:
    profile one step's phases (``phases``)."""
    import deepspeed

    device = device_for_rank()
    ours = ds_config[PARAPLAN_KEY]
    module = build_pipeline_module(plan, ours, run_dir)
    params = [p for p in module.parameters() if p.requires_grad]
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=params, config=ds_config,
                                           lr_scheduler=lambda opt: build_lr_scheduler(opt, plan))
    start = resume_run(run_dir, plan, "deepspeed", checkpoint_every, lambda ckpt: load_engine(engine, ckpt, plan))
    dp_rank = engine.grid.get_data_parallel_rank()
    if dp_rank == 0:  # one line per stage, so the log shows the cut that ran
        ckpt = [i for i in ours["activation_checkpointing"]["chain_layers"]
                if module._local_start <= i < module._local_stop]
        print(f"pipeline stage {engine.stage_id}: chain layers {module._local_start}..{module._local_stop - 1}, "
              f"checkpointed {ckpt}", flush=True)
    metrics, timer = MetricsWriter(run_dir, plan, device), StepTimer(device)
    recorder = PhaseRecorder(phase_times, steps, device)
    if phase_times:
        wrap_deepspeed_pipe_instructions(engine, recorder)
    for step in range(start, steps):
        timer.start()
        with recorder.step(step):
            # train_batch returns the mean over micro-batches, averaged over dp and broadcast to every stage.
            loss = engine.train_batch(data_iter=micro_batches(dataset, plan, step, dp_rank))
        step_time_s = timer.stop()
        metrics.log(step, float(loss.item()), step_time_s, recorder.take())
        if checkpoint_due(step + 1, steps, checkpoint_every):
            save_engine(engine, run_dir, step + 1, plan)


# Tag of engine.save_checkpoint: its files go to step_<k>/deepspeed/ (no "latest" file: the step is the directory's).
DS_TAG = "deepspeed"


def save_engine(engine, run_dir: Path, step: int, plan: Plan) -> Path:
    """``engine.save_checkpoint`` of the state after ``step`` completed steps inside ``checkpoint.save_checkpoint``'s
    atomic scheme (every rank calls it); the step also goes into DeepSpeed's client state, checked on load."""
    def write(directory: Path) -> None:
        engine.save_checkpoint(str(directory), tag=DS_TAG, client_state={"step": step}, save_latest=False)

    return save_checkpoint(run_dir, step, plan, "deepspeed", write)


def load_engine(engine, ckpt: Checkpoint, plan: Plan) -> None:
    """``engine.load_checkpoint`` of ``ckpt`` (module, optimizer and lr-scheduler states), then this rank's RNG state.

    Raises:
        CheckpointError: DeepSpeed found no checkpoint there, or one of another step.
    """
    load_path, client = engine.load_checkpoint(str(ckpt.path), tag=DS_TAG, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
    if load_path is None or (client or {}).get("step") != ckpt.step:
        raise CheckpointError(
            f"DeepSpeed did not load checkpoint {ckpt.path} (load_checkpoint returned {load_path!r}, step "
            f"{(client or {}).get('step')!r}, expected {ckpt.step}); delete it (rm -r {ckpt.path}) to resume from "
            "the previous one, or launch into a fresh run directory"
        )
    load_rng_state(ckpt, plan)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a paraplan plan with DeepSpeed (run under torchrun).")
    parser.add_argument("--run-dir", required=True, type=Path, help="Directory written by `paraplan launch`.")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        # Without this DeepSpeed still picks its CPU accelerator, but warns on import that it found no GPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    # ZeRO calls torch.distributed's *_into_tensor collectives, which torch flags as deprecated on every call.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (about a minute on first use) that only its
    # inference path calls; training collectives go through torch.distributed, so skip the build.
    # (deepspeed.comm re-exports pytorch as ``torch``, so the module must be fetched by name.)
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    if not torch.cuda.is_available() and hasattr(ds_comm_torch, "build_shm_op"):
        ds_comm_torch.build_shm_op = lambda: None
    plan, spec = load_run(args.run_dir)
    ds_config = read_mapping(args.run_dir / DS_CONFIG_FILE, "DeepSpeed config", LaunchError)
    if plan.train.dtype == "fp16" and not deepspeed.get_accelerator().is_fp16_supported():
        raise LaunchError(
            f"DeepSpeed's {deepspeed.get_accelerator().device_name()} accelerator has no fp16 support on this "
            "machine; re-plan with --dtype bf16 or fp32"
        )
    deepspeed.init_distributed(dist_backend=dist_backend(), verbose=False)
    dataset = build_dataset(plan, spec)
    train = train_pipeline if plan.strategy.pp > 1 else train_flat
    clean = False
    try:
        train(plan, ds_config, dataset, spec.steps, args.run_dir, spec.checkpoint_every, spec.phase_times)
        clean = True
    finally:
        shutdown_distributed(clean)


if __name__ == "__main__":
    main()
