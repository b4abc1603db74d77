"""The report's figures, drawn with matplotlib's Agg backend (no display, no JavaScript; PNG and SVG files).

Each function takes what a plan (and a run) hold, already taken apart by :mod:`paraplan.report.breakdown` and
:mod:`paraplan.report.schedule`, and returns a :class:`matplotlib.figure.Figure`. Units on the axes: seconds or
milliseconds for time, GiB for memory (:mod:`paraplan.units`).
"""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display on servers and CI

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from paraplan.report.breakdown import MEMORY_CLASSES, PlanCosts  # noqa: E402
from paraplan.report.schedule import Timeline  # noqa: E402
from paraplan.types import Plan  # noqa: E402
from paraplan.units import GiB  # noqa: E402

# One colour per kind of work (colour-blind-safe Okabe-Ito palette, then greys).
COLORS = {
    "forward": "#0072B2", "backward": "#009E73", "weight gradient": "#8FD9B6", "recompute": "#E69F00",
    "communication": "#D55E00", "offload transfer": "#CC79A7", "data-parallel communication": "#882255",
    "optimizer step": "#555555", "offloaded optimizer step": "#AA4499", "bubble": "#EEEEEE",
}
MEMORY_COLORS = dict(zip(MEMORY_CLASSES, ("#0072B2", "#56B4E9", "#009E73", "#E69F00", "#F0E442", "#999999",
                                          "#CC79A7")))


def _time_unit(seconds: float) -> tuple[float, str]:
    return (1e3, "ms") if seconds < 2 else (1.0, "s")


