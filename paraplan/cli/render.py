"""Rich rendering of plans and of measured-vs-predicted results."""

from __future__ import annotations

import statistics

from rich.console import Console
from rich.table import Table

from paraplan.types import MemoryBreakdown, Plan
from paraplan.units import format_bytes, format_seconds

WARMUP_STEPS = 2  # steps excluded from the measured mean (allocator and kernel warm-up)


def schedule_label(plan: Plan) -> str:
    """``1f1b``, ``interleaved_1f1b x4`` (vpp 4), ``zbv``...; ``-`` without a pipeline."""
    s = plan.strategy
    if s.pp == 1:
        return "-"
    return s.schedule + (f" x{s.vpp}" if s.vpp > 1 and s.schedule != "zbv" else "")


def recompute_label(plan: Plan) -> str:
    """Blocks recomputed in full and selectively (with the policy) out of all, e.g. ``4/32 full, 28 op``."""
    s = plan.strategy
    L = sum(st.n_blocks for st in s.stages)
    full = sum(st.recompute_blocks for st in s.stages)
    sel = sum(st.selective_blocks for st in s.stages)
    policy = {"attention": "selective", "op": "op-selective"}[s.selective_policy]
    return f"{full}/{L} full" + (f", {sel} {policy}" if sel else "")


def offload_label(plan: Plan) -> str:
    """Where states and activations go besides the device: ``opt:nvme params:nvme act:12/80`` or ``-``."""
    s = plan.strategy
    parts = []
    if s.offload_optimizer != "none":
        parts.append(f"opt:{s.offload_optimizer}" + (f" {s.offload_ratio:.0%}" if s.offload_ratio < 1 else ""))
    if s.offload_param != "none":
        parts.append(f"params:{s.offload_param}")
    paged = sum(st.offload_blocks for st in s.stages)
    if paged:
        parts.append(f"act:{paged}/{sum(st.n_blocks for st in s.stages)}->{s.activation_tier}")
    return " ".join(parts) or "-"


def render_plans(console: Console, plans: list[Plan]) -> None:
    """Table of the best plans, then the stage assignment and cost breakdown of the best one."""
    best = plans[0]
    title = (f"{best.model.name} on {best.cluster.name}: global batch {best.train.global_batch} x seq "
             f"{best.train.seq_len}, {best.train.dtype} (compute from {best.predicted.compute_source})")
    table = Table(title=title)
    moe = best.model.moe is not None
    for col in ("#", "dp", "tp", "pp", "cp", *(("ep", "etp") if moe else ()), "mb", "accum", "schedule", "ZeRO", "sp",
                "recompute", "offload", "step", "tokens/s", "MFU", "peak mem / capacity"):
        table.add_column(col, justify="right")
    for i, plan in enumerate(plans, 1):
        s, p = plan.strategy, plan.predicted
        table.add_row(
            str(i), str(s.dp), str(s.tp), str(s.pp), str(s.cp), *((str(s.ep), str(s.etp)) if moe else ()),
            str(s.micro_batch_size), str(s.grad_accum),
            schedule_label(plan), str(s.zero_stage), "yes" if s.sequence_parallel else "-", recompute_label(plan),
            offload_label(plan), format_seconds(p.step_time_s),
            # A CPU's peak FLOP/s in the catalog is nominal, so its MFU would mean nothing.
            f"{p.tokens_per_s:,.0f}", f"{p.mfu:.1%}" if plan.cluster.device.kind == "cuda" else "n/a",
            f"{format_bytes(p.peak_memory_bytes)} / {format_bytes(p.memory_capacity_bytes)}",
        )
    console.print(table)
    stages = Table(title="best plan: pipeline stages")
    for col in ("stage", "layers", "blocks", "full recompute", "selective", "paged", "time / micro-batch", "memory"):
        stages.add_column(col, justify="right")
    chunks: dict[int, list[str]] = {}
    for vs in best.strategy.virtual_stages():
        chunks.setdefault(vs.rank, []).append(f"{vs.first_layer}-{vs.last_layer}")
    for st in best.strategy.stages:
        layers = ", ".join(chunks[st.index]) if len(chunks[st.index]) <= 4 else \
            f"{len(chunks[st.index])} chunks: {chunks[st.index][0]}, ..., {chunks[st.index][-1]}"
        stages.add_row(str(st.index), layers, str(st.n_blocks), str(st.recompute_blocks),
                       str(st.selective_blocks), str(st.offload_blocks), format_seconds(st.time_per_micro_batch_s),
                       format_bytes(st.memory_bytes))
    console.print(stages)
    p, m = best.predicted, best.predicted.memory_breakdown_bytes
    console.print(
        f"step {format_seconds(p.step_time_s)} = pipeline {format_seconds(p.compute_s)} (bubble "
        f"{format_seconds(p.bubble_s)}) + DP/ZeRO comm {format_seconds(p.dp_comm_s)} + optimizer "
        f"{format_seconds(p.optimizer_s)} + offload {format_seconds(p.offload_s)}", highlight=False)
    console.print(f"memory (most loaded stage): {format_memory_breakdown(m)}", highlight=False)
    if p.host_bytes or p.nvme_bytes:
        console.print(f"offloaded per device: host memory {format_bytes(p.host_bytes)} of "
                      f"{format_bytes(best.cluster.host_memory_bytes / best.cluster.devices_per_node)}, NVMe "
                      f"{format_bytes(p.nvme_bytes)} of "
                      f"{format_bytes(best.cluster.nvme_capacity_bytes / best.cluster.devices_per_node)}",
                      highlight=False)
    if p.binding:
        console.print(f"binding: {p.binding}", highlight=False)
    sol = best.solver
    gap = f", gap {sol.gap:.2%}" if sol.status == "feasible" else ""
    console.print(f"solver: {sol.solver}, {sol.status}{gap}; {sol.milps_solved} MILPs over {sol.candidates} "
                  f"candidates in {sol.search_time_s:.1f} s", highlight=False)
    if sol.excluded:
        console.print("excluded by a rule (candidates): " + "; ".join(
            f"{why} ({n})" for why, n in sorted(sol.excluded.items(), key=lambda kv: -kv[1])), highlight=False,
            soft_wrap=True)


