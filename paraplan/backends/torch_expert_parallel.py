"""Expert parallelism (ep) for the native torch backend: each MoE layer's routed experts split over ``ep`` ranks.

GShard's layout (Lepikhin et al. 2021, sec. 2.2-3.1) as Megatron-Core runs it (``parallel_state.py``,
``token_dispatcher.py`` ``MoEAlltoAllTokenDispatcher``): the router and the shared experts stay replicated like any
dense layer; rank ``r`` of an ep group holds experts ``r E/ep .. (r+1) E/ep - 1``. In each MoE layer the model's own
router (transformers' ``mlp.gate``) picks each token's top-k experts and weights; every token copy is sent to the rank
owning its expert (one all-to-all), the local experts run on what arrives, the results go back (a second all-to-all)
and are combined with the routing weights. Both all-to-alls are ``torch.distributed.nn.functional
.all_to_all_single``, whose backward is the reverse all-to-all, so gradients reach the tokens' ranks (and each
expert receives the gradient of every ep rank's loss).

Rank layout (Megatron order): the expert layers refold each pipeline stage's ``dp`` ranks (tp = cp = 1 here) into
``edp x ep`` with ep innermost, so an ep group is ``ep`` consecutive ranks of a data-parallel group and an edp group
the ranks holding the same experts. The world's expert mesh is ``(pp, edp, ep)`` over ranks ``0..world-1`` in order,
matching the dense mesh ``(pp, dp, cp, tp)`` with cp = tp = 1.

Gradients. Every rank's loss is the mean over its own micro-batches, and the data-parallel wrappers average dense
gradients over the ``dp`` ranks: ``(1/dp) sum_r dL_r/dtheta``, the single-process gradient. An expert's gradient
after backward already sums ``dL_r/dtheta`` over its ep group (the all-to-all's backward brings every ep rank's
share), so summing it over the edp group and dividing by ``dp`` gives the same ``(1/dp) sum_r dL_r/dtheta``
(:meth:`ExpertParallel.reduce_gradients`; torchtitan divides its expert gradients by the whole dp degree for the same
reason, ``set_gradient_divide_factor``). The expert tensors are DTensors ``Shard(0)`` over the ep mesh, so the
per-parameter initialization (``torch_native.materialize_stage``), the gradient norm (``train_torch
.global_grad_norm``: each element counted once per edp copy) and DCP checkpoints (whole-model names, each shard a
slice of the full tensor) see them as shards of the full ``(E, ...)`` tensors; the data-parallel wrappers leave them
alone (DDP ignores them, FSDP2 gets them as ``ignored_params``).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn

from paraplan.errors import LaunchError
from paraplan.models.build import BUILDABLE_MOE_MODEL_TYPES, is_expert_parameter
from paraplan.types import Plan

EXPERT_MESH_DIM_NAMES = ("pp", "edp", "ep")


def check_expert_parallel(plan: Plan) -> None:
    """Refuse what the torch backend's expert parallelism does not run, saying what to change.

    Pure (no process group), so the planner can mirror it: with ep > 1 the torch backend needs etp = 1, tp = 1,
    cp = 1 (ep then divides dp: ``Strategy`` checks ep x etp divides dp x cp x tp), ZeRO stage 0, 2 or 3 (ZeRO-1's
    ``ZeroRedundancyOptimizer`` would broadcast one rank's experts over the others), ZeRO 2 or 3 only when
    edp = dp / ep is 1 (the experts' gradients and optimizer states are not sharded over edp, which the plan priced
    as sharded), no offload of model states, and a buildable MoE model (not gpt_oss). Any model with etp > 1 is refused.

    Raises:
        LaunchError: the first rule the plan breaks.
    """
    st, spec = plan.strategy, plan.model
    fix = ("the torch backend runs expert parallelism with tp=1, cp=1, etp=1, ep dividing dp, ZeRO stage 0 "
           "(or 2-3 when ep = dp); plan with --strategy etp=1,tp=1,cp=1")
    if st.etp > 1:
        raise LaunchError(f"etp={st.etp}: the torch backend does not split experts over tensor-parallel ranks; {fix}")
    if st.ep == 1:
        return
    if spec.moe is None:  # Plan refuses it already; kept for plans built around validation
        raise LaunchError(f"ep={st.ep} for {spec.name}, which has no experts; plan with --strategy ep=1")
    if spec.model_type not in BUILDABLE_MOE_MODEL_TYPES:
        raise LaunchError(f"ep={st.ep} for model_type {spec.model_type}: the torch backend builds and runs experts of "
                          f"{', '.join(BUILDABLE_MOE_MODEL_TYPES)} only")
    if st.tp > 1 or st.cp > 1:
        raise LaunchError(f"ep={st.ep} with tp={st.tp}, cp={st.cp}: {fix}")
    if st.zero_stage == 1:
        raise LaunchError(
            f"ep={st.ep} at ZeRO stage 1: ZeroRedundancyOptimizer broadcasts each parameter from one dp rank, which "
            "would overwrite the other ep ranks' experts. Re-plan with --strategy zero=0 (or zero=2/3 with ep=dp)")
    if st.zero_stage >= 2 and st.edp > 1:
        raise LaunchError(
            f"ep={st.ep}, dp={st.dp} at ZeRO stage {st.zero_stage}: the torch backend keeps each expert's gradients "
            f"and optimizer states whole on its edp={st.edp} ranks instead of sharding them as the plan priced. "
            f"Re-plan with --strategy zero=0, or with ep={st.dp} (edp=1)")
    if st.offload_optimizer != "none" or st.offload_param != "none":
        raise LaunchError(f"ep={st.ep} with offloaded model states: the torch backend's expert parallelism keeps "
                          "them on the device; re-plan without offload")


def build_expert_mesh(plan: Plan, device_type: str):
    """The world's ``(pp, edp, ep)`` device mesh (every rank must call it, in the same order: it creates process
    groups). Ranks run ``0..world-1`` in row-major order, so ep groups are consecutive ranks of a data-parallel group
    (the dense mesh is ``(pp, dp, cp, tp)`` with cp = tp = 1, :func:`check_expert_parallel`)."""
    from torch.distributed.device_mesh import init_device_mesh

    st = plan.strategy
    return init_device_mesh(device_type, (st.pp, st.edp, st.ep), mesh_dim_names=EXPERT_MESH_DIM_NAMES)


def _all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int], group) -> torch.Tensor:
    """Autograd-aware all-to-all of rows: ``x (sum(input_splits), h)`` -> ``(sum(output_splits), h)``; rank ``i``
    receives ``input_splits[i]`` rows of this rank, this rank ``output_splits[j]`` rows of rank ``j``."""
    from torch.distributed.nn.functional import all_to_all_single

    out = x.new_empty((sum(output_splits), *x.shape[1:]))
    with warnings.catch_warnings():  # deprecated in favour of a private module (_functional_collectives); still public
        warnings.filterwarnings("ignore", message=r".*all_to_all_single is deprecated", category=FutureWarning)
        return all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)


class ExpertParallelExperts(nn.Module):
    """Drop-in for transformers' routed-experts module of one MoE layer (``MixtralExperts``, ``Qwen3MoeExperts``,
    ``DeepseekV3Experts``, ...): the same call, ``forward(hidden (T, h), top_k_index (T, K) int64, top_k_weights
    (T, K)) -> (T, h)``, and the same parameter names, ``gate_up_proj`` and ``down_proj``, now DTensors ``Shard(0)``
    over the ep mesh: this rank's local tensors ``(E/ep, 2 f_e, h)`` and ``(E/ep, h, f_e)`` hold experts
    ``ep_rank E/ep ..``.

    The local experts compute as transformers' eager loop does (``gate, up = linear(x, gate_up_proj[e]).chunk(2)``,
    ``linear(act(gate) * up, down_proj[e])``, weighted, added into the token's output in expert order), each expert
    taking its rows in the loop's order; at ep = 1 output and gradients equal the unsplit module's bit for bit
    (tests/unit/test_build_moe.py). At ep > 1 an expert's rows come from every ep rank, so only the matmuls' row
    blocking and the weight gradients' summation order differ.
    """

    def __init__(self, experts: nn.Module, ep_mesh) -> None:
        from torch.distributed.tensor import Shard, distribute_tensor

        super().__init__()
        self.num_experts = experts.num_experts
        self.ep = ep_mesh.size()
        self.local_experts = self.num_experts // self.ep
        self.first_expert = ep_mesh.get_local_rank() * self.local_experts
        self.group = ep_mesh.get_group()
        self.act_fn = experts.act_fn
        for name in ("gate_up_proj", "down_proj"):  # src_data_rank=None: each rank slices its own (identical) copy
            full = getattr(experts, name)
            shard = distribute_tensor(full.detach(), ep_mesh, [Shard(0)], src_data_rank=None)
            self.register_parameter(name, nn.Parameter(shard, requires_grad=full.requires_grad))

    def extra_repr(self) -> str:
        return f"experts {self.first_expert}..{self.first_expert + self.local_experts - 1} of {self.num_experts}"

    def forward(self, hidden: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        n, k = top_k_index.shape
        flat = top_k_index.reshape(-1)  # copy i is token i // k's (i % k)-th choice
        # Copies sorted by expert (hence by the rank that owns it), then as transformers' loop takes an expert's
        # rows (torch.where over its (k, n) mask: by choice, then token), so each expert sums its weight gradient
        # over its rows in transformers' order.
        copy = torch.arange(n * k, device=flat.device)
        order = torch.argsort(flat * (n * k) + (copy % k) * n + copy // k)
        tokens = order // k
        with torch.no_grad():
            counts = torch.bincount(flat, minlength=self.num_experts)  # (E,) copies this rank sends each expert
            received = torch.empty_like(counts)  # (ep * E/ep,): copies each rank sends each local expert
            dist.all_to_all_single(received, counts, group=self.group)
        send = counts.view(self.ep, self.local_experts).sum(1).tolist()
        recv = received.view(self.ep, self.local_experts).sum(1).tolist()
        dispatched = _all_to_all(hidden[tokens], recv, send, self.group)
        # Arrivals are grouped by source rank, then by local expert within each source.
        local_ids = torch.repeat_interleave(
            torch.arange(self.local_experts, device=hidden.device).repeat(self.ep), received)
        out = self._local_experts(dispatched, local_ids)
        combined = _all_to_all(out, send, recv, self.group)  # back in ``order``
        weights = top_k_weights.reshape(-1)[order]
        contrib = (combined * weights[:, None]).to(hidden.dtype)
        return torch.zeros_like(hidden).index_add_(0, tokens, contrib)

    def _local_experts(self, x: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """Each arrived row ``x (R, h)`` through its local expert ``local_ids (R,)``; ``(R, h)``.

        Starts from ``x * 0`` rather than zeros so the result depends on ``x`` even when nothing arrived: the
        combining all-to-all's backward must then still run here, as on the ranks it exchanges with.
        """
        gate_up = self.gate_up_proj.to_local().to(x.dtype)  # FSDP2's param_dtype does not reach ignored params
        down = self.down_proj.to_local().to(x.dtype)
        out = x * 0
        for e in range(self.local_experts):
            rows = (local_ids == e).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            gate, up = nn.functional.linear(x[rows], gate_up[e]).chunk(2, dim=-1)
            y = nn.functional.linear(self.act_fn(gate) * up, down[e])
            out.index_copy_(0, rows, y.to(out.dtype))
        return out


class ExpertParallel:
    """This rank's expert-parallel state: the expert parameters it holds and the groups their gradients need.

    Args:
        params: the ``ExpertParallelExperts`` parameters of the rank's chunks (DTensors ``Shard(0)`` over ep).
        edp_group: the process group of the ranks holding the same experts.
        edp: its size, ``dp / ep`` (no communication when 1).
        grad_divisor: ``dp x cp``, the dense gradients' averaging degree.
    """

    def __init__(self, params: list[nn.Parameter], edp_group, edp: int, grad_divisor: int) -> None:
        self.params, self.edp_group, self.edp, self.grad_divisor = params, edp_group, edp, grad_divisor

    @torch.no_grad()
    def reduce_gradients(self) -> None:
        """Sum each expert gradient over the edp group and divide by ``dp x cp`` (module docstring): afterwards it is
        the single-process gradient's slice. Call once per step, after the last backward, before the gradient norm
        and the optimizer step; an expert tensor that received no token gets a zero gradient."""
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            local = p.grad.to_local()
            if self.edp > 1:
                dist.all_reduce(local, group=self.edp_group)
            local.div_(self.grad_divisor)


def apply_ep(stage: nn.Module, ep_mesh) -> list[nn.Parameter]:
    """Replace the routed-experts module of every MoE layer in ``stage`` by :class:`ExpertParallelExperts` over
    ``ep_mesh`` (router, shared experts and everything else untouched).

    Works on meta-device parameters (the shards stay on meta until ``materialize_stage``) and on real ones (each
    rank keeps its slice of the identical full tensors).

    Returns:
        The new expert parameters (two per MoE layer).

    Raises:
        LaunchError: an ``experts`` module without fused ``gate_up_proj``/``down_proj`` tensors, or whose expert count
            the ep degree does not divide.
    """
    params: list[nn.Parameter] = []
    for name, module in list(stage.named_modules()):
        child = getattr(module, "experts", None)
        if not isinstance(child, nn.Module) or isinstance(child, ExpertParallelExperts):
            continue
        names = [f"{name}.experts.{p}" for p, _ in child.named_parameters(recurse=False)]
        if len(names) != 2 or not all(is_expert_parameter(n) for n in names):
            raise LaunchError(f"{name}.experts ({type(child).__name__}) is not a fused gate_up_proj/down_proj experts "
                              "module; the torch backend's expert parallelism runs those only")
        if child.num_experts % ep_mesh.size():
            raise LaunchError(f"ep={ep_mesh.size()} does not divide the {child.num_experts} experts of {name}")
        module.experts = ExpertParallelExperts(child, ep_mesh)
        params += [module.experts.gate_up_proj, module.experts.down_proj]
    return params


def expert_rows(param: torch.Tensor) -> range | None:
    """The experts (rows of the full ``(E, ...)`` tensor) that this rank's shard of an :class:`ExpertParallelExperts`
    parameter holds, or None for any other parameter."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor) or param.device_mesh.mesh_dim_names != ("ep",):
        return None
    local = param.to_local().shape[0]
    start = param.device_mesh.get_local_rank() * local
    return range(start, start + local)