def timeline_figure(plan: Plan, timeline: Timeline, costs: PlanCosts) -> Figure:
    """The first step per pipeline rank: forward (F), backward (B, or I and W for zero-bubble schedules),
    recomputation, exposed communication and offload transfers per micro-batch, idle time (bubble) behind them,
    then the per-step work (exposed data-parallel communication, optimizer step). With vpp > 1 each virtual
    stage's operations carry its index (when few enough to read) and later chunks of a rank are drawn lighter."""
    s = plan.strategy
    scale, unit = _time_unit(timeline.step_s)
    n_ranks = len(timeline.end_s)
    fig = Figure(figsize=(12, 1.4 + 0.55 * n_ranks), layout="constrained")
    ax = fig.add_subplot()
    for r in range(n_ranks):
        ax.broken_barh([(0, timeline.pipeline_s * scale)], (r - 0.4, 0.8), facecolors=COLORS["bubble"],
                       edgecolor="none")
    # Micro-batch numbers fit when the pipeline has few operations; larger schedules would be unreadable.
    ops_per_rank = max(1, len({(sg.stage, sg.micro_batch, sg.op) for sg in timeline.segments}) // max(1, n_ranks))
    label_ops = ops_per_rank <= 48
    # One broken_barh call per (rank, kind, chunk shade): thousands of operations draw in one pass each. With
    # vpp > 1 later virtual stages of a rank are drawn lighter.
    bars: dict[tuple[int, str, float], list[tuple[float, float]]] = {}
    for sg in timeline.segments:
        chunk = sg.stage // s.pp if sg.stage >= 0 else 0
        shade = 1.0 - 0.5 * chunk / max(1, s.vpp - 1) if s.vpp > 1 else 1.0
        bars.setdefault((sg.rank, sg.what, shade), []).append((sg.start_s * scale, sg.duration_s * scale))
    for (rank, what, shade), spans in bars.items():
        ax.broken_barh(spans, (rank - 0.4, 0.8), facecolors=COLORS.get(what, "#000000"), alpha=shade,
                       edgecolor="white" if label_ops else "none", linewidth=0.3)
    if label_ops:
        firsts: dict[tuple, tuple[float, float]] = {}
        for sg in timeline.segments:
            if sg.stage < 0:
                continue
            key = (sg.rank, sg.stage, sg.micro_batch, sg.op)
            start, end = firsts.get(key, (sg.start_s, sg.start_s))
            firsts[key] = (min(start, sg.start_s), max(end, sg.start_s + sg.duration_s))
        for (rank, stage, mb, op), (start, end) in firsts.items():
            text = f"{op}{mb}" if s.vpp == 1 else f"{op}{mb}.{stage}"
            ax.text((start + end) / 2 * scale, rank, text, ha="center", va="center", fontsize=6, color="white")
    ax.set_yticks(range(n_ranks), [f"rank {r}" for r in range(n_ranks)])
    ax.invert_yaxis()
    ax.set_xlabel(f"time in the first step ({unit})")
    ax.set_xlim(0, max(timeline.step_s, 1e-12) * scale * 1.01)
    used = {sg.what for sg in timeline.segments} | {"bubble"}
    fig.legend(handles=[Patch(facecolor=COLORS[k], label=k) for k in COLORS if k in used], ncols=10, fontsize=8,
               loc="outside lower center", frameon=False)
    name = {"1f1b": "1F1B", "interleaved_1f1b": f"interleaved 1F1B (vpp={s.vpp})",
            "zero_bubble": f"interleaved zero bubble (vpp={s.vpp})", "zbv": "ZB-V"}[s.schedule]
    bubble = max(timeline.bubble_s, default=0.0)
    ax.set_title(f"{name}: pp={s.pp}, {s.grad_accum} micro-batches; timeline pipeline {timeline.pipeline_s * scale:.4g} "
                 f"{unit} (cost model {costs.pipeline_s * scale:.4g} {unit}), largest bubble "
                 f"{bubble * scale:.4g} {unit}, step {timeline.step_s * scale:.4g} {unit}", fontsize=9)
    return fig


def tier_fill(costs: PlanCosts, cpu: bool = False) -> dict[str, tuple[float, float]]:
    """(peak bytes per device, capacity per device) of each memory tier: device, host (not on CPU clusters, whose
    device memory is host memory) and NVMe."""
    out = {"device": (max(m.device_bytes for m in costs.memory), costs.capacity_bytes)}
    if not cpu:
        out["host"] = (max(m.host_bytes for m in costs.memory), costs.host_capacity_bytes)
    out["NVMe"] = (max(m.nvme_bytes for m in costs.memory), costs.nvme_capacity_bytes)
    return out


def binding_tier(costs: PlanCosts, cpu: bool = False) -> str:
    """The memory tier with the least headroom relative to its capacity ("device", "host" or "NVMe")."""
    fills = tier_fill(costs, cpu)
    return max(fills, key=lambda k: fills[k][0] / fills[k][1] if fills[k][1] > 0 else 0.0)


def memory_figure(plan: Plan, costs: PlanCosts) -> Figure:
    """Memory per pipeline rank: the device stack by class against device memory, and what the rank keeps in host
    memory and on NVMe against its share of them; the tier with the least headroom (binding) is marked in red.
    On CPU clusters the device is host memory, so there is no separate host panel."""
    cpu = plan.cluster.device.kind == "cpu"
    n = len(costs.memory)
    stages = list(range(n))
    fills = tier_fill(costs, cpu)
    binding = binding_tier(costs, cpu)
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = fig.subplots(1, len(fills), width_ratios=(3,) + (1,) * (len(fills) - 1))
    ax = axes[0]
    bottom = [0.0] * n
    for cls in MEMORY_CLASSES:
        vals = [m.device[cls] / GiB for m in costs.memory]
        if any(v > 0 for v in vals):
            ax.bar(stages, vals, bottom=bottom, color=MEMORY_COLORS[cls], label=cls, width=0.6)
            bottom = [b + v for b, v in zip(bottom, vals)]
    used_of = {"host": [m.host_bytes for m in costs.memory], "NVMe": [m.nvme_bytes for m in costs.memory]}
    for a, (tier, (peak, cap)) in zip(axes, fills.items()):
        if tier in used_of:
            # Not a device class's colour: what a rank keeps here is offloaded states and paged activations.
            a.bar(stages, [u / GiB for u in used_of[tier]], color="#D55E00" if tier == "host" else "#6A3D9A",
                  width=0.6, hatch="//", edgecolor="white",
                  label="offloaded states + paged activations" if tier == "host" else "offloaded states")
            if any(u > 0 for u in used_of[tier]):
                a.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, 0.86), framealpha=0.9)
        red = tier == binding
        color = "#C00000" if red else "black"
        a.axhline(cap / GiB, color=color, linestyle="-" if red else "--", linewidth=2 if red else 1)
        a.text(0.02, cap / GiB, f" capacity {cap / GiB:,.1f} GiB", transform=a.get_yaxis_transform(), va="bottom",
               fontsize=8, color=color)
        share = f"{peak / cap:.0%}" if cap > 0 else "n/a"
        a.set_title(f"{tier}{' (binding)' if red else ''}\npeak {peak / GiB:,.2f} GiB = {share}", fontsize=9,
                    color=color)
        a.set_xticks(stages, [f"rank {r}" for r in stages] if n <= 8 else [str(r) for r in stages])
        a.set_xlim(-0.8, max(n - 1, 1) + 0.8)
        a.set_ylabel("GiB per device")
        a.set_ylim(0, max(cap, peak) / GiB * (1.35 if a is ax else 1.12))  # room for the legend
    ax.legend(fontsize=8, loc="upper center", ncols=4, framealpha=0.9)
    title = (f"memory per pipeline rank ({'device memory is host memory on a CPU cluster; ' if cpu else ''}"
             f"planner's binding limit: {plan.predicted.binding or 'n/a'})")
    fig.suptitle(textwrap.fill(title, 160), fontsize=9)
    return fig


