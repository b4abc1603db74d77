"""``plan --explain`` and ``paraplan explain``: why this plan, and what another one would change and cost.

The chosen plan is re-priced stage by stage with the planner's own cost model (:class:`CandidateCosts`, the numbers
the MILP optimized), and its step time is split into components that add up to it exactly:

    step = sum over components = m x mean_s(t_s split by component) + bubble + max_s(extras_s)

where ``t_s`` is stage s's time per micro-batch, split into compute kernels, recomputation, exposed TP/CP
collectives, expert all-to-alls, pipeline send/receive and the part of a transfer channel (ZeRO traffic, host<->device,
NVMe) that exceeds compute when the channels overlap (their whole time when they do not: CPU/gloo); ``bubble`` is the
pipeline time beyond ``m x mean_s t_s`` (:func:`costs.step_time_s`), ``extras`` the slowest stage's exposed DP/ZeRO
reduction, optimizer step and offload work. The largest component is the plan's bottleneck.

Compared strategies (``--compare "dp=8,tp=1,zero=3"``, the ``--strategy`` syntax) start from the chosen plan: every
key not named keeps the plan's value, dp (when not named) fills the devices the named degrees leave, and settings the
new degrees cannot carry fall back (pipeline schedule and vpp without a pipeline, sp without tp, parameter offload
without ZeRO-3). They are priced by :func:`estimate_strategy`, every block recomputed alike; the next-best plans
come from the search (``plan --top``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Optional

import typer

from paraplan.cost_models.costs import CandidateCosts, CostOptions, Mode, StageCost, predict, step_time_s
from paraplan.cost_models.estimate import (
    StrategySpec, dense_blocks_per_rank, estimate_strategy, rank_blocks, validate_strategy,
)
from paraplan.cost_models.links import calibrate_cluster
from paraplan.errors import StrategyError
from paraplan.types import ClusterSpec, ModelProfile, ModelSpec, Plan, TrainSpec
from paraplan.units import format_bytes, format_seconds

# Step-time components, in the order they are shown; ``tp_comm``'s label names the degrees the strategy uses.
# Short names for the table's rows.
SHORT: dict[str, str] = {
    "compute": "compute", "recompute": "recomputation", "tp_comm": "TP/CP comm (exposed)", "ep_comm": "EP all-to-all",
    "p2p": "pipeline p2p", "bubble": "pipeline bubble", "dp_comm": "DP/ZeRO comm (exposed)",
    "optimizer": "optimizer step", "offload": "offload",
}
COMPONENTS: dict[str, str] = {
    "compute": "compute (forward + backward kernels)",
    "recompute": "recomputation",
    "tp_comm": "exposed tensor-/context-parallel communication",
    "ep_comm": "expert-parallel all-to-all",
    "p2p": "pipeline send/receive",
    "bubble": "pipeline bubble",
    "dp_comm": "exposed data-parallel / ZeRO communication",
    "optimizer": "optimizer step",
    "offload": "offload (host/NVMe transfers, CPU optimizer)",
}
TIER_NAMES = {"device": "device memory", "host": "host memory", "nvme": "NVMe"}
# Relative step-time mismatch above which a re-priced plan is said not to match its file (another cost-model
# version, a missing profile): its recorded coarse breakdown is shown instead.
REPRICE_TOLERANCE = 1e-6
DEFAULT_MEMORY_FRACTION = 0.95  # plan's --memory-fraction default: the planner's usable share of device memory


@dataclass(frozen=True)
class TierUse:
    """Bytes per device one memory tier holds on its most loaded stage, against its capacity per device."""

    tier: str  # device, host or nvme
    used_bytes: float
    capacity_bytes: float
    stage: int

    @property
    def headroom_bytes(self) -> float:
        return self.capacity_bytes - self.used_bytes

    @property
    def headroom_fraction(self) -> float:
        return self.headroom_bytes / self.capacity_bytes if self.capacity_bytes > 0 else float("-inf")

    def to_json(self) -> dict:
        return {"tier": self.tier, "stage": self.stage, "used_bytes": self.used_bytes,
                "capacity_bytes": self.capacity_bytes, "headroom_bytes": self.headroom_bytes,
                "headroom_fraction": self.headroom_fraction}


@dataclass(frozen=True)
class Priced:
    """One strategy priced by the cost model: step-time components (seconds per step, summing to ``step_time_s``),
    memory per tier, and the settings shown when strategies are compared (display strings)."""

    label: str  # "chosen plan", "#2" (the search's second best)... or "compare 1"...
    settings: dict[str, str]
    step_time_s: float
    components_s: dict[str, float]
    tiers: list[TierUse]
    tokens_per_s: float
    mfu: float | None  # None on CPU clusters (their catalog peak is nominal)
    exact: bool = True  # components from the re-priced stages (False: the plan file's coarse breakdown)
    notes: list[str] = field(default_factory=list)
    text: str = ""  # the --compare text of a compared strategy
    backend: str | None = None  # the backend cost profile it was priced under (CostOptions.backend)

    @property
    def device(self) -> TierUse:
        return self.tiers[0]

    @property
    def overflows(self) -> list[TierUse]:
        return [t for t in self.tiers if t.used_bytes > t.capacity_bytes]

    @property
    def fits(self) -> bool:
        return not self.overflows

    def binding(self) -> TierUse:
        """The tier in use with the least relative headroom (the most overflowing one when it does not fit)."""
        used = [t for t in self.tiers if t.used_bytes > 0] or self.tiers[:1]
        return min(used, key=lambda t: t.headroom_fraction)

    def bottleneck(self) -> tuple[str, float]:
        """(component, seconds) of the largest step-time component."""
        return max(self.components_s.items(), key=lambda kv: kv[1])


# ---- pricing ---------------------------------------------------------------------------------------------------
def _stage_components(costs: CandidateCosts, stage: int, sc: StageCost, n: int, r: int, q: int, d: int
                      ) -> dict[str, float]:
    """Stage ``stage``'s time per micro-batch split by component; the parts add up to ``sc.time_per_micro_batch_s``.

    Formula: the compute channel is :meth:`CandidateCosts.compute_terms` at (n, r, q, d): fixed layers' and blocks'
        forward + backward kernels, their TP/CP collectives (``tp_*_s`` less the MoE all-to-alls ``a2a_s``), the
        all-to-alls, ``r`` full and ``q`` selective recomputations and the pipeline p2p; the other channels
        (:meth:`CandidateCosts.stage_cost`) add in full without DP overlap, else only the excess of the largest
        over compute.
    """
    blk, dense = costs.block, costs.dense_block
    fixed = costs.fixed_layers(stage)

    def per_layer(pick) -> float:  # fixed layers + n blocks (d of them an MoE model's dense blocks)
        delta = pick(dense) - pick(blk) if dense is not None else 0.0
        return sum(pick(lc) for lc in fixed) + n * pick(blk) + d * delta

    parts = {
        "compute": per_layer(lambda lc: lc.fwd_s + lc.bwd_s),
        "recompute": r * blk.recompute_s + q * blk.selective_s,
        "tp_comm": per_layer(lambda lc: lc.tp_fwd_s + lc.tp_bwd_s - lc.a2a_s),
        "ep_comm": per_layer(lambda lc: lc.a2a_s),
        "p2p": costs.p2p_s,
        "dp_comm": 0.0,
        "offload": 0.0,
    }
    channels = dict(sc.channels_s)
    compute = channels.pop("compute", sum(parts.values()))
    target = {"ZeRO traffic": "dp_comm"}
    if costs.options.overlap_dp:
        what, secs = max(channels.items(), key=lambda kv: kv[1], default=("", 0.0))
        if secs > compute:
            parts[target.get(what, "offload")] += secs - compute
    else:
        for what, secs in channels.items():
            parts[target.get(what, "offload")] += secs
    return parts


def _components(costs: CandidateCosts, stages: list[StageCost], counts: list[tuple[int, int, int, int]]
                ) -> dict[str, float]:
    """Seconds per step of each component (module docstring); they add up to :func:`step_time_s`'s step."""
    m, p = costs.m, len(stages)
    out = dict.fromkeys(COMPONENTS, 0.0)
    for s, (sc, (n, r, q, d)) in enumerate(zip(stages, counts)):
        for k, v in _stage_components(costs, s, sc, n, r, q, d).items():
            out[k] += m * v / p
    _, _, bubble = step_time_s(costs, stages)
    out["bubble"] = bubble
    extra = max(stages, key=lambda sc: sc.step_extra_s)
    out["dp_comm"] += extra.dp_comm_s
    out["optimizer"] += extra.optimizer_s
    out["offload"] += extra.offload_s
    return out


