"""Pieces shared by the built-in trainers (``train_deepspeed``, ``train_torch``) that run under torchrun.

A run directory holds ``plan.json`` (the Plan), ``launch.json`` (the LaunchSpec: steps, data paths) and the
backend's own files. Rank 0 appends one JSON line per step to ``metrics.jsonl``:
``{"step", "loss", "step_time_s", "tokens_per_s", "peak_memory_bytes": [per rank], "restart"}`` (plus
``"peak_reserved_bytes": [per rank]``, torch.cuda.max_memory_reserved, on CUDA; plus ``"phases"`` on the step a
launch with ``phase_times`` profiles: ``{"forward_s", "backward_s", "optimizer_s", "step_s": [per rank],
"comm_s", "comm_count": {kind: [per rank]}}``, see ``paraplan.backends.phases``), where ``restart`` is
torchrun's restart count (``TORCHELASTIC_RESTART_COUNT``, 0 for the first attempt). The file is only appended to:
a job restarted by torchrun or resumed from a checkpoint re-runs the steps after its checkpoint, so a step can have
several rows, told apart by ``restart`` and by their order (the last one counts).

Also the selective recomputation both trainers apply to a plan's ``selective_blocks``, in either of its two policies
(:func:`selective_checkpoint`), and the activation paging they apply to its ``offload_blocks``
(:func:`paged_activations`).
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import time
import weakref
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from paraplan.backends.data import ByteDataset
from paraplan.types import LaunchSpec, Plan

METRICS_FILE = "metrics.jsonl"

# Selective recomputation, two policies (Strategy.selective_policy); they differ in what a block keeps between
# forward and backward and so in what it recomputes.
#
# "attention" (Korthikanti et al. 2022, sec. 4.3): everything autograd would keep is kept, except what the attention
# core (softmax(QK^T / sqrt(d)) V, one SDPA call) keeps: the SDPA call alone runs under non-reentrant checkpointing,
# so its output and softmax statistics are dropped after forward and it is re-run from q, k, v in backward. With a
# fused SDPA kernel that frees little: on a transformers Llama block the output's storage stays alive as the o
# projection's saved input, so what goes is the log-sum-exp, b x heads x s floats (measured, tests/unit). This is
# not done with a selective-checkpoint policy that marks every other op "save": under torch's SAC a saved op caches
# its whole output, including outputs autograd itself would not keep (the o/down projection sums, pre-rotary q/k),
# which on llama-tiny kept 50% more than no checkpointing at all (5.2 vs 3.5 MiB per block at b=2, s=64).
#
# "op": torchtitan's op-level selective AC, as in pytorch/torchtitan torchtitan/models/llama3/infra/parallelize.py
# (commit 81c1243395b46ce693a0681cfe1bb20e9b9433fb) ``_save_list`` and ``_get_custom_policy``: save the outputs of
# the ops in the list below, except every second aten.mm (a per-pass mm counter; the outputs of mms 1, 3, 5, ...
# are saved), and recompute everything else in backward. The save list is torchtitan's (mm, the efficient and flash
# SDPA ops, the functional reduce-scatter, max) plus the cuDNN SDPA op (in torchtitan's later
# ``_op_sac_save_list``) and the CPU flash-attention op (torch's SDPA on CPU), so the attention output is saved on
# every device, as torchtitan saves it on GPUs.
_OP_SAC_SAVE_LIST = frozenset({
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops._c10d_functional.reduce_scatter_tensor.default,
    torch.ops.aten.max.default,
})
SELECTIVE_POLICIES = ("attention", "op")
# The SDPA entry point; compared by identity, so a call is recognised also while context_parallel has replaced the
# name torch.nn.functional.scaled_dot_product_attention with its ring-attention wrapper (which calls this one).
_SDPA = torch._C._nn.scaled_dot_product_attention


def _op_sac_policy(meta: dict[str, int]):
    """torchtitan's ``_get_custom_policy``: ``meta`` counts the mms of the forward and of the recompute pass apart,
    so the same mms are saved in forward and found in the cache in backward."""
    from torch.utils.checkpoint import CheckpointPolicy

    def policy(ctx, func, *args, **kwargs):
        key = "recompute_mm_count" if ctx.is_recompute else "forward_mm_count"
        if func == torch.ops.aten.mm.default:
            meta[key] += 1
        save = func in _OP_SAC_SAVE_LIST and not (func == torch.ops.aten.mm.default and meta[key] % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _op_sac_contexts():
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    return create_selective_checkpoint_contexts(_op_sac_policy(defaultdict(int)))  # fresh counters per forward


class _RecomputeAttentionCore(TorchFunctionMode):
    """Runs every ``F.scaled_dot_product_attention`` call under non-reentrant checkpointing (other calls as they
    are): the call keeps references to q, k, v only, and is re-run in backward."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(func, *args, use_reentrant=False, **kwargs)
        return func(*args, **kwargs)


