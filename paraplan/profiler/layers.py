"""Measure per-layer-type costs: forward and backward time, FLOPs, parameter, activation and output bytes.

The chain ``[embed, block_0 .. block_{L-1}, head]`` has three layer types; the blocks are identical, so only
``block_0`` is measured. Each layer is built alone on the profiling device with random weights, fed a random input
of the shape the previous layer type produces, and run forward and backward:

- one pass under ``torch.utils.flop_counter.FlopCounterMode`` and ``torch.autograd.graph.saved_tensors_hooks``
  counts FLOPs and the bytes autograd saves for backward;
- ``warmup`` untimed and ``repeats`` timed passes give the median forward and backward times.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from paraplan.catalog import host_memory_bytes
from paraplan.errors import ProfileError
from paraplan.models.build import build_layer, build_model, first_embedding, lm_loss, torch_dtype
from paraplan.profiler.links import device_name, profile_links, resolve_device
from paraplan.types import DTYPE_BYTES, LayerKind, LayerProfile, ModelProfile, ModelSpec
from paraplan.units import format_bytes

LAYER_KINDS: tuple[LayerKind, ...] = ("embed", "block", "head")
_SEED = 0

ProgressFn = Callable[[str, int, int], None]


def profile_model(
    spec: ModelSpec,
    micro_batch_sizes: list[int],
    seq_len: int,
    dtype: str = "fp32",
    device: str | None = None,
    warmup: int = 2,
    repeats: int = 5,
    progress: ProgressFn | None = None,
    links: bool = True,
) -> ModelProfile:
    """Profile each layer type of ``spec`` (embed, one block, head) at each micro-batch size on one device.

    Each layer is built alone (random weights from seed 0, parameters in ``dtype``; the caller's RNG state is
    restored afterwards). Inputs: tokens ``(b, s)`` int64 for the embedding; hidden states shaped like the previous
    layer type's output, with ``requires_grad``, for the block and the head. The head's forward includes the LM loss
    (:func:`paraplan.models.lm_loss` against random targets), so its backward is the one training runs. Backward is
    driven by a random output gradient (embed, block) or by the loss (head); parameter gradients are reset to None
    before every pass.

    What each :class:`LayerProfile` field measures:

    - ``fwd_time_s`` / ``bwd_time_s``: median over ``repeats`` timed passes after ``warmup`` untimed ones (CUDA
      events after a device synchronize on GPU, ``time.perf_counter`` on CPU).
    - ``param_count`` / ``param_bytes``: the parameters of this one layer. A tied LM head is built untied, so the
      shared matrix is counted in both ``embed`` and ``head``.
    - ``activation_bytes``: bytes of the tensors autograd saves for backward during one forward, taken from
      ``saved_tensors_hooks``; each distinct storage is counted once, at its full size. Not counted: the layer's
      parameters and buffers, and the layer's input (and the head's targets), which the caller holds anyway.
      Inside a chain that input is the previous layer's output, so a stage of ``k`` blocks keeps at most
      ``k * (activation_bytes + output_bytes)`` (plus what it receives): whether a block saves its input depends
      on the dtype (a llama block in fp32 saves it for its first RMSNorm; in bf16 the norm saves an fp32 copy
      instead, which is counted). Tensors a custom autograd Function stashes on ``ctx`` outside
      ``save_for_backward`` are not seen.
    - ``output_bytes``: the layer's output tensor (logits for the head), the tensor sent between pipeline stages.
    - ``fwd_flops`` / ``bwd_flops``: ``FlopCounterMode`` totals. It counts matrix multiplies (2 FLOPs per
      multiply-add) and attention, not element-wise ops; attention is counted over the full ``s x s`` score matrix
      even when causal. torch has no formula for the CPU flash-attention kernel, so this module adds torch's own
      SDPA formulas for it (see :func:`sdpa_forward_flops`), making CPU and GPU counts agree.

    Args:
        spec: the model; for family ``custom`` the whole chain is built with its factory and
            ``embed``, ``blocks[0]`` and ``head`` are taken from it.
        micro_batch_sizes: sequences per micro-batch b to profile, each > 0 (duplicates are ignored).
        seq_len: tokens per sequence s, at most ``spec.max_seq_len``.
        dtype: parameter and compute dtype: ``fp32``, ``bf16`` or ``fp16``.
        device: ``cuda``, ``cuda:N`` or ``cpu``; None picks CUDA when available, else CPU.
        warmup: untimed passes per (layer, micro-batch) before timing, >= 0.
        repeats: timed passes per (layer, micro-batch), >= 1; times are their median.
        progress: called as ``progress(description, done, total)`` after each (layer, micro-batch) measurement.
        links: also measure data links (:func:`paraplan.profiler.profile_links`), a few seconds.

    Returns:
        A :class:`ModelProfile` with one :class:`LayerProfile` per (layer kind, micro-batch size), ordered by kind
        (embed, block, head) then micro-batch size; on CPU its ``cpu_threads`` is ``torch.get_num_threads()``
        during profiling (None on GPU).

    Raises:
        ProfileError: a Mixture-of-Experts model, an empty or invalid micro-batch list, a bad ``seq_len``, ``dtype``, ``warmup``, ``repeats`` or
            device, a custom chain without blocks or vocabulary, a layer that needs more memory than the device
            has free (:func:`check_profile_memory`, before anything is allocated), or one that runs out of it.
    """
    mbs = _check_args(spec, micro_batch_sizes, seq_len, dtype, warmup, repeats)
    dev = resolve_device(device)
    check_profile_memory(spec, max(mbs), seq_len, dtype, dev)
    total = len(LAYER_KINDS) * len(mbs)
    results: list[LayerProfile] = []
    # Shape and dtype of each micro-batch's input to the next layer type; starts as the token batch.
    inputs: dict[int, tuple[torch.Size, torch.dtype]] = {mb: (torch.Size((mb, seq_len)), torch.int64) for mb in mbs}
    rng_devices = [dev.index] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(_SEED)
        source = _LayerSource(spec, dev, torch_dtype(dtype))
        for kind in LAYER_KINDS:
            layer = source.build(kind)
            vocab = _vocab(spec, layer) if kind == "embed" else 0
            for mb in mbs:
                shape, in_dtype = inputs[mb]
                try:
                    lp, out_meta = _profile_one(kind, layer, shape, in_dtype, vocab, dev, warmup, repeats)
                except torch.OutOfMemoryError as exc:
                    raise ProfileError(
                        f"{kind} at micro-batch {mb}, seq_len {seq_len} ({dtype}) does not fit in memory on {dev}; "
                        "profile smaller micro-batch sizes or a shorter seq_len"
                    ) from exc
                results.append(lp)
                inputs[mb] = out_meta
                if progress is not None:
                    progress(f"{kind} (micro-batch {mb})", len(results), total)
            del layer
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    link_profiles = profile_links(dev) if links else []
    return ModelProfile(
        model=spec, device_name=device_name(dev), device_kind=dev.type, dtype=dtype, seq_len=seq_len,
        warmup=warmup, repeats=repeats, cpu_threads=torch.get_num_threads() if dev.type == "cpu" else None,
        layers=results, links=link_profiles,
    )


def available_memory_bytes(dev: torch.device) -> float:
    """Memory a profile may use on ``dev``: free CUDA memory (``torch.cuda.mem_get_info``), or on CPU the
    kernel's ``MemAvailable`` estimate (``/proc/meminfo``; physical memory where that file does not exist)."""
    if dev.type == "cuda":
        return float(torch.cuda.mem_get_info(dev)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return host_memory_bytes()


def profile_memory_lower_bound(spec: ModelSpec, micro_batch_size: int, seq_len: int, dtype: str) -> dict[str, float]:
    """A lower bound on the bytes profiling each layer kind needs, from modules built on the meta device.

    Formula: per layer kind, ``2 P x dtype_bytes`` (weights and their gradients) plus the layer's output and its
    gradient, ``2 b s w x dtype_bytes`` with ``w`` the output width (hidden for embed and block, vocab for the
    head, whose fp32 loss adds ``4 b s v`` more). Saved activations come on top, so the true need is larger.
    Returns ``{}`` for a factory model (its layers are only known by building them).
    """
    if spec.family == "custom" or spec.hidden is None or spec.vocab is None:
        return {}
    nbytes = DTYPE_BYTES[dtype]
    tokens = micro_batch_size * seq_len
    need: dict[str, float] = {}
    with torch.device("meta"):
        for kind in LAYER_KINDS:
            params = sum(p.numel() for p in build_layer(spec, kind, 0).parameters())
            width = spec.vocab if kind == "head" else spec.hidden
            need[kind] = 2 * params * nbytes + 2 * tokens * width * nbytes + (4 * tokens * width if kind == "head"
                                                                              else 0)
    return need


def check_profile_memory(spec: ModelSpec, micro_batch_size: int, seq_len: int, dtype: str, dev: torch.device) -> None:
    """Refuse to start a profile whose largest layer cannot fit in the memory ``dev`` has free.

    Raises:
        ProfileError: :func:`profile_memory_lower_bound` of some layer kind exceeds
            :func:`available_memory_bytes`; the message gives both and what to change.
    """
    need = profile_memory_lower_bound(spec, micro_batch_size, seq_len, dtype)
    if not need:
        return
    kind, most = max(need.items(), key=lambda kv: kv[1])
    free = available_memory_bytes(dev)
    if most > free:
        raise ProfileError(
            f"profiling {spec.name} needs at least {format_bytes(most)} for its {kind} layer alone (weights and "
            f"gradients in {dtype}, micro-batch {micro_batch_size} x seq {seq_len}) but {dev} has "
            f"{format_bytes(free)} free. Profile on a device with more memory, in a 16-bit --dtype, with smaller "
            "--micro-batches or --seq-len, or plan without --profile (costs from FLOPs and the device catalog)"
        )


def _check_args(
    spec: ModelSpec, micro_batch_sizes: list[int], seq_len: int, dtype: str, warmup: int, repeats: int
) -> list[int]:
    """Validated, sorted, distinct micro-batch sizes."""
    if spec.moe is not None:
        raise ProfileError(f"{spec.name} is a Mixture-of-Experts model: profiling it is not supported (a profile times "
                           "one block kind, and its routed experts' time depends on ep); plan and estimate it with "
                           "the analytic model, without --profile")
    if not micro_batch_sizes:
        raise ProfileError("no micro-batch sizes given; profile at least one, e.g. 1,2,4")
    bad = [b for b in micro_batch_sizes if isinstance(b, bool) or not isinstance(b, int) or b <= 0]
    if bad:
        raise ProfileError(f"micro-batch sizes must be positive integers; got {bad}; use e.g. 1,2,4")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ProfileError(f"seq_len must be a positive integer, got {seq_len!r}")
    if seq_len > spec.max_seq_len:
        raise ProfileError(
            f"seq_len {seq_len} exceeds {spec.name}'s max_seq_len {spec.max_seq_len}; use seq_len <= "
            f"{spec.max_seq_len} (or raise max_seq_len in the model file)"
        )
    if dtype not in DTYPE_BYTES:
        raise ProfileError(f"dtype '{dtype}' is not supported; use one of {', '.join(DTYPE_BYTES)}")
    if warmup < 0:
        raise ProfileError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ProfileError(f"repeats must be >= 1, got {repeats}")
    return sorted(set(micro_batch_sizes))


class _LayerSource:
    """Builds one layer of each kind on ``device`` in ``dtype``; a custom chain is built once and cut."""

    def __init__(self, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> None:
        self.spec, self.device, self.dtype = spec, device, dtype
        self._cut: dict[str, nn.Module] = {}
        if spec.family == "custom":
            chain = build_model(spec, device=device, seed=None)
            if len(chain.blocks) == 0:
                raise ProfileError(f"factory '{spec.factory}' returned a chain without blocks; it needs at least one")
            # Keep only the three layers profiled; the other blocks are freed when ``chain`` goes.
            self._cut = {"embed": chain.embed, "block": chain.blocks[0], "head": chain.head}

    def build(self, kind: LayerKind) -> nn.Module:
        """The layer of ``kind`` (each kind once: a custom chain's layer is handed over, not copied)."""
        if self.spec.family == "custom":
            layer = self._cut.pop(kind)
        else:
            with torch.device(self.device):
                layer = build_layer(self.spec, kind, 0)
        return layer.to(device=self.device, dtype=self.dtype).train()


def _vocab(spec: ModelSpec, embed: nn.Module) -> int:
    """Token ids are drawn from ``[0, vocab)``: ``spec.vocab``, else the embedding layer's first nn.Embedding."""
    if spec.vocab is not None:
        return spec.vocab
    embedding = first_embedding(embed)
    if embedding is not None:
        return embedding.num_embeddings
    raise ProfileError(f"cannot tell the vocabulary size of '{spec.name}': set vocab in the model file")


class _Case:
    """One layer with its input; ``forward`` returns (output, tensor to backpropagate from)."""

    def __init__(self, kind: LayerKind, layer: nn.Module, x: torch.Tensor) -> None:
        self.kind, self.layer, self.x = kind, layer, x
        self.targets: torch.Tensor | None = None
        self.grad_out: torch.Tensor | None = None
        self.kept_ptrs = {t.untyped_storage().data_ptr() for t in (*layer.parameters(), *layer.buffers(), x)}

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.layer(self.x)
        if self.kind != "head":
            return out, out
        if self.targets is None:
            self.targets = torch.randint(0, out.shape[-1], out.shape[:-1], device=out.device)
            self.kept_ptrs.add(self.targets.untyped_storage().data_ptr())
        return out, lm_loss(out, self.targets)

    def backward(self, root: torch.Tensor) -> None:
        if root.dim() == 0:
            root.backward()
            return
        if self.grad_out is None:
            self.grad_out = torch.randn_like(root)
        root.backward(self.grad_out)

    def reset_grads(self) -> None:
        self.layer.zero_grad(set_to_none=True)
        self.x.grad = None


def _profile_one(
    kind: LayerKind, layer: nn.Module, in_shape: torch.Size, in_dtype: torch.dtype, vocab: int,
    device: torch.device, warmup: int, repeats: int,
) -> tuple[LayerProfile, tuple[torch.Size, torch.dtype]]:
    """Profile ``layer`` on one input; also returns its output's shape and dtype (the next layer's input)."""
    if kind == "embed":
        x = torch.randint(0, vocab, in_shape, device=device)
    elif in_dtype.is_floating_point:
        x = torch.randn(in_shape, dtype=in_dtype, device=device, requires_grad=True)
    else:
        raise ProfileError(
            f"the previous layer returns {in_dtype}, but the {kind} takes hidden states; each layer of a custom "
            "chain after the embedding must return a floating-point tensor"
        )
    case = _Case(kind, layer, x)
    counts = _count(case)
    fwd_times, bwd_times = [], []
    for i in range(warmup + repeats):
        case.reset_grads()
        (_, root), fwd_s = _timed(case.forward, device)
        _, bwd_s = _timed(functools.partial(case.backward, root), device)
        del root
        if i >= warmup:
            fwd_times.append(fwd_s)
            bwd_times.append(bwd_s)
    case.reset_grads()
    params = list(layer.parameters())
    lp = LayerProfile(
        kind=kind, micro_batch_size=in_shape[0], fwd_time_s=statistics.median(fwd_times),
        bwd_time_s=statistics.median(bwd_times), param_count=sum(p.numel() for p in params),
        param_bytes=sum(p.numel() * p.element_size() for p in params), activation_bytes=counts.activation_bytes,
        output_bytes=counts.output_bytes, fwd_flops=counts.fwd_flops, bwd_flops=counts.bwd_flops,
    )
    return lp, (counts.output_shape, counts.output_dtype)


class _Counts(NamedTuple):
    activation_bytes: int
    output_bytes: int
    fwd_flops: float
    bwd_flops: float
    output_shape: torch.Size
    output_dtype: torch.dtype


def _count(case: _Case) -> _Counts:
    """One forward and backward, counting FLOPs and the bytes autograd saves (see :func:`profile_model`)."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse or other storage-less tensors: nothing to count
            return t
        ptr = storage.data_ptr()
        if ptr not in case.kept_ptrs:
            saved[ptr] = storage.nbytes()
        return t

    case.reset_grads()
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as fwd_counter:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out, root = case.forward()
    output_bytes, output_shape, output_dtype = out.numel() * out.element_size(), out.shape, out.dtype
    del out
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as bwd_counter:
        case.backward(root)
    return _Counts(
        activation_bytes=sum(saved.values()), output_bytes=output_bytes,
        fwd_flops=float(fwd_counter.get_total_flops()), bwd_flops=float(bwd_counter.get_total_flops()),
        output_shape=output_shape, output_dtype=output_dtype,
    )


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float]:
    """``(fn(), seconds)``; on CUDA measured with events after draining the device."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        end.synchronize()
        return result, start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - t0


def sdpa_forward_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of scaled dot-product attention forward, as torch counts its CUDA kernels.

    Formula: ``2 b a s_q s_k d_q`` (scores ``Q K^T``) ``+ 2 b a s_q s_k d_v`` (``P V``); ``4 b a s^2 d`` when
    ``s_q = s_k = s`` and ``d_q = d_v = d``.
    Source: ``torch.utils.flop_counter.sdpa_flop_count`` (two batched matmuls, 2 FLOPs per multiply-add).
    Assumptions: query shape ``(b, a, s_q, d_q)`` with a query heads (grouped key/value heads are broadcast, so
    they cost as many FLOPs as a); the causal mask is ignored, as torch does.
    """
    b, a, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * a * s_q * s_k * d_q + 2 * b * a * s_q * s_k * d_v


def sdpa_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of scaled dot-product attention backward, as torch counts its CUDA kernels.

    Formula: five batched matmuls: recompute ``Q K^T`` (``2 b a s_q s_k d_q``), ``dP = dO V^T`` and
    ``dV = P^T dO`` (``2 b a s_q s_k d_v`` each), ``dQ = dS K`` and ``dK = dS^T Q`` (``2 b a s_q s_k d_q`` each);
    ``10 b a s^2 d`` = 2.5x the forward when ``s_q = s_k`` and ``d_q = d_v``.
    Source: ``torch.utils.flop_counter.sdpa_backward_flop_count``.
    Assumptions: as :func:`sdpa_forward_flops`.
    """
    b, a, s_q, d_q = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * a * s_q * s_k * (3 * d_q + 2 * d_v)


def _extra_flop_formulas() -> dict[object, Callable[..., int]]:
    """Formulas for attention kernels torch's flop counter lacks (the CPU flash kernel as of torch 2.13)."""
    aten = torch.ops.aten
    extra: dict[object, Callable[..., int]] = {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", sdpa_forward_flops),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", sdpa_backward_flops)):
        op = getattr(aten, name, None)
        if op is not None and op not in flop_counter.flop_registry:
            extra[op] = formula
    return extra


EXTRA_FLOP_FORMULAS = _extra_flop_formulas()