def _tiers(costs: CandidateCosts, stages: list[StageCost]) -> list[TierUse]:
    def tier(name: str, pick, cap: float) -> TierUse:
        s = max(range(len(stages)), key=lambda i: pick(stages[i]))
        return TierUse(name, pick(stages[s]), cap, s)

    return [tier("device", lambda sc: sc.memory_bytes, costs.capacity_bytes),
            tier("host", lambda sc: sc.host_bytes, costs.host_capacity_bytes),
            tier("nvme", lambda sc: sc.nvme_bytes, costs.nvme_capacity_bytes)]


def _mfu(cluster: ClusterSpec, mfu: float) -> float | None:
    return mfu if cluster.device.kind == "cuda" else None




# Backend cost profiles a plan may have been priced under, tried in this order when the caller does not know it
# (plan files written before SolverInfo.backend was kept): the generic model, then plan's --backend values.
BACKEND_GUESSES: tuple[str | None, ...] = (None, "any", "torch", "deepspeed", "unconstrained")


def _plan_costs(plan: Plan, profile: ModelProfile | None, backend: str | None):
    """(costs, stage costs, per-stage counts) of ``plan``'s strategy and stages as the search builds them."""
    s = plan.strategy
    opts = CostOptions(vpp=s.vpp, cp=s.cp, sequence_parallel=s.sequence_parallel, selective_policy=s.selective_policy,
                       schedule=s.schedule, ep=s.ep, etp=s.etp, routing_imbalance=s.routing_imbalance,
                       capacity_factor=s.capacity_factor, backend=backend)
    cluster = calibrate_cluster(plan.cluster, profile)
    costs = CandidateCosts(plan.model, cluster, plan.train, s.dp, s.tp, s.pp, s.micro_batch_size, profile, opts)
    mode = Mode(s.zero_stage, s.offload_optimizer, s.offload_param, s.offload_ratio)
    dense = costs.dense_blocks_per_stage([st.n_blocks for st in s.stages])
    counts = [(st.n_blocks, st.recompute_blocks, st.selective_blocks, dense[i]) for i, st in enumerate(s.stages)]
    stages = [costs.stage_cost(i, st.n_blocks, st.recompute_blocks, mode, st.selective_blocks, st.offload_blocks,
                               dense[i]) for i, st in enumerate(s.stages)]
    return costs, stages, counts


