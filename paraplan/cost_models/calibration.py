"""Calibration from trial steps: fit the cost model's free coefficients to a few launched steps on this cluster.

``paraplan calibrate RUN_DIR...`` reads each run's ``plan.json`` (strategy, stages, cluster, the profile it was
priced with), ``launch.json`` (backend) and ``metrics.jsonl`` (step times, peak memory per rank and, from a launch
with ``--phases``, the per-phase times of one step: ``paraplan.backends.phases``) and fits

    compute_scale_fwd, compute_scale_bwd  profiled forward / backward (and recompute) times are multiplied by them:
                                          processes sharing a machine run slower than the one the profiler timed
                                          alone (cores, memory bandwidth, caches); on cpu:2 the main error
    link_time_scale                       the bandwidth term ``bytes / bandwidth`` of every collective is
                                          multiplied by it (the link's bandwidth divided)
    latency_s                             per-collective latency (the cluster's intra- and inter-node latency)
    optimizer_scale                       the device optimizer step (memory bandwidth divided by it)
    step_overhead_s                       fixed work per step the model does not price (loss and gradient-norm
                                          reductions, DDP buffer broadcasts, data, Python)
    tp_overhead_s                         seconds per tensor-parallel block per micro-batch beyond its sharded
                                          compute and priced collectives (``ModelProfile.tp_block_overhead_s``):
                                          DTensor dispatch, and the processes waiting for each other at each of the
                                          block's collectives; identifiable only from a run with tp > 1
    zero3_fetch_overhead_s                seconds per ZeRO-3 parameter fetch beyond the all-gather
                                          (``ModelProfile.zero3_fetch_overhead_s``): module hooks, the parameter
                                          coordinator; identifiable only from a ZeRO-3 run
    memory_scale, memory_offset_bytes     ``measured peak = memory_scale x predicted + memory_offset_bytes``: the
                                          runtime's own memory (RSS on CPU includes libtorch, Python and the
                                          allocator's fragmentation) and what the model does not see

How (Formula): the cost model is linear in these inputs on a cluster that does not overlap communication (CPU/gloo):
a run's predicted step time is ``sum_j x_j c_j`` with ``c_j`` the prediction at the unit input of coefficient j
and zero for the others (``compute_scale_fwd = 1``, everything else 0, ...; exact while the same pipeline stage is
the slowest at every basis point, checked: :attr:`CalibrationRun.additivity_error`). The fit is a non-negative
least-squares problem on relative errors (each equation divided by its measurement) over
- each run's step time (median of the steps after the first :data:`WARMUP_STEPS`; weight :data:`STEP_WEIGHT`),
- its phases where they time one coefficient's work alone: the forward of the first pipeline stage (nothing to wait
  for; not with tensor parallelism or ZeRO-3, whose forwards wait for collectives) and the backward of the last
  (``compute_scale_*``, against the stage's profiled times), the optimizer step (``optimizer_scale``), and the
  collectives of a run without pipeline parallelism, taking the rank that waited least (``link_time_scale``,
  ``latency_s``); the profiled step gives the split of a step into phases and the timed steps its level (phases
  are scaled by measured step / profiled step's wall time),
- a weak prior (weight :data:`PRIOR_WEIGHT`) pulling each coefficient to its uncalibrated value (1, the profile's
  latency, 0), so coefficients the runs cannot tell apart stay where the uncalibrated model put them;
solved exactly by trying every set of coefficients held at zero (Lawson and Hanson 1974, ch. 23: the NNLS solution
is the unconstrained least-squares solution on its free set) with ``numpy.linalg.lstsq``.

Applying (:func:`apply_calibration`): the inputs are transformed, not the cost model: the profile's layer times
are scaled, its link measurements replaced by the fitted figures on the cluster, the device memory bandwidth
divided by ``optimizer_scale``; the device capacity a plan may fill becomes ``(capacity - offset) / scale`` so the
planner's memory check sees the calibrated peak. :func:`calibrated_prediction` adds ``step_overhead_s`` and maps
the peak. The tp and ZeRO-3 overheads are fitted only when a run exercises them (``Calibration.mechanisms``); a
plan using one the runs did not see is priced with what ``paraplan profile`` timed for the backend in two processes
(``paraplan.backends.overheads``; 0 if it did not), taken beyond the collectives as the calibrated links price them
(``CandidateCosts.framework_overhead``), and ``plan``/``estimate`` say so (:func:`coverage_warning`). Their prior
is the uncalibrated model's value. Not fitted (the calibration runs do not separate them): per-layer-kind compute
scales (one pair for all kinds), offload and NVMe rates.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from paraplan.cost_models.costs import CandidateCosts, CostOptions, Mode, StageCost, predict
from paraplan.cost_models.links import calibrate_cluster
from paraplan.errors import ParaplanError
from paraplan.types import ClusterSpec, ModelProfile, Plan, Prediction

CALIBRATION_SCHEMA_VERSION = 1
WARMUP_STEPS = 2  # steps left out of the measured mean, as paraplan.cli.render.WARMUP_STEPS
PRIOR_WEIGHT = 0.1
# A run's step time is what a calibration must reproduce; its phases only say how to split it between the
# coefficients, so a step-time equation weighs as much as the (up to four) phase equations of its run together.
STEP_WEIGHT = 3.0
COEFFICIENTS = ("compute_scale_fwd", "compute_scale_bwd", "link_time_scale", "latency_s", "optimizer_scale",
                "tp_overhead_s", "zero3_fetch_overhead_s", "step_overhead_s")
_HUGE = 1e30  # a bandwidth that makes a term vanish (ClusterSpec fields must stay > 0)


class CalibrationError(ParaplanError):
    """Run directories that cannot be calibrated on, or a calibration that does not fit the plan's setting."""