class AttentionRecomputeWrapper(ActivationWrapper):
    """A block with its attention core recomputed in backward (:class:`_RecomputeAttentionCore`); parameter names
    keep the ``_checkpoint_wrapped_module`` prefix of torch's checkpoint wrapper (stripped in ``state_dict``)."""

    def forward(self, *args, **kwargs):
        with _RecomputeAttentionCore():
            return self._checkpoint_wrapped_module(*args, **kwargs)


def selective_checkpoint(module: torch.nn.Module, policy: str) -> torch.nn.Module:
    """Wrap ``module`` (one block) in selective recomputation.

    Args:
        module: a block mapping hidden ``(b, s, h)`` to hidden ``(b, s, h)``.
        policy: ``attention``: keep what autograd keeps except the attention core's output and softmax statistics,
            re-run the SDPA call in backward (Korthikanti et al. 2022 sec. 4.3). ``op``: torchtitan's op-level
            selective AC (outputs of every other mm, of the SDPA op and of reduce-scatters kept, the rest
            recomputed from the block input).

    Returns:
        The wrapped module; its parameters keep their names under ``_checkpoint_wrapped_module``.

    Raises:
        ValueError: an unknown policy.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    if policy == "attention":
        return AttentionRecomputeWrapper(module)
    if policy == "op":
        return checkpoint_wrapper(module, checkpoint_impl=CheckpointImpl.NO_REENTRANT, context_fn=_op_sac_contexts)
    raise ValueError(f"selective recomputation policy '{policy}': use one of {', '.join(SELECTIVE_POLICIES)}")


def load_run(run_dir: str | Path) -> tuple[Plan, LaunchSpec]:
    run = Path(run_dir)
    plan = Plan.model_validate_json((run / "plan.json").read_text())
    spec = LaunchSpec.model_validate_json((run / "launch.json").read_text())
    return plan, spec


def build_dataset(plan: Plan, spec: LaunchSpec) -> ByteDataset:
    return ByteDataset([Path(p) for p in spec.data_paths], plan.train.seq_len, seed=plan.train.seed)


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of step ``step`` (from 0): linear warmup ``min(1, (step + 1) / warmup_steps)``, so
    the first step already trains and step ``warmup_steps - 1`` reaches the full lr; 1 when ``warmup_steps`` is 0."""
    return 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)