def price_plan(plan: Plan, profile: ModelProfile | None = None, label: str = "chosen plan",
               backends: tuple[str | None, ...] = BACKEND_GUESSES) -> Priced:
    """Re-price ``plan``'s stages with the cost model the search used and split its step time by component.

    Args:
        plan: a plan from the search (or its file).
        profile: the profile the plan was made with (its ``compute_source`` is "profile"); None: analytic.
        backends: backend cost profiles to try (``CostOptions.backend``), first the one plan's ``--backend`` used
            when it is known; the first that reproduces the plan's step time is kept (``Priced.backend``).

    Returns:
        The priced plan; when none reproduces the plan's recorded step time within :data:`REPRICE_TOLERANCE`
        (relative; a calibrated plan, another paraplan version, a missing profile), its components are the plan's
        recorded coarse breakdown (``exact`` False, a note says why).
    """
    pred = plan.predicted
    settings = _plan_settings(plan)
    tried = []
    for backend in dict.fromkeys(backends):
        try:
            costs, stages, counts = _plan_costs(plan, profile, backend)
            again = predict(costs, stages)
        except Exception as exc:  # noqa: BLE001 - a plan the current model cannot re-price still gets explained
            tried.append(f"{backend or 'generic'}: {str(exc).splitlines()[0]}")
            continue
        if abs(again.step_time_s - pred.step_time_s) <= REPRICE_TOLERANCE * pred.step_time_s:
            return Priced(label, settings, pred.step_time_s, _components(costs, stages, counts),
                          _tiers(costs, stages), pred.tokens_per_s, _mfu(plan.cluster, pred.mfu), True,
                          backend=backend)
        tried.append(f"{backend or 'generic'}: {format_seconds(again.step_time_s)}")
    missing = ", or give the plan's --profile" if pred.compute_source == "profile" and profile is None else ""
    notes = [f"re-pricing did not reproduce the plan file's {format_seconds(pred.step_time_s)} step "
             f"({'; '.join(tried)}): a calibrated plan or another paraplan version{missing}; the breakdown is the "
             "plan file's own, compute including recomputation and TP/CP communication"]
    s, c = plan.strategy, plan.cluster
    comps = dict.fromkeys(COMPONENTS, 0.0)
    comps.update(compute=pred.compute_s - pred.bubble_s, bubble=pred.bubble_s, dp_comm=pred.dp_comm_s,
                 optimizer=pred.optimizer_s, offload=pred.offload_s)
    worst = max(s.stages, key=lambda st: st.memory_bytes)
    tiers = [TierUse("device", pred.peak_memory_bytes, pred.memory_capacity_bytes, worst.index),
             TierUse("host", pred.host_bytes, c.host_memory_bytes / c.devices_per_node, worst.index),
             TierUse("nvme", pred.nvme_bytes, c.nvme_capacity_bytes / c.devices_per_node, worst.index)]
    return Priced(label, settings, pred.step_time_s, comps, tiers, pred.tokens_per_s, _mfu(c, pred.mfu), False,
                  notes)


def strategy_stage_costs(spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec, st: StrategySpec,
                         profile: ModelProfile | None = None
                         ) -> tuple[CandidateCosts, list[StageCost], list[tuple[int, int, int, int]]]:
    """The stage costs :func:`estimate_strategy` prices ``st`` with (every block recomputed, or paged, alike), and
    each stage's (blocks, full, selective, dense) counts.

    Raises:
        StrategyError, TrainSpecError, ProfileError: as :func:`estimate_strategy`.
    """
    validate_strategy(spec, cluster, train, st, profile)
    cluster = calibrate_cluster(cluster, profile)
    costs = CandidateCosts(spec, cluster, train, st.dp, st.tp, st.pp, st.micro_batch_size, profile,
                           st.cost_options())
    blocks = rank_blocks(st, spec.n_layers or 0)
    dense = dense_blocks_per_rank(st, spec, blocks)
    mode = st.mode()
    counts, stages = [], []
    for s, n in enumerate(blocks):
        r = n if st.recompute == "full" else 0
        q = n if st.recompute in ("selective", "op") else 0
        counts.append((n, r, q, dense[s]))
        stages.append(costs.stage_cost(s, n, r, mode, q, n if st.offload_activations else 0, dense[s]))
    return costs, stages, counts