class CalibrationRun(BaseModel):
    """One run the calibration was fitted on, with the fit's residuals."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    run_dir: str
    model: str
    strategy: str = Field(description="dp/tp/pp, micro-batch, ZeRO stage, recomputation of the run.")
    steps_timed: int = Field(description="Steps in the measured mean (after the warm-up steps).")
    measured_step_s: float
    predicted_step_s: float = Field(description="Uncalibrated prediction (the plan's inputs, re-priced).")
    calibrated_step_s: float
    measured_peak_bytes: float = Field(description="Peak memory per rank, max over ranks and steps.")
    predicted_peak_bytes: float
    calibrated_peak_bytes: float
    phases: bool = Field(description="The run recorded per-phase times (launch --phases) and the fit used them.")
    additivity_error: float = Field(description="|sum of the basis predictions - prediction at the uncalibrated "
                                    "inputs| / prediction; 0 when the step time is linear in the coefficients.")


class Calibration(BaseModel):
    """Fitted coefficients of the cost model for one cluster, backend and dtype (module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: int = CALIBRATION_SCHEMA_VERSION
    cluster: str = Field(description="Cluster name the runs ran on (cpu:2, ...); plans for others are refused.")
    device_kind: Literal["cuda", "cpu"]
    backend: Literal["deepspeed", "torch"]
    dtype: str
    models: list[str]
    compute_scale_fwd: float = Field(ge=0, description="Multiplies profiled forward (and recompute) times.")
    compute_scale_bwd: float = Field(ge=0, description="Multiplies profiled backward times.")
    link_time_scale: float = Field(ge=0, description="Multiplies every collective's bytes / bandwidth term.")
    latency_s: float = Field(ge=0, description="Per-collective latency, seconds.")
    optimizer_scale: float = Field(ge=0, description="Multiplies the device optimizer step.")
    step_overhead_s: float = Field(ge=0, description="Fixed seconds per step added to the prediction.")
    tp_overhead_s: float = Field(default=0.0, ge=0, description="Seconds per tensor-parallel block per micro-batch "
                                 "(ModelProfile.tp_block_overhead_s).")
    zero3_fetch_overhead_s: float = Field(default=0.0, ge=0, description="Seconds per ZeRO-3 parameter fetch "
                                          "(ModelProfile.zero3_fetch_overhead_s).")
    mechanisms: list[str] = Field(default_factory=list, description="Mechanisms the runs exercised, whose "
                                  "overhead coefficients the fit could set: 'tp' (a run with tp > 1), 'zero3' (a "
                                  "ZeRO-3 run). A plan using another one is priced with the profile's measured "
                                  "overhead (or 0).")
    memory_scale: float = Field(gt=0, description="Calibrated peak = memory_scale x predicted + offset.")
    memory_offset_bytes: float = Field(description="Calibrated peak = memory_scale x predicted + offset.")
    prior: dict[str, float] = Field(description="Uncalibrated value of each coefficient (the fit's prior).")
    step_rms_rel_error: float = Field(description="RMS relative error of the calibrated step times of the runs.")
    memory_rms_rel_error: float = Field(description="RMS relative error of the calibrated peaks of the runs.")
    runs: list[CalibrationRun]


@dataclasses.dataclass(frozen=True)
class RunData:
    """What one run directory holds for the fit."""

    run_dir: Path
    plan: Plan
    backend: str
    profile: ModelProfile
    rows: list[dict]

    @property
    def timed(self) -> list[dict]:
        return self.rows[WARMUP_STEPS:] or self.rows

    @property
    def measured_step_s(self) -> float:
        """Median of the timed steps: robust to a step slowed by other work on the machine."""
        return statistics.median(r["step_time_s"] for r in self.timed)

    @property
    def phase_factor(self) -> float:
        """Measured step / the profiled step's wall time: the profiled step gives the split of a step into phases,
        the timed steps its level (one profiled step is as exposed to other work as any single step)."""
        ph = self.phases
        wall = max(ph.get("step_s") or [0.0]) if ph else 0.0
        return self.measured_step_s / wall if wall > 0 else 1.0

    @property
    def measured_peak_bytes(self) -> float:
        return float(max(max(r["peak_memory_bytes"]) for r in self.rows))

    @property
    def phases(self) -> dict | None:
        return next((r["phases"] for r in self.rows if r.get("phases")), None)


def read_run(run_dir: Path, profile_path: Path | None = None) -> RunData:
    """Read a launched run directory (plan.json, launch.json, metrics.jsonl) and the profile its plan was priced
    with (``profile_path`` or the plan's recorded ``profile_path``).

    Raises:
        CalibrationError: a missing or unreadable file, no metrics, or a plan priced without a profile.
        ProfileError: the profile is of another model, sequence length, dtype or device kind than the plan.
    """
    run_dir = Path(run_dir)
    try:
        plan = Plan.model_validate_json((run_dir / "plan.json").read_text())
        launch = json.loads((run_dir / "launch.json").read_text())
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError as exc:
        raise CalibrationError(f"{run_dir}: no {Path(exc.filename).name}; give run directories written by "
                               "`paraplan launch PLAN --phases`") from None
    except ValueError as exc:
        raise CalibrationError(f"{run_dir}: unreadable plan.json or launch.json ({str(exc).splitlines()[0]})") \
            from None
    by_step: dict[int, dict] = {}
    for line in lines:
        if line.strip():
            row = json.loads(line)
            by_step[row["step"]] = row  # the last row of a step counts (a restarted job re-runs steps)
    rows = [by_step[k] for k in sorted(by_step)]
    if not rows:
        raise CalibrationError(f"{run_dir}: metrics.jsonl has no steps; the run did not train")
    if plan.predicted.compute_source != "profile":
        raise CalibrationError(f"{run_dir}: the plan was priced with the analytic model; calibration scales "
                               "measured layer times: plan with --profile from `paraplan profile`")
    path = profile_path or (Path(plan.profile_path) if plan.profile_path else None)
    if path is None or not path.exists():
        raise CalibrationError(f"{run_dir}: the plan's profile {path} is not readable; pass --profile PATH")
    try:
        profile = ModelProfile.model_validate_json(path.read_text())
    except ValueError as exc:
        raise CalibrationError(f"profile {path}: {str(exc).splitlines()[0]}") from None
    profile.check_matches(plan.model, plan.train, str(path), plan.cluster)
    return RunData(run_dir, plan, launch["backend"], profile, rows)


# ---- the cost model at given inputs ----------------------------------------------------------------------------

def transform_inputs(cluster: ClusterSpec, profile: ModelProfile, fwd: float, bwd: float, link: float,
                     latency: float, optimizer: float, tp_overhead: float | None = None,
                     zero3_fetch_overhead: float | None = None) -> tuple[ClusterSpec, ModelProfile]:
    """``(cluster, profile)`` with layer times scaled by ``fwd``/``bwd``, every link's bandwidth divided by
    ``link`` (0: free), latency set to ``latency`` seconds, the memory bandwidth divided by ``optimizer``
    (0: free) and the profile's tp and ZeRO-3 overheads set (seconds; None: left unset, so the cost model derives
    them from the profile's two-process timings on the transformed cluster, ``CandidateCosts.framework_overhead``).
    The profile's link measurements are applied first (``links.calibrate_cluster``) and then dropped, so the search
    does not apply them again over the calibrated figures."""
    cluster = calibrate_cluster(cluster, profile)
    layers = [lp.model_copy(update={"fwd_time_s": lp.fwd_time_s * fwd, "bwd_time_s": lp.bwd_time_s * bwd})
              for lp in profile.layers]
    update: dict = {"layers": layers, "links": []}
    if tp_overhead is not None:
        update["tp_block_overhead_s"] = tp_overhead
    if zero3_fetch_overhead is not None:
        update["zero3_fetch_overhead_s"] = zero3_fetch_overhead
    profile = profile.model_copy(update=update)

    def bw(v: float) -> float:
        return v / link if link > 0 else _HUGE

    device = cluster.device.model_copy(update={
        "memory_bandwidth_bytes_per_s": cluster.device.memory_bandwidth_bytes_per_s / optimizer
        if optimizer > 0 else _HUGE})
    cluster = cluster.model_copy(update={
        "intra_node_bandwidth_bytes_per_s": bw(cluster.intra_node_bandwidth_bytes_per_s),
        "inter_node_bandwidth_bytes_per_s": bw(cluster.inter_node_bandwidth_bytes_per_s),
        "intra_node_latency_s": latency, "inter_node_latency_s": latency, "device": device})
    return cluster, profile


def plan_costs_at(plan: Plan, cluster: ClusterSpec, profile: ModelProfile, backend: str | None
                  ) -> tuple[CandidateCosts, list[StageCost]]:
    """The planner's costs of ``plan``'s strategy and stages under other inputs (as ``search_plans`` builds
    them; the backend's cost profile when the cost model has them)."""
    s = plan.strategy
    kwargs = dict(vpp=s.vpp, cp=s.cp, sequence_parallel=s.sequence_parallel, selective_policy=s.selective_policy,
                  schedule=s.schedule, ep=s.ep, etp=s.etp, routing_imbalance=s.routing_imbalance,
                  capacity_factor=s.capacity_factor)
    if backend is not None:
        kwargs["backend"] = backend
    costs = CandidateCosts(plan.model, cluster, plan.train, s.dp, s.tp, s.pp, s.micro_batch_size, profile,
                           CostOptions(**kwargs))
    mode = Mode(s.zero_stage, s.offload_optimizer, s.offload_param, s.offload_ratio)
    dense = costs.dense_blocks_per_stage([st.n_blocks for st in s.stages])
    stages = [costs.stage_cost(st.index, st.n_blocks, st.recompute_blocks, mode, st.selective_blocks,
                               st.offload_blocks, dense[st.index]) for st in s.stages]
    return costs, stages


def _predict_at(run: RunData, x: dict[str, float], prior_latency: float) -> Prediction:
    cluster, profile = transform_inputs(run.plan.cluster, run.profile, x["compute_scale_fwd"],
                                        x["compute_scale_bwd"], x["link_time_scale"],
                                        x.get("latency_s", prior_latency), x["optimizer_scale"],
                                        x.get("tp_overhead_s", 0.0), x.get("zero3_fetch_overhead_s", 0.0))
    return predict(*plan_costs_at(run.plan, cluster, profile, run.backend))


def _measured_overhead(run: RunData, mechanism: str, prior_latency: float) -> float:
    """The overhead the uncalibrated model derives for ``run``'s backend from its profile's two-process timings
    (``CandidateCosts.framework_overhead``; 0 without them)."""
    cluster, profile = transform_inputs(run.plan.cluster, run.profile, 1, 1, 1, prior_latency, 1)
    return plan_costs_at(run.plan, cluster, profile, run.backend)[0].framework_overhead(mechanism)  # type: ignore


def _basis(name: str) -> dict[str, float]:
    x = {c: 0.0 for c in COEFFICIENTS}
    x[name] = 1.0
    return x


def _stage_compute(run: RunData, stage: int, x: dict[str, float]) -> tuple[float, float]:
    """(forward, backward incl. recompute) seconds per step of pipeline stage ``stage`` at scales ``x``."""
    cluster, profile = transform_inputs(run.plan.cluster, run.profile, x["compute_scale_fwd"],
                                        x["compute_scale_bwd"], 0.0, 0.0, 0.0)
    costs, _ = plan_costs_at(run.plan, cluster, profile, run.backend)
    st = run.plan.strategy.stages[stage]
    layers = [(costs.block, st.n_blocks)]
    if stage == 0:
        layers.append((costs.embed, 1))
    if stage == len(run.plan.strategy.stages) - 1:
        layers.append((costs.head, 1))
    fwd = sum(lc.fwd_s * k for lc, k in layers)
    bwd = sum(lc.bwd_s * k for lc, k in layers)
    bwd += st.recompute_blocks * costs.block.recompute_s + st.selective_blocks * costs.block.selective_s
    m = run.plan.strategy.grad_accum
    return m * fwd, m * bwd


def prior_latency_s(cluster: ClusterSpec, profile: ModelProfile) -> float:
    """The latency the uncalibrated model uses: the profile's measured one on CPU, the cluster's otherwise."""
    return calibrate_cluster(cluster, profile).intra_node_latency_s


# ---- the fit ---------------------------------------------------------------------------------------------------

def nnls(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``argmin ||a x - b||`` over ``x >= 0`` for a few columns: every free set's least-squares solution
    (``numpy.linalg.lstsq``), the best feasible one (Lawson and Hanson 1974, ch. 23: the NNLS optimum is the
    unconstrained solution on its free set)."""
    n = a.shape[1]
    best, best_res = np.zeros(n), float(np.sum(b ** 2))
    for k in range(1, n + 1):
        for free in itertools.combinations(range(n), k):
            cols = list(free)
            sol, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if np.any(sol < 0):
                continue
            x = np.zeros(n)
            x[cols] = sol
            res = float(np.sum((a @ x - b) ** 2))
            if res < best_res - 1e-15:
                best, best_res = x, res
    return best


def _equations(runs: list[RunData], prior_lat: float) -> tuple[list[list[float]], list[float], list[float]]:
    """Rows ``(coefficients' columns, measurement)`` of the step-time fit (module docstring) and the divisor of
    each (its measurement over its weight: relative errors, step times weighted :data:`STEP_WEIGHT`)."""
    rows, meas, weights = [], [], []

    def add(cols: dict[str, float], value: float, weight: float = 1.0) -> None:
        rows.append([cols.get(c, 0.0) for c in COEFFICIENTS])
        meas.append(value)
        weights.append(weight)

    for run in runs:
        cols = {c: _predict_at(run, _basis(c), prior_lat).step_time_s for c in COEFFICIENTS if c != "step_overhead_s"}
        add({**cols, "step_overhead_s": 1.0}, run.measured_step_s, STEP_WEIGHT)
        ph = run.phases
        if not ph:
            continue
        ph = _scaled_phases(ph, run.phase_factor)
        s = run.plan.strategy
        last = len(s.stages) - 1
        ranks_per_stage = len(ph["forward_s"]) // s.pp
        f0, _ = _stage_compute(run, 0, _basis("compute_scale_fwd"))
        fwd = ph["forward_s"][0]
        if fwd > 0 and f0 > 0 and s.tp == 1 and s.cp == 1 and s.zero_stage < 3:
            add({"compute_scale_fwd": f0}, fwd)
        # The last stage's backward: at its scales (forward scale for the recompute share).
        _, lb = _stage_compute(run, last, _basis("compute_scale_bwd"))
        _, lr = _stage_compute(run, last, _basis("compute_scale_fwd"))
        bwd = ph["backward_s"][last * ranks_per_stage]
        if s.pp > 1 and s.tp == 1 and bwd > 0 and lb > 0:
            add({"compute_scale_fwd": lr, "compute_scale_bwd": lb}, bwd)
        opt = statistics.mean(ph["optimizer_s"])
        if opt > 0 and cols["optimizer_scale"] > 0:
            add({"optimizer_scale": cols["optimizer_scale"]}, opt)
        if s.pp == 1 and s.cp == 1:
            kinds = [k for k in ("all_reduce", "all_gather", "reduce_scatter") if k in ph["comm_s"]]
            if kinds:
                per_rank = [sum(ph["comm_s"][k][r] for k in kinds) for r in range(len(ph["forward_s"]))]
                if min(per_rank) > 0 and (cols["link_time_scale"] > 0 or cols["latency_s"] > 0):
                    add({"link_time_scale": cols["link_time_scale"], "latency_s": cols["latency_s"]}, min(per_rank))
    return rows, meas, [max(m, 1e-9) / w for m, w in zip(meas, weights)]


def _scaled_phases(ph: dict, factor: float) -> dict:
    out = {k: [v * factor for v in ph[k]] for k in ("forward_s", "backward_s", "optimizer_s")}
    out["comm_s"] = {k: [v * factor for v in vals] for k, vals in ph.get("comm_s", {}).items()}
    return out


def fit_calibration(runs: list[RunData], prior_weight: float = PRIOR_WEIGHT) -> Calibration:
    """Fit a :class:`Calibration` to launched runs of one cluster, backend and dtype (module docstring).

    Raises:
        CalibrationError: no runs, or runs of different clusters, backends, dtypes or device kinds.
    """
    if not runs:
        raise CalibrationError("give at least one run directory")
    first = runs[0]
    for run in runs[1:]:
        for what, ours, theirs in (("cluster", first.plan.cluster.name, run.plan.cluster.name),
                                   ("backend", first.backend, run.backend),
                                   ("dtype", first.plan.train.dtype, run.plan.train.dtype)):
            if ours != theirs:
                raise CalibrationError(f"{run.run_dir} ran on {what} {theirs}, {first.run_dir} on {ours}: "
                                       f"calibrate each {what} separately")
    prior_lat = prior_latency_s(first.plan.cluster, first.profile)
    rows, meas, scale = _equations(runs, prior_lat)
    a = np.array(rows) / np.array(scale)[:, None]
    b = np.array(meas) / np.array(scale)
    typical_step = statistics.median(r.measured_step_s for r in runs)
    prior = {"compute_scale_fwd": 1.0, "compute_scale_bwd": 1.0, "link_time_scale": 1.0, "latency_s": prior_lat,
             "optimizer_scale": 1.0, "step_overhead_s": 0.0,
             # what `paraplan profile` measured for this backend (median over the runs' profiles), else 0
             "tp_overhead_s": statistics.median(_measured_overhead(r, "tp", prior_lat) for r in runs),
             "zero3_fetch_overhead_s": statistics.median(_measured_overhead(r, "zero3", prior_lat) for r in runs)}
    # A block's profiled forward + backward: the scale of the per-block and per-fetch overheads.
    block = statistics.median(lp.fwd_time_s + lp.bwd_time_s for r in runs for lp in r.profile.layers
                              if lp.kind == "block")
    prior_scale = {**{c: 1.0 for c in COEFFICIENTS}, "latency_s": max(prior_lat, 1e-5),
                   "tp_overhead_s": block, "zero3_fetch_overhead_s": block, "step_overhead_s": typical_step}
    reg = np.diag([prior_weight / prior_scale[c] for c in COEFFICIENTS])
    reg_b = np.array([prior_weight * prior[c] / prior_scale[c] for c in COEFFICIENTS])
    x = nnls(np.vstack([a, reg]), np.concatenate([b, reg_b]))
    coef = dict(zip(COEFFICIENTS, (float(v) for v in x)))
    mem_scale, mem_offset = _fit_memory(runs, prior_weight)
    out_runs = []
    for run in runs:
        uncal = predict(*plan_costs_at(run.plan, *transform_inputs(run.plan.cluster, run.profile, 1, 1, 1,
                                                                   prior_lat, 1), run.backend))
        cal = _predict_at(run, coef, prior_lat)
        basis_sum = sum(_predict_at(run, _basis(c), prior_lat).step_time_s * prior[c] for c in COEFFICIENTS[:-1]
                        if prior[c])
        out_runs.append(CalibrationRun(
            run_dir=str(run.run_dir), model=run.plan.model.name, strategy=strategy_label(run.plan),
            steps_timed=len(run.timed), measured_step_s=run.measured_step_s, predicted_step_s=uncal.step_time_s,
            calibrated_step_s=cal.step_time_s + coef["step_overhead_s"],
            measured_peak_bytes=run.measured_peak_bytes, predicted_peak_bytes=uncal.peak_memory_bytes,
            calibrated_peak_bytes=mem_scale * cal.peak_memory_bytes + mem_offset, phases=run.phases is not None,
            additivity_error=abs(basis_sum - uncal.step_time_s) / uncal.step_time_s if uncal.step_time_s else 0.0,
        ))
    return Calibration(
        cluster=first.plan.cluster.name, device_kind=first.plan.cluster.device.kind,  # type: ignore[arg-type]
        backend=first.backend, dtype=first.plan.train.dtype,  # type: ignore[arg-type]
        models=sorted({r.plan.model.name for r in runs}), **coef,
        mechanisms=sorted({m for r in runs for m in plan_mechanisms(r.plan)}), memory_scale=mem_scale,
        memory_offset_bytes=mem_offset, prior=prior,
        step_rms_rel_error=_rms([(r.calibrated_step_s - r.measured_step_s) / r.measured_step_s for r in out_runs]),
        memory_rms_rel_error=_rms([(r.calibrated_peak_bytes - r.measured_peak_bytes) / r.measured_peak_bytes
                                   for r in out_runs]),
        runs=out_runs,
    )


def _fit_memory(runs: list[RunData], prior_weight: float) -> tuple[float, float]:
    """``measured peak = scale x predicted + offset`` (scale > 0, relative errors, prior scale 1 and offset 0)."""
    preds = [r.plan.predicted.peak_memory_bytes for r in runs]
    meas = [r.measured_peak_bytes for r in runs]
    typical = statistics.median(meas)
    a = [[p / m, 1.0 / m * typical] for p, m in zip(preds, meas)]  # offset in units of the typical peak
    b = [1.0] * len(runs)
    a += [[prior_weight, 0.0], [0.0, prior_weight]]
    b += [prior_weight, 0.0]
    sol, *_ = np.linalg.lstsq(np.array(a), np.array(b), rcond=None)
    scale = max(float(sol[0]), 1e-3)
    return scale, float(sol[1]) * typical


def _rms(values: list[float]) -> float:
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0


def plan_mechanisms(plan) -> list[str]:
    """The overhead mechanisms of :data:`COEFFICIENTS` a plan (or an ``estimate`` StrategySpec: anything with
    ``tp`` and ``zero_stage``, or a ``strategy`` that has them) exercises: 'tp' (tp > 1), 'zero3' (ZeRO-3)."""
    s = getattr(plan, "strategy", plan)
    return [m for m, used in (("tp", s.tp > 1), ("zero3", s.zero_stage == 3)) if used]


def uncovered_mechanisms(cal: Calibration, plan) -> list[str]:
    """Mechanisms ``plan`` uses that none of ``cal``'s runs exercised: their overheads are the profile's (measured
    by ``paraplan profile`` in two processes, or 0 without that measurement: on cpu:2 an under-prediction of tp by
    20-40 ms per block and micro-batch, benchmarks/results/calibration.md)."""
    return [m for m in plan_mechanisms(plan) if m not in cal.mechanisms]


MECHANISM_NAMES = {"tp": "tensor parallelism (tp > 1)", "zero3": "ZeRO-3"}


def coverage_warning(cal: Calibration, plan) -> str | None:
    """One line saying what the calibration did not see of ``plan``, or None."""
    missing = uncovered_mechanisms(cal, plan)
    if not missing:
        return None
    names = " and ".join(MECHANISM_NAMES[m] for m in missing)
    return (f"the calibration saw no run with {names}: the plan's {names} overheads are the profile's uncalibrated "
            "ones (measured by `paraplan profile` in two processes, else 0); add a run of it to `paraplan calibrate` "
            "(or use `launch --calibrate`, which tries the plan it picks)")


def strategy_label(plan: Plan) -> str:
    s = plan.strategy
    recompute = sum(st.recompute_blocks for st in s.stages)
    selective = sum(st.selective_blocks for st in s.stages)
    out = f"dp={s.dp} tp={s.tp} pp={s.pp} mb={s.micro_batch_size} m={s.grad_accum} zero={s.zero_stage}"
    if recompute:
        out += f" recompute={recompute}"
    if selective:
        out += f" selective={selective}"
    return out


# ---- applying a calibration ------------------------------------------------------------------------------------

def check_calibration(cal: Calibration, cluster: ClusterSpec, backend: str | None, dtype: str) -> None:
    """Refuse a calibration made for another cluster, backend or dtype than the plan's.

    Raises:
        CalibrationError: what differs and what to do.
    """
    if cal.cluster != cluster.name or cal.device_kind != cluster.device.kind:
        raise CalibrationError(f"the calibration is for cluster {cal.cluster}, the plan for {cluster.name}: "
                               f"calibrate on runs of {cluster.name} (`paraplan calibrate RUN_DIR...`) or drop "
                               "--calibration")
    if backend != cal.backend:
        raise CalibrationError(f"the calibration is for the {cal.backend} backend, the plan for "
                               f"{backend or 'no backend (the generic model)'}: pass --backend {cal.backend}, or "
                               f"calibrate on runs of {backend or 'that backend'}")
    if dtype != cal.dtype:
        raise CalibrationError(f"the calibration is for dtype {cal.dtype}, the plan for {dtype}: pass --dtype "
                               f"{cal.dtype}, or calibrate on {dtype} runs")


def fitted_overheads(cal: Calibration) -> tuple[float | None, float | None]:
    """(tp, ZeRO-3 fetch) overheads ``cal`` sets: its fitted value for a mechanism its runs exercised, None (the
    profile's own, measured by `paraplan profile`) for one they did not."""
    return (cal.tp_overhead_s if "tp" in cal.mechanisms else None,
            cal.zero3_fetch_overhead_s if "zero3" in cal.mechanisms else None)


def apply_calibration(cal: Calibration, cluster: ClusterSpec, profile: ModelProfile | None
                      ) -> tuple[ClusterSpec, ModelProfile]:
    """The planner's inputs under ``cal`` (module docstring): scaled profile, fitted links and optimizer rate, and
    a device capacity on the uncalibrated model's scale, ``(capacity - offset) / memory_scale``.

    Raises:
        CalibrationError: no profile (a calibration scales measured layer times).
    """
    if profile is None:
        raise CalibrationError("--calibration scales a profile's measured layer times: pass --profile too")
    cluster, profile = transform_inputs(cluster, profile, cal.compute_scale_fwd, cal.compute_scale_bwd,
                                        cal.link_time_scale, cal.latency_s, cal.optimizer_scale,
                                        *fitted_overheads(cal))
    capacity = (cluster.device.memory_bytes - cal.memory_offset_bytes) / cal.memory_scale
    if capacity <= 0:
        raise CalibrationError(f"the calibrated runtime overhead ({cal.memory_offset_bytes / 2**30:.2f} GiB) "
                               "leaves no device memory; give more memory per device (--device-memory)")
    device = cluster.device.model_copy(update={"memory_bytes": capacity})
    sources = {**cluster.sources, "calibration": f"{cal.backend} on {cal.cluster} ({', '.join(cal.models)})"}
    return cluster.model_copy(update={"device": device, "sources": sources}), profile


def calibrated_peak_bytes(cal: Calibration, predicted: float) -> float:
    return cal.memory_scale * predicted + cal.memory_offset_bytes


def calibrated_plan(cal: Calibration, plan: Plan, capacity_bytes: float) -> Plan:
    """A plan searched on :func:`apply_calibration`'s inputs, with its prediction in measured units: step time
    plus ``step_overhead_s`` (throughput and MFU follow), peaks mapped, the device capacity restored."""
    pred = plan.predicted
    step = pred.step_time_s + cal.step_overhead_s
    ratio = pred.step_time_s / step if step > 0 else 1.0
    stages = [st.model_copy(update={"memory_bytes": calibrated_peak_bytes(cal, st.memory_bytes)})
              for st in plan.strategy.stages]
    new_pred = pred.model_copy(update={
        "step_time_s": step, "tokens_per_s": pred.tokens_per_s * ratio, "mfu": pred.mfu * ratio,
        "peak_memory_bytes": calibrated_peak_bytes(cal, pred.peak_memory_bytes),
        "memory_capacity_bytes": capacity_bytes})
    device = plan.cluster.device.model_copy(update={"memory_bytes": capacity_bytes})
    return plan.model_copy(update={"predicted": new_pred, "cluster": plan.cluster.model_copy(update={"device": device}),
                                   "strategy": plan.strategy.model_copy(update={"stages": stages})})


def predict_calibrated(cal: Calibration, plan: Plan, profile: ModelProfile) -> tuple[float, float]:
    """(step time s, peak memory bytes per rank) of ``plan``'s strategy and stages as they are (not re-planned)
    under ``cal``: the cost model on :func:`transform_inputs`' inputs, plus ``step_overhead_s``, peak mapped.

    Raises:
        CalibrationError: ``cal`` is for another cluster or dtype.
    """
    if cal.cluster != plan.cluster.name or cal.dtype != plan.train.dtype:
        raise CalibrationError(f"the calibration is for {cal.cluster}/{cal.dtype}, the plan for "
                               f"{plan.cluster.name}/{plan.train.dtype}")
    cluster, prof = transform_inputs(plan.cluster, profile, cal.compute_scale_fwd, cal.compute_scale_bwd,
                                     cal.link_time_scale, cal.latency_s, cal.optimizer_scale,
                                     *fitted_overheads(cal))
    pred = predict(*plan_costs_at(plan, cluster, prof, cal.backend))
    return pred.step_time_s + cal.step_overhead_s, calibrated_peak_bytes(cal, pred.peak_memory_bytes)


def calibrated_estimate(cal: Calibration, est, capacity_bytes: float):
    """An ``estimate_strategy`` result on :func:`apply_calibration`'s inputs in measured units (as
    :func:`calibrated_plan`): step time plus ``step_overhead_s`` (rates follow), peak mapped, capacity restored."""
    step = est.step_time_s + cal.step_overhead_s
    ratio = est.step_time_s / step if step > 0 else 1.0
    return dataclasses.replace(
        est, step_time_s=step, optimizer_s=est.optimizer_s, tokens_per_s=est.tokens_per_s * ratio,
        model_tflops_per_device=est.model_tflops_per_device * ratio,
        hardware_tflops_per_device=est.hardware_tflops_per_device * ratio, mfu=est.mfu * ratio, hfu=est.hfu * ratio,
        peak_memory_bytes=calibrated_peak_bytes(cal, est.peak_memory_bytes), memory_capacity_bytes=capacity_bytes)


def read_calibration(path: Path) -> Calibration:
    """Raises: CalibrationError: a missing or invalid file."""
    try:
        return Calibration.model_validate_json(Path(path).read_text())
    except FileNotFoundError:
        raise CalibrationError(f"calibration file {path} does not exist; write it with `paraplan calibrate "
                               "RUN_DIR... -o FILE`") from None
    except ValueError as exc:
        raise CalibrationError(f"calibration file {path} is not a calibration ({str(exc).splitlines()[0]}); "
                               "write it with `paraplan calibrate`") from None


def write_calibration(cal: Calibration, path: Path) -> None:
    """Write atomically (``files.write_atomic``: a temporary file in the same directory, then renamed).

    Raises:
        OutputError: the path cannot be written.
    """
    from paraplan.files import write_atomic

    write_atomic(Path(path), cal.model_dump_json(indent=2) + "\n", "-o")


__all__ = ["Calibration", "CalibrationError", "CalibrationRun", "apply_calibration",
           "calibrated_plan", "check_calibration", "coverage_warning", "fit_calibration", "plan_mechanisms",
           "read_calibration", "read_run", "uncovered_mechanisms", "write_calibration"]