def build_lr_scheduler(optimizer: torch.optim.Optimizer, plan: Plan) -> torch.optim.lr_scheduler.LambdaLR:
    """``plan.train.warmup_steps`` of linear warmup to ``plan.train.lr`` (:func:`warmup_factor`), then constant;
    stepped once per optimizer step. Both trainers use it (DeepSpeed through ``deepspeed.initialize``'s
    ``lr_scheduler``), and its ``state_dict`` goes into checkpoints."""
    warmup = plan.train.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_factor(step, warmup))


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
        self.restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def log(self, step: int, loss: float, step_time_s: float, phases: dict | None = None, **extra: float) -> None:
        """Record one step. ``loss`` must already be the global-batch mean (identical on every rank that logs).

        ``extra`` values (for example ``grad_norm``) are appended to the row as rank 0 passes them; ``phases``, this
        rank's phase times of a profiled step (``phases.PhaseRecorder.take``), are gathered from every rank into the
        row's ``"phases"`` (``phases.merge_rank_phases``) when rank 0 has them.
        """
        mem = peak_memory_bytes(self.device)
        # What the caching allocator holds (what an out-of-memory error counts); CUDA only.
        reserved = int(torch.cuda.max_memory_reserved(self.device)) if self.device.type == "cuda" else None
        mems: list[int] = [mem]
        reserveds: list[int | None] = [reserved]
        rank_phases: list[dict | None] = [phases]
        if dist.is_initialized():
            gathered: list[tuple[int, int | None, dict | None] | None] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, (mem, reserved, phases))
            mems = [int(g[0]) if g else 0 for g in gathered]
            reserveds = [g[1] if g else None for g in gathered]
            rank_phases = [g[2] if g else None for g in gathered]
        if phases is not None:
            from paraplan.backends.phases import merge_rank_phases

            extra = {**extra, "phases": merge_rank_phases(rank_phases)}
        if reserved is not None:
            extra = {**extra, "peak_reserved_bytes": [int(r or 0) for r in reserveds]}
        if self.rank == 0:
            row = {
                "step": step, "loss": loss, "step_time_s": step_time_s,
                "tokens_per_s": self.tokens_per_step / step_time_s if step_time_s > 0 else 0.0,
                "peak_memory_bytes": mems, "restart": self.restart, **extra,
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


# Activation paging (POET, Patil et al. ICML 2022, "POET: Training Neural Networks on Tiny Devices with Integrated
# Rematerialization and Paging", sec. 3: a block's saved activations are paged out after its forward and paged back
# in for its backward, instead of being kept or recomputed). Built on torch's saved-tensor hooks
# (https://pytorch.org/docs/stable/autograd.html#hooks-for-saved-tensors, torch.autograd.graph.saved_tensors_hooks):
# ``pack`` runs when autograd saves a tensor for backward and its result is what autograd keeps; ``unpack`` runs when
# the backward needs the tensor. Tensors smaller than PAGE_MIN_BYTES stay in memory: a norm's per-token statistics
# (b x s floats) would cost a file or a host copy each for little memory (PLATFORM.md: skip small tensors).
ACTIVATION_TIERS = ("cpu", "nvme")
PAGE_MIN_BYTES = 64 * 1024
_PAGE_IDS = itertools.count()  # one counter for every block of the process: their files may share a directory


class _Page:
    """One storage paged out: a pinned host copy (tier cpu) or a file written with ``torch.save`` (tier nvme).

    Paged per storage, not per tensor: a Llama block saves its normed input three times (views for q, k and v), and
    a page per saved tensor would copy it three times. The file goes when autograd releases the last saved tensor on
    it (right after the backward that used it, or with a graph dropped without backward, so an aborted step leaves no
    file); a storage read back is shared by the saved tensors unpacked while it lives.
    """

    __slots__ = ("device", "host", "path", "restored", "__weakref__")

    def __init__(self, storage: torch.UntypedStorage, device: torch.device, path: Path | None) -> None:
        flat = torch.empty(0, dtype=torch.uint8, device=device).set_(storage)  # the storage's bytes
        self.device, self.path, self.host, self.restored = device, path, None, None
        if path is None:  # torch.autograd.graph.save_on_cpu's copy, pinned for an asynchronous copy back
            self.host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=torch.cuda.is_available())
            self.host.copy_(flat)
        else:
            torch.save(flat, path)
            weakref.finalize(self, path.unlink, missing_ok=True)

    def tensor(self, dtype: torch.dtype, size, stride, offset: int) -> torch.Tensor:
        flat = self.restored() if self.restored is not None else None
        if flat is None:
            if self.host is not None:
                flat = self.host.to(self.device, non_blocking=True)
            else:
                flat = torch.load(self.path, map_location=self.device, weights_only=True)
            self.restored = weakref.ref(flat)  # alive while a view below is
        return flat.view(dtype).as_strided(size, stride, offset)