def price_strategy(spec: ModelSpec, cluster: ClusterSpec, train: TrainSpec, st: StrategySpec,
                   profile: ModelProfile | None = None, label: str = "") -> Priced:
    """Price a fixed strategy: :func:`estimate_strategy`'s step time and memory, split by component.

    Raises:
        StrategyError, TrainSpecError, ProfileError: as :func:`estimate_strategy`.
    """
    est = estimate_strategy(spec, cluster, train, st, profile)
    costs, stages, counts = strategy_stage_costs(spec, cluster, train, st, profile)
    comps = _components(costs, stages, counts)
    tiers = _tiers(costs, stages)
    return Priced(label, _spec_settings(st, spec, cluster, costs.m), est.step_time_s, comps, tiers, est.tokens_per_s,
                  _mfu(cluster, est.mfu))


# ---- settings of a plan or a strategy, for "what it changes" ----------------------------------------------------
def _settings(*, dp, tp, pp, cp, ep, etp, mb, accum, schedule, vpp, zero, sp, full, sel, policy, L, opt, param,
              ratio, paged, act_tier, moe: bool) -> dict[str, str]:
    out = {"dp": str(dp), "tp": str(tp), "pp": str(pp), "cp": str(cp)}
    if moe:
        out |= {"ep": str(ep), "etp": str(etp)}
    out |= {"micro-batch": str(mb), "grad accum": str(accum),
            "schedule": "-" if pp == 1 else schedule + (f" vpp={vpp}" if vpp > 1 and schedule != "zbv" else ""),
            "ZeRO": str(zero), "sp": "yes" if sp else "no",
            "recompute": f"{full}/{L} full" + (f", {sel} {'op-selective' if policy == 'op' else 'selective'}"
                                                 if sel else ""),
            "optimizer offload": "none" if opt == "none" else opt + (f" {ratio:.0%}" if ratio < 1 else ""),
            "param offload": param, "paged activations": f"{paged}/{L}" + (f" ({act_tier})" if paged else "")}
    return out


def _plan_settings(plan: Plan) -> dict[str, str]:
    s = plan.strategy
    L = sum(st.n_blocks for st in s.stages)
    return _settings(dp=s.dp, tp=s.tp, pp=s.pp, cp=s.cp, ep=s.ep, etp=s.etp, mb=s.micro_batch_size,
                     accum=s.grad_accum, schedule=s.schedule, vpp=s.vpp, zero=s.zero_stage, sp=s.sequence_parallel,
                     full=sum(st.recompute_blocks for st in s.stages), sel=sum(st.selective_blocks for st in s.stages),
                     policy=s.selective_policy, L=L, opt=s.offload_optimizer, param=s.offload_param,
                     ratio=s.offload_ratio, paged=sum(st.offload_blocks for st in s.stages),
                     act_tier=s.activation_tier, moe=plan.model.moe is not None)


def _spec_settings(st: StrategySpec, spec: ModelSpec, cluster: ClusterSpec, accum: int) -> dict[str, str]:
    L = spec.n_layers or 0
    mode = st.mode()
    schedule = "interleaved_1f1b" if st.schedule == "1f1b" and st.vpp > 1 else st.schedule
    return _settings(dp=st.dp, tp=st.tp, pp=st.pp, cp=st.cp, ep=st.ep, etp=st.etp, mb=st.micro_batch_size,
                     accum=accum, schedule=schedule, vpp=st.vpp, zero=st.zero_stage,
                     sp=st.sequence_parallel and st.tp > 1, full=L if st.recompute == "full" else 0,
                     sel=L if st.recompute in ("selective", "op") else 0, policy=st.selective_policy, L=L,
                     opt=mode.offload_optimizer, param=mode.offload_param, ratio=st.offload_ratio,
                     paged=L if st.offload_activations else 0,
                     act_tier="nvme" if cluster.device.kind == "cpu" else "cpu",
                     moe=spec.moe is not None)


def changes(base: dict[str, str], other: dict[str, str]) -> dict[str, tuple[str, str]]:
    """The settings whose display differs: name -> (base, other)."""
    return {k: (base.get(k, "-"), v) for k, v in other.items() if base.get(k, "-") != v}


# ---- compared strategies ----------------------------------------------------------------------------------------
def plan_knobs(plan: Plan) -> dict:
    """The chosen plan as :class:`StrategySpec` keyword arguments. A plan that recomputes or pages only some blocks
    becomes the nearest uniform strategy (every block recomputed in full when any is, else selectively when any is;
    activations paged only when every block is)."""
    s = plan.strategy
    L = sum(st.n_blocks for st in s.stages)
    full = sum(st.recompute_blocks for st in s.stages)
    sel = sum(st.selective_blocks for st in s.stages)
    recompute = "full" if full else ("op" if s.selective_policy == "op" else "selective") if sel else "none"
    paged = sum(st.offload_blocks for st in s.stages)
    return {"dp": s.dp, "tp": s.tp, "pp": s.pp, "cp": s.cp, "micro_batch_size": s.micro_batch_size,
            "vpp": s.vpp, "schedule": s.schedule, "sequence_parallel": s.sequence_parallel, "recompute": recompute,
            "zero_stage": s.zero_stage, "offload_optimizer": s.offload_optimizer, "offload_param": s.offload_param,
            "offload_ratio": s.offload_ratio, "offload_activations": paged == L and L > 0 and recompute == "none",
            "ep": s.ep, "etp": s.etp, "routing_imbalance": s.routing_imbalance,
            "capacity_factor": s.capacity_factor}