def candidates_figure(plan: Plan) -> Figure:
    """Predicted step time against peak device memory of every candidate the search took up: solved (MILP
    solution), infeasible and timed-out (at their lower bounds), the top-k numbered and the chosen plan starred;
    pruned candidates (step-time bound only) in a strip on the right. The device capacity is the vertical line."""
    fig = Figure(figsize=(10, 5), layout="constrained")
    ax, strip = fig.subplots(1, 2, width_ratios=(5, 1), sharey=True)
    recs = plan.candidates or []
    styles = {"solved": ("o", "#0072B2", "solved (MILP solution)"),
              "infeasible": ("x", "#C00000", "infeasible (lower bounds)"),
              "timeout": ("^", "#E69F00", "MILP timed out (lower bounds)")}
    for outcome, (marker, color, label) in styles.items():
        pts = [(r.peak_memory_bytes / GiB, r.step_time_s) for r in recs
               if r.outcome == outcome and r.peak_memory_bytes is not None and r.step_time_s is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, s=22, alpha=0.7,
                       label=f"{label}: {len(pts)}")
    for r in recs:
        if r.rank is not None and r.peak_memory_bytes is not None:  # offsets keep near-equal plans' ranks apart
            ax.annotate(str(r.rank), (r.peak_memory_bytes / GiB, r.step_time_s), fontsize=9, fontweight="bold",
                        xytext=(5, 5 if r.rank % 2 else -13), textcoords="offset points")
    pred = plan.predicted
    ax.scatter([pred.peak_memory_bytes / GiB], [pred.step_time_s], marker="*", s=260, color="#F0E442",
               edgecolor="black", zorder=5, label="chosen plan")
    ax.axvline(plan.cluster.device.memory_bytes / GiB, color="black", linestyle="--", linewidth=1,
               label=f"device memory {plan.cluster.device.memory_bytes / GiB:,.1f} GiB")
    pruned = [r.step_time_s for r in recs if r.outcome == "pruned" and r.step_time_s is not None]
    if pruned:
        xs = [(i * 0.618) % 1 for i in range(len(pruned))]  # deterministic spread, not random jitter
        strip.scatter(xs, pruned, marker=".", color="#999999", s=10)
    strip.set_xticks([])
    strip.set_xlim(-0.1, 1.1)
    strip.set_title(f"pruned: {len(pruned)}\n(step-time bounds)", fontsize=8)
    ys = [r.step_time_s for r in recs if r.step_time_s is not None] + [pred.step_time_s]
    if max(ys) > 10 * min(ys):  # bounds of far-off candidates would squash the rest on a linear axis
        ax.set_yscale("log")
    # Candidates with no finite step-time bound (no stage split fits at all): on the top edge, at their memory bound.
    unbounded = [r.peak_memory_bytes / GiB for r in recs if r.step_time_s is None and r.peak_memory_bytes is not None]
    if unbounded:
        top = max(ys) * 1.15
        ax.scatter(unbounded, [top] * len(unbounded), marker="x", color="#C00000", s=22, alpha=0.4,
                   label=f"no stage split fits (no step bound, drawn on top): {len(unbounded)}")
    ax.set_xlabel("peak device memory per device (GiB)")
    ax.set_ylabel("predicted step time (s)")
    ax.legend(fontsize=8, loc="best")
    if plan.candidates is None:
        title = "candidate space: this plan file has none (written before paraplan kept it); re-run paraplan plan"
    else:
        title = (f"candidate space: {len(recs)} candidates taken up of {plan.solver.candidates} "
                 f"({sum(plan.solver.excluded.values())} excluded by a rule before the search)")
    ax.set_title(title, fontsize=9)
    return fig


def predicted_phases(plan: Plan, costs: PlanCosts) -> dict[str, float]:
    """Predicted seconds per step of the slowest pipeline rank in each phase the trainers measure: forward (its m
    micro-batches' forward pieces, exposed communication included), backward (recomputation, backward, weight
    gradient, communication), optimizer (device and offloaded optimizer steps) and the whole step."""
    s = plan.strategy
    fwd, bwd = [0.0] * s.pp, [0.0] * s.pp
    for v in s.virtual_stages():
        ot = costs.op_times[v.index]
        fwd[v.rank] += s.grad_accum * sum(d for _, d in ot.forward)
        bwd[v.rank] += s.grad_accum * sum(d for _, d in ot.backward)
    opt = [sum(d for what, d in costs.tail[r] if "optimizer" in what) for r in range(s.pp)]
    return {"forward_s": max(fwd), "backward_s": max(bwd), "optimizer_s": max(opt),
            "step_s": plan.predicted.step_time_s}