class _Pager:
    """The pack/unpack pair of one tier. Pages are independent of each other, so any number of forwards
    (micro-batches of a pipeline schedule) may be in flight and their backwards may run in any order."""

    def __init__(self, tier: str, directory: Path | None, min_bytes: int) -> None:
        if tier not in ACTIVATION_TIERS:
            raise ValueError(f"activation tier '{tier}': use one of {', '.join(ACTIVATION_TIERS)}")
        if tier == "nvme":
            if directory is None:
                raise ValueError("activation tier 'nvme' needs a directory for the paged tensors")
            directory.mkdir(parents=True, exist_ok=True)
        self.tier, self.directory, self.min_bytes = tier, directory, min_bytes
        self.param_storages: set[int] = set()  # data_ptr of each parameter storage of the block, set per forward
        # data_ptr -> (storage, its version, page) of the storages paged in this forward, all weak.
        self.pages: dict[int, tuple[StorageWeakRef, int, weakref.ref]] = {}
        self.paged_bytes = 0  # bytes paged out so far (tests and benchmarks read it)

    def start_forward(self, module: torch.nn.Module) -> None:
        # FSDP2 swaps in the unsharded parameters before each forward, so they are read here, not once.
        self.param_storages = {p.untyped_storage().data_ptr() for p in module.parameters()
                               if not is_traceable_wrapper_subclass(p)}
        self.pages = {}

    def _keep(self, t: torch.Tensor) -> bool:
        """Parameters (and views of them, such as the transposed weight a linear saves) stay: they are alive anyway."""
        if isinstance(t, torch.nn.Parameter) or isinstance(t._base, torch.nn.Parameter):
            return True
        if t.layout != torch.strided or t.numel() * t.element_size() < self.min_bytes:
            return True
        if self.tier == "cpu" and t.device.type == "cpu":  # host memory is the device's memory: nothing to gain
            return True
        return t.untyped_storage().data_ptr() in self.param_storages

    def _page(self, t: torch.Tensor) -> _Page:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        hit = self.pages.get(key)
        page = hit[2]() if hit is not None and not hit[0].expired() and hit[1] == t._version else None
        if page is None:
            path = None if self.tier == "cpu" else self.directory / f"{os.getpid()}-{next(_PAGE_IDS)}.pt"
            page = _Page(storage, t.device, path)
            self.pages[key] = (StorageWeakRef(storage), t._version, weakref.ref(page))
            self.paged_bytes += storage.nbytes()
        return page

    def pack(self, t: torch.Tensor):
        # Nothing packed holds ``t`` itself: a saved output would hold its own grad_fn, a cycle autograd never frees
        # (torch's saved_tensors_hooks warning), so kept tensors are detached.
        if is_traceable_wrapper_subclass(t):  # DTensor (tensor parallelism): page its local shard
            if isinstance(t, torch.nn.Parameter):
                return ("keep", t.detach())
            names, ctx = t.__tensor_flatten__()
            inner = {n: self.pack(getattr(t, n)) for n in names}
            return ("subclass", type(t), inner, ctx, t.size(), t.stride())
        if self._keep(t):
            return ("keep", t.detach())
        return ("page", self._page(t), t.dtype, t.size(), t.stride(), t.storage_offset())

    def unpack(self, packed) -> torch.Tensor:
        if packed[0] == "keep":
            return packed[1]
        if packed[0] == "page":
            return packed[1].tensor(*packed[2:])
        _, cls, inner, ctx, size, stride = packed
        return cls.__tensor_unflatten__({n: self.unpack(p) for n, p in inner.items()}, ctx, size, stride)


class PagedActivationWrapper(ActivationWrapper):
    """A block whose saved activations are paged out in forward and back in for backward (:func:`paged_activations`);
    parameter names keep the ``_checkpoint_wrapped_module`` prefix of torch's checkpoint wrapper (stripped in
    ``state_dict``)."""

    def __init__(self, mod: torch.nn.Module, pager: _Pager) -> None:
        super().__init__(mod)
        self.pager = pager

    def forward(self, *args, **kwargs):
        self.pager.start_forward(self._checkpoint_wrapped_module)
        with torch.autograd.graph.saved_tensors_hooks(self.pager.pack, self.pager.unpack):
            return self._checkpoint_wrapped_module(*args, **kwargs)


def paged_activations(module: torch.nn.Module, tier: str, directory: Path | None = None,
                      min_bytes: int = PAGE_MIN_BYTES) -> torch.nn.Module:
    """Wrap ``module`` (one block) so the tensors autograd saves for its backward are paged out (POET, Patil et al.
    2022 sec. 3), with torch's saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``).

    Outputs and gradients are those of the unwrapped module: the paged tensors come back bit for bit. Parameters and
    views of them, tensors under ``min_bytes`` and non-strided tensors stay in memory; a DTensor pages its local shard.

    Args:
        module: a block mapping hidden ``(b, s, h)`` to hidden ``(b, s, h)``.
        tier: ``cpu``: copy each saved tensor to host memory (pinned when CUDA is present; the copy of
            ``torch.autograd.graph.save_on_cpu``) and back to its device in backward; on a CPU device that would be
            a copy within the same memory, so CPU tensors stay. ``nvme``: write each saved storage to its own file
            under ``directory`` with ``torch.save``, read it back with ``torch.load`` in backward; the file is
            deleted when autograd releases the tensors on it (right after the backward that used them).
            Either tier pages a storage once per forward however many saved tensors view it.
        directory: where tier ``nvme`` writes (created if missing); files are named ``<pid>-<n>.pt``.
        min_bytes: tensors smaller than this many bytes stay in memory (default PAGE_MIN_BYTES, 64 KiB).

    Returns:
        The wrapped module; its parameters keep their names under ``_checkpoint_wrapped_module``.

    Raises:
        ValueError: an unknown tier, or tier ``nvme`` without a directory.
    """
    return PagedActivationWrapper(module, _Pager(tier, Path(directory) if directory else None, min_bytes))