def resolve_compare(plan: Plan, text: str, backend: str | None = None) -> StrategySpec:
    """``--compare`` text -> the full strategy it names: the plan's settings with the named keys replaced (rules in
    the module docstring).

    Raises:
        StrategyError: a malformed text (unknown or repeated key, bad value), or degrees that do not divide the
            devices; the message starts with ``--compare '<text>'``.
    """
    from paraplan.cli.app import parse_strategy

    try:
        named = parse_strategy(text).model_dump(exclude_none=True)
    except StrategyError as exc:
        raise StrategyError(f"--compare '{text}': " + str(exc).replace("--strategy", "the strategy")) from None
    if not named:
        raise StrategyError(f"--compare '{text}': name at least one key=value, e.g. --compare \"dp=8,tp=1,zero=3\"")
    knobs = plan_knobs(plan)
    knobs.update(named)
    world = plan.cluster.world_size
    if "dp" not in named:
        other = knobs["tp"] * knobs["pp"] * knobs["cp"]
        if world % other:
            raise StrategyError(f"--compare '{text}': tp x pp x cp = {other} does not divide the {world} devices of "
                                f"{plan.cluster.name}; change the degrees or give dp=")
        knobs["dp"] = world // other
    if knobs["pp"] == 1:
        if "schedule" not in named:
            knobs["schedule"] = "1f1b"
        if "vpp" not in named:
            knobs["vpp"] = 1
    if knobs["tp"] == 1 and "sequence_parallel" not in named:
        knobs["sequence_parallel"] = False
    if knobs["zero_stage"] != 3 and "offload_param" not in named:
        knobs["offload_param"] = "none"
    if knobs["zero_stage"] == 0 and "offload_optimizer" not in named:
        knobs["offload_optimizer"] = "none"
    if (knobs["offload_optimizer"] == "none" or knobs["zero_stage"] != 3) and "offload_ratio" not in named:
        knobs["offload_ratio"] = 1.0
    if knobs["recompute"] != "none" and "offload_activations" not in named:
        knobs["offload_activations"] = False
    if knobs.get("offload_activations") and "recompute" not in named:
        knobs["recompute"] = "none"
    group = knobs["dp"] * knobs["cp"] * knobs["tp"]
    if plan.model.moe is not None and group % (knobs["ep"] * knobs["etp"]) and not {"ep", "etp"} & named.keys():
        knobs["ep"], knobs["etp"] = 1, 1
    same_layout = (knobs["pp"], knobs["vpp"], knobs["schedule"]) == (plan.strategy.pp, plan.strategy.vpp,
                                                                     plan.strategy.schedule)
    blocks = tuple(st.n_blocks for st in plan.strategy.stages) if same_layout and knobs["vpp"] == 1 else None
    knobs["backend"] = backend  # priced under the chosen plan's backend cost profile
    return StrategySpec(stage_blocks=blocks, **knobs)


def compare_strategy(plan: Plan, text: str, profile: ModelProfile | None = None, label: str = "compare",
                     backend: str | None = None) -> Priced:
    """Price the strategy ``--compare text`` names against ``plan``'s problem, under the backend cost profile
    ``backend`` (``CostOptions.backend``; the chosen plan's, :attr:`Priced.backend`).

    Raises:
        StrategyError: as :func:`resolve_compare`, or a strategy the cost model refuses (the estimate's message,
            prefixed with ``--compare '<text>'``).
    """
    from paraplan.errors import TrainSpecError

    st = resolve_compare(plan, text, backend)
    try:
        priced = price_strategy(plan.model, plan.cluster, plan.train, st, profile, label=label)
    except (StrategyError, TrainSpecError) as exc:
        msg = str(exc).replace("--micro-batch", "mb=").replace("--global-batch", "the plan's global batch")
        raise StrategyError(f"--compare '{text}': {msg}") from None
    return dataclasses.replace(priced, text=text, notes=_uniform_notes(plan, text), backend=backend)


def _uniform_notes(plan: Plan, text: str) -> list[str]:
    """What a fixed strategy cannot inherit from a plan that recomputes or pages only some blocks."""
    from paraplan.cli.app import parse_strategy

    named = parse_strategy(text).model_dump(exclude_none=True)
    s = plan.strategy
    L = sum(st.n_blocks for st in s.stages)
    knobs = plan_knobs(plan)
    out = []
    full = sum(st.recompute_blocks for st in s.stages)
    sel = sum(st.selective_blocks for st in s.stages)
    if "recompute" not in named and 0 < full + sel and (full, sel) not in ((L, 0), (0, L)):
        out.append(f"the plan recomputes {full}/{L} blocks in full and {sel} selectively; a fixed strategy treats "
                   f"every block alike: compared with recompute={knobs['recompute']} (name recompute= to choose)")
    paged = sum(st.offload_blocks for st in s.stages)
    if "offload_activations" not in named and 0 < paged < L:
        out.append(f"the plan pages the activations of {paged}/{L} blocks; a fixed strategy pages all or none: "
                   "compared with none (name offload_act=true to page all)")
    return out