def phases_figure(plan: Plan, costs: PlanCosts, row: dict) -> Figure:
    """One profiled step's measured time per phase and rank (``metrics.jsonl`` ``phases``, paraplan.backends.phases:
    ``{"forward_s", "backward_s", "optimizer_s", "step_s": [per rank], "comm_s": {kind: [per rank]}}``) beside
    the prediction for the slowest pipeline rank (:func:`predicted_phases`). Collective times overlap compute, so
    the bars are side by side, not stacked."""
    ph = row["phases"]

    def per_rank(value) -> list[float]:
        return [float(x) for x in value] if isinstance(value, list) else [float(value)]

    cats: list[tuple[str, list[float]]] = [(k.removesuffix("_s"), per_rank(ph[k]))
                                           for k in ("forward_s", "backward_s", "optimizer_s", "step_s") if k in ph]
    cats += [(f"{kind} (comm)", per_rank(v)) for kind, v in (ph.get("comm_s") or {}).items()]
    pred = predicted_phases(plan, costs)
    n_ranks = max((len(v) for _, v in cats), default=1)
    width = 0.8 / (n_ranks + 1)
    fig = Figure(figsize=(12, 3.8), layout="constrained")
    ax = fig.add_subplot()
    xs = range(len(cats))
    palette = ["#0072B2", "#56B4E9", "#009E73", "#E69F00", "#CC79A7", "#999999", "#D55E00", "#F0E442"]
    for r in range(n_ranks):
        ax.bar([x + r * width for x in xs], [v[r] if r < len(v) else 0.0 for _, v in cats], width=width,
               color=palette[r % len(palette)], label=f"rank {r} measured" if n_ranks <= 8 else None)
    ax.bar([x + n_ranks * width for x in xs], [pred.get(f"{name}_s", float("nan")) for name, _ in cats], width=width,
           color="white", edgecolor="#C00000", hatch="//", label="predicted (slowest pipeline rank)")
    ax.set_xticks([x + n_ranks * width / 2 for x in xs], [name for name, _ in cats])
    ax.set_ylabel("seconds")
    ax.set_title(f"time per phase of profiled step {row['step']} (torch.profiler)", fontsize=9)
    ax.legend(fontsize=8, ncols=min(n_ranks + 1, 5))
    return fig


def run_figures(plan: Plan, rows: list[dict], costs: PlanCosts) -> dict[str, Figure]:
    """Measured against predicted per step (step time, peak memory), the loss curve and, when a row carries
    ``phases`` (a profiled step), its time per phase (:func:`phases_figure`). ``rows``: one metrics.jsonl row per
    step (the last one of each step)."""
    steps = [r["step"] for r in rows]
    out: dict[str, Figure] = {}
    fig = Figure(figsize=(12, 3.6), layout="constrained")
    ax_t, ax_m, ax_l = fig.subplots(1, 3)
    times = [r.get("step_time_s") for r in rows]
    ax_t.plot(steps, times, marker="o", markersize=3, label="measured")
    ax_t.axhline(plan.predicted.step_time_s, color="#C00000", linestyle="--", label="predicted")
    ax_t.set_xlabel("step")
    ax_t.set_ylabel("step time (s)")
    ax_t.set_ylim(bottom=0)
    ax_t.legend(fontsize=8)
    ax_t.set_title("step time", fontsize=9)
    mems = [r.get("peak_memory_bytes") or [] for r in rows]
    ax_m.plot(steps, [max(m, default=0) / GiB for m in mems], marker="o", markersize=3,
              label="measured (busiest rank)")
    ax_m.axhline(plan.predicted.peak_memory_bytes / GiB, color="#C00000", linestyle="--", label="predicted peak")
    ax_m.set_xlabel("step")
    ax_m.set_ylabel("GiB per device")
    ax_m.set_ylim(bottom=0)
    ax_m.legend(fontsize=8)
    ax_m.set_title("peak memory", fontsize=9)
    ax_l.plot(steps, [r.get("loss") for r in rows], marker="o", markersize=3, color="#009E73")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("loss")
    ax_l.set_title("training loss", fontsize=9)
    out["run"] = fig
    phased = [r for r in rows if isinstance(r.get("phases"), dict) and r["phases"]]
    if phased:
        out["phases"] = phases_figure(plan, costs, phased[-1])
    return out