def format_memory_breakdown(m: MemoryBreakdown) -> str:
    """``params 1.2 GiB, grads ..., optimizer ..., activations ..., other ...`` (bytes per device); for a
    Mixture-of-Experts model also the model states split into dense and expert parts."""
    out = (f"params {format_bytes(m.params)}, grads {format_bytes(m.grads)}, optimizer {format_bytes(m.optimizer)}, "
           f"activations {format_bytes(m.activations)}, other {format_bytes(m.other)}")
    if m.expert_states > 0:
        out += (f"; model states: dense {format_bytes(m.dense_states)}, expert {format_bytes(m.expert_states)} "
                f"(expert params {format_bytes(m.expert_params)}, grads {format_bytes(m.expert_grads)}, optimizer "
                f"{format_bytes(m.expert_optimizer)})")
    return out


def measured_summary(rows: list[dict]) -> dict:
    """Mean step time after warm-up, max peak memory over ranks and steps, first and last loss."""
    timed = rows[WARMUP_STEPS:] or rows
    return {
        "step_time_s": statistics.mean(r["step_time_s"] for r in timed),
        "peak_memory_bytes": max(max(r["peak_memory_bytes"]) for r in rows),
        "first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"],
    }


def render_measured(console: Console, plan: Plan, rows: list[dict]) -> None:
    if not rows:
        console.print("no metrics were written")
        return
    meas = measured_summary(rows)
    pred = plan.predicted
    table = Table(title="measured vs predicted")
    for col in ("", "measured", "predicted", "error"):
        table.add_column(col, justify="right")
    t_err = (pred.step_time_s - meas["step_time_s"]) / meas["step_time_s"]
    m_err = (pred.peak_memory_bytes - meas["peak_memory_bytes"]) / meas["peak_memory_bytes"]
    n = len(rows)
    if n > WARMUP_STEPS:
        which = f"mean of steps {WARMUP_STEPS + 1}-{n}" if n > WARMUP_STEPS + 1 else f"step {n}"
    else:  # too few steps to leave out the warm-up ones: say so rather than name steps that did not run
        which = f"mean of all {n} steps, warm-up included" if n > 1 else "the only step, warm-up included"
    table.add_row(f"step time ({which})", format_seconds(meas["step_time_s"]),
                  format_seconds(pred.step_time_s), f"{t_err:+.0%}")
    table.add_row("peak memory per rank (max)", format_bytes(meas["peak_memory_bytes"]),
                  format_bytes(pred.peak_memory_bytes), f"{m_err:+.0%}")
    console.print(table)
    console.print(f"loss {meas['first_loss']:.4f} -> {meas['last_loss']:.4f} over {len(rows)} steps", highlight=False)