# ---- the explanation --------------------------------------------------------------------------------------------
def component_label(key: str, priced: Priced | None = None) -> str:
    """The words for a component; the TP/CP one names the degrees ``priced`` uses (tensor-, context-parallel)."""
    if key == "tp_comm" and priced is not None:
        tp, cp = int(priced.settings["tp"]), int(priced.settings["cp"])
        which = "tensor- and context-parallel" if tp > 1 and cp > 1 else "context-parallel" if cp > 1 else \
            "tensor-parallel" if tp > 1 else "tensor-/context-parallel"
        return f"exposed {which} communication"
    return COMPONENTS[key]


@dataclass(frozen=True)
class Explanation:
    """The chosen plan and the alternatives priced against it."""

    chosen: Priced
    alternatives: list[Priced]
    memory_fraction: float = DEFAULT_MEMORY_FRACTION

    def to_json(self) -> dict:
        """The ``--json`` object: ``plan`` (settings, breakdown, bottleneck, memory per tier, binding tier) and
        ``alternatives`` (changes, step time and breakdown deltas, memory, overflows), seconds and bytes."""
        c = self.chosen
        comp, secs = c.bottleneck()
        binding = c.binding()
        return {
            "plan": {
                "settings": c.settings, "step_time_s": c.step_time_s, "tokens_per_s": c.tokens_per_s, "mfu": c.mfu,
                "breakdown_s": c.components_s, "breakdown_exact": c.exact,
                "bottleneck": {"component": comp, "label": component_label(comp, c), "seconds": secs,
                               "share": secs / c.step_time_s},
                "memory": [t.to_json() for t in c.tiers],
                "binding": binding.to_json(), "backend_cost_profile": c.backend, "notes": c.notes,
            },
            "alternatives": [self._alt_json(a) for a in self.alternatives],
        }

    def _alt_json(self, a: Priced) -> dict:
        c = self.chosen
        return {
            "label": a.label, "compare": a.text or None, "settings": a.settings,
            "changes": {k: {"plan": v[0], "this": v[1]} for k, v in changes(c.settings, a.settings).items()},
            "step_time_s": a.step_time_s, "step_time_delta_s": a.step_time_s - c.step_time_s,
            "breakdown_s": a.components_s,
            "breakdown_delta_s": {k: a.components_s[k] - c.components_s[k] for k in COMPONENTS},
            "peak_memory_bytes": a.device.used_bytes,
            "peak_memory_delta_bytes": a.device.used_bytes - c.device.used_bytes,
            "memory": [t.to_json() for t in a.tiers], "fits": a.fits,
            "overflows": [{"tier": t.tier, "stage": t.stage, "over_bytes": -t.headroom_bytes,
                           "used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes} for t in a.overflows],
            "notes": a.notes,
        }


def _pct(x: float, total: float) -> str:
    if total <= 0:
        return "-"
    share = x / total
    return f"{share:.1%}" if share < 0.1 else f"{share:.0%}"


def _signed_s(x: float) -> str:
    return ("+" if x >= 0 else "-") + format_seconds(abs(x))


def _signed_bytes(x: float) -> str:
    return ("+" if x >= 0 else "-") + format_bytes(abs(x))


def _tier_line(t: TierUse) -> str:
    return (f"{TIER_NAMES[t.tier]} on stage {t.stage}: {format_bytes(t.used_bytes)} of "
            f"{format_bytes(t.capacity_bytes)} per device")


def bottleneck_sentence(c: Priced) -> str:
    """``Bottleneck: <largest component>, <s> of the <step> step (<share>)``; when compute, the MFU and the largest
    overhead besides it."""
    comp, secs = c.bottleneck()
    text = (f"Bottleneck: {component_label(comp, c)}, {format_seconds(secs)} of the {format_seconds(c.step_time_s)} "
            f"step ({_pct(secs, c.step_time_s)})")
    if comp == "compute":
        text += f", MFU {c.mfu:.1%}" if c.mfu is not None else ""
        over = sorted(((k, v) for k, v in c.components_s.items() if k != "compute" and v > 0), key=lambda kv: -kv[1])
        if over:
            k, v = over[0]
            text += f"; the largest overhead is {component_label(k, c)}, {format_seconds(v)} ({_pct(v, c.step_time_s)})"
    return text + "."


def binding_sentence(c: Priced, memory_fraction: float = DEFAULT_MEMORY_FRACTION) -> str:
    """The binding memory tier (least relative headroom), its stage, headroom in bytes and %, and the other tiers
    in use."""
    b = c.binding()
    text = (f"Binding constraint: {_tier_line(b)}, headroom {format_bytes(b.headroom_bytes)} "
            f"({b.headroom_fraction:.1%})")
    if b.tier == "device":
        usable = format_bytes(memory_fraction * b.capacity_bytes)
        text += f"; the planner lets a plan fill {memory_fraction:.0%} ({usable})"
    others = [t for t in c.tiers if t is not b and t.used_bytes > 0]
    if others:
        text += "; also " + "; ".join(f"{_tier_line(t)} ({t.headroom_fraction:.0%} free)" for t in others)
    return text + "."


def alternative_sentence(c: Priced, a: Priced, memory_fraction: float = DEFAULT_MEMORY_FRACTION) -> str:
    """What ``a`` changes against the chosen plan ``c`` and what it costs: the tiers it overflows, its step time
    and the (up to 3) components that move by at least 0.5% of ``c``'s step, its peak device memory."""
    diff = changes(c.settings, a.settings)
    what = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in diff.items()) or "the same settings (another stage split)"
    delta = a.step_time_s - c.step_time_s
    moves = sorted(((k, a.components_s[k] - c.components_s[k]) for k in COMPONENTS), key=lambda kv: -abs(kv[1]))
    moves = [(k, v) for k, v in moves if abs(v) >= 0.005 * c.step_time_s][:3]
    text = f"changes {what}. "
    if not a.fits:
        text += "Does not fit: " + "; ".join(
            f"{TIER_NAMES[t.tier]} overflows by {format_bytes(-t.headroom_bytes)} on stage {t.stage} "
            f"({format_bytes(t.used_bytes)} of {format_bytes(t.capacity_bytes)})" for t in a.overflows)
        text += ". Were it to fit: "
    text += (f"step {format_seconds(a.step_time_s)} ({_signed_s(delta)}, {delta / c.step_time_s:+.1%})")
    if moves:
        text += ": " + ", ".join(f"{component_label(k, a if v > 0 else c)} {_signed_s(v)}" for k, v in moves)
    text += (f"; peak device memory {format_bytes(a.device.used_bytes)} "
             f"({_signed_bytes(a.device.used_bytes - c.device.used_bytes)})")
    if a.fits and delta < 0:
        if a.device.used_bytes > memory_fraction * a.device.capacity_bytes:
            text += (f"; faster, but above the {memory_fraction:.0%} of device memory the planner lets a plan fill")
        else:
            text += "; faster: the search did not consider it (a --backend or --strategy rule excludes it)"
    return text + "."


def render_explanation(console, ex: Explanation) -> None:
    """Words and one table: the chosen plan's breakdown and each alternative's change per component."""
    from rich.table import Table

    c = ex.chosen
    console.print(bottleneck_sentence(c), highlight=False, soft_wrap=True)
    console.print(binding_sentence(c, ex.memory_fraction), highlight=False, soft_wrap=True)
    for note in c.notes:
        console.print(f"note: {note}", highlight=False, soft_wrap=True)
    table = Table(title="why this plan: step time by component (alternatives as the change against it)")
    table.add_column("component", no_wrap=True)
    table.add_column("chosen", justify="right")
    table.add_column("share", justify="right")
    for a in ex.alternatives:
        table.add_column(a.label, justify="right")
    shown = [k for k in COMPONENTS if c.components_s[k] > 0 or any(a.components_s[k] > 0 for a in ex.alternatives)]
    for k in shown:
        table.add_row(SHORT[k], format_seconds(c.components_s[k]), _pct(c.components_s[k], c.step_time_s),
                      *(_signed_s(a.components_s[k] - c.components_s[k]) for a in ex.alternatives))
    table.add_row("step", format_seconds(c.step_time_s), "100%",
                  *(f"{_signed_s(d)} ({d / c.step_time_s:+.1%})"
                    for d in (a.step_time_s - c.step_time_s for a in ex.alternatives)), style="bold")
    table.add_row("peak device memory", format_bytes(c.device.used_bytes), _pct(c.device.used_bytes,
                                                                                c.device.capacity_bytes),
                  *(_signed_bytes(a.device.used_bytes - c.device.used_bytes) for a in ex.alternatives))
    table.add_row("fits", "yes", "", *("yes" if a.fits else "NO: " + ", ".join(t.tier for t in a.overflows)
                                      for a in ex.alternatives))
    console.print(table)
    for a in ex.alternatives:
        tag = a.label
        if a.text:  # the whole strategy compared, not only what differs from the plan
            shown = ", ".join(f"{k} {v}" for k, v in a.settings.items())
            tag += f" (--compare \"{a.text}\" = {shown})"
        console.print(f"{tag}: " + alternative_sentence(c, a, ex.memory_fraction), highlight=False, soft_wrap=True)
        for note in a.notes:
            console.print(f"  note: {note}", highlight=False, soft_wrap=True)


def explain_plans(plans: list[Plan], compare: list[str] | None = None, profile: ModelProfile | None = None,
                  memory_fraction: float = DEFAULT_MEMORY_FRACTION, backend: str | None = None) -> Explanation:
    """Explain ``plans[0]`` against ``plans[1:]`` (the search's next best) and the ``compare`` strategies.

    Args:
        backend: plan's ``--backend`` when known (tried first as the plans' cost profile; see :func:`price_plan`).

    Raises:
        StrategyError: a ``--compare`` text that is malformed or names a strategy the model cannot run.
    """
    best = plans[0]
    recorded = (best.solver.backend,) if best.solver.backend is not None else ()  # plan.json keeps it
    guesses = ((backend,) if backend is not None else ()) + recorded + BACKEND_GUESSES
    chosen = price_plan(best, profile, backends=guesses)
    if chosen.exact:
        guesses = (chosen.backend,) + guesses
    alts = [price_plan(p, profile, label=f"#{i}", backends=guesses) for i, p in enumerate(plans[1:], 2)]
    compared = [compare_strategy(best, text, profile, f"compare {i}", chosen.backend)
                for i, text in enumerate(compare or [], 1)]
    if not chosen.exact:
        compared = [dataclasses.replace(a, notes=a.notes + [
            "the plan's own step time is not the cost model's (see its note): this delta mixes the two"])
            for a in compared]
    return Explanation(chosen, alts + compared, memory_fraction)


def _same_plan(a: Plan, b: Plan) -> bool:
    """The same strategy (settings and per-stage block counts), whatever the recorded timings."""
    def key(p: Plan) -> tuple:
        return (tuple(_plan_settings(p).items()),
                tuple((st.n_blocks, st.recompute_blocks, st.selective_blocks, st.offload_blocks)
                      for st in p.strategy.stages))

    return key(a) == key(b)


def next_best(plan: Plan, n: int, profile: ModelProfile | None, backend: str, time_limit_s: float,
              memory_fraction: float, progress=None) -> list[Plan]:
    """The search's ``n`` best plans other than ``plan`` for ``plan``'s problem (model, cluster, batch, dtype), found
    under ``backend``'s rules and no forced strategy.

    Raises:
        NoFeasiblePlanError, StrategyError, ProfileError: as :func:`search_plans`.
    """
    from paraplan.planner.search import search_plans

    s = plan.strategy
    found = search_plans(plan.model, plan.cluster, plan.train, profile, top_k=n + 1, backend=backend,
                         time_limit_s=time_limit_s, memory_fraction=memory_fraction, progress=progress,
                         routing_imbalance=s.routing_imbalance, capacity_factor=s.capacity_factor)
    return [p for p in found if not _same_plan(p, plan)][:n]


def _plan_profile(plan: Plan, profile_path: Path | None) -> ModelProfile | None:
    """``--profile``, else the profile the plan names when its compute came from one and the file is there."""
    from paraplan.cli.app import load_profile

    if profile_path is not None:
        return load_profile(profile_path)
    if plan.predicted.compute_source == "profile" and plan.profile_path and Path(plan.profile_path).is_file():
        return load_profile(Path(plan.profile_path))
    return None


COMPARE_HELP = ("A strategy to compare with the plan, in --strategy syntax (repeatable), e.g. \"dp=8,tp=1,zero=3\": "
                "keys not named keep the plan's values, dp fills the devices when not named.")


def register(app: typer.Typer, guard) -> None:
    """Add ``explain`` to the typer app (called by paraplan.cli.app)."""

    @app.command("explain")
    @guard
    def explain_cmd(
        plan_path: Annotated[Path, typer.Argument(help="plan.json from `paraplan plan`.")],
        compare: Annotated[Optional[list[str]], typer.Option("--compare", help=COMPARE_HELP)] = None,
        alternatives: Annotated[int, typer.Option(
            help="Next-best plans to compare with, found by searching the plan's problem again (0: none, no "
                 "search).", min=0)] = 3,
        backend: Annotated[str, typer.Option(help="Backend rules of that search: any, deepspeed, torch or "
                                                  "unconstrained.")] = "any",
        profile: Annotated[Optional[Path], typer.Option(
            help="Profile the plan was made with (default: the plan's profile_path when it exists).")] = None,
        memory_fraction: Annotated[float, typer.Option(
            help="Share of device memory a plan may fill (as plan's).", min=0.1, max=1.0)] = DEFAULT_MEMORY_FRACTION,
        time_limit: Annotated[float, typer.Option(help="MILP time limit per candidate of that search (s).")] = 10.0,
        as_json: Annotated[bool, typer.Option("--json", help="Print the explanation as JSON.")] = False,
    ) -> None:
        """Why this plan: its bottleneck, its binding memory, and what the next-best plans and the strategies you
        name would change and cost."""
        from paraplan.cli import app as cli
        from paraplan.cli.progress import SearchDisplay
        from paraplan.errors import ParaplanError
        from paraplan.files import read_model

        if backend not in ("any", "deepspeed", "torch", "unconstrained"):
            raise StrategyError(f"--backend {backend}: use any, deepspeed, torch or unconstrained")
        plan = read_model(plan_path, Plan, "plan", ParaplanError, f"run `paraplan plan ... -o {plan_path}` first")
        prof = _plan_profile(plan, profile)
        for text in compare or []:  # a malformed --compare fails before the search
            resolve_compare(plan, text)
        others: list[Plan] = []
        if alternatives:
            with SearchDisplay(cli.err_console, quiet=as_json) as on_progress:
                others = next_best(plan, alternatives, prof, backend, time_limit, memory_fraction, on_progress)
        ex = explain_plans([plan, *others], compare, prof, memory_fraction, backend)
        if as_json:
            cli.print_json(ex.to_json())
            return
        render_explanation(cli.console, ex)
