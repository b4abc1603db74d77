"""Plan quality: is ``paraplan plan``'s best plan at least as fast as a published expert configuration?

Usage:
    python benchmarks/plan_quality.py [--all] [--quick | --limit N] [--markdown] [--out FILE] [--data PATH]

For each fully stated row of benchmarks/data/published_runs.jsonl (a copy of ../shared/data, see
benchmarks/data/README.md; "fully stated" as in benchmarks/fidelity.py: nothing filled in by its default rule) the
same model, cluster, global batch and sequence length are planned with
``search_plans(..., top_k=1, backend="unconstrained")`` and compared with the configuration the source ran, both
priced by paraplan's own cost model. The ratio expert / plan (predicted step times) is >= 1 when the plan is at
least as fast; the planner searches a superset of the expert's configuration whenever nothing in the flags column
says otherwise, so a ratio below 1 there is a planner bug.

Like with like: the planner prices with the default :class:`CostOptions` (FlashAttention-2, DP/ZeRO overlap on
GPUs, no TP overlap) and cannot choose the attention kernel or the overlap settings; it does choose cp, sp, the
selective policy, the schedule and vpp (up to search.MAX_VPP). The expert configuration is therefore priced twice:
as it ran (fidelity.py's options for its framework, information only) and with the planner's options (the ratio
uses this one); the "options as run" column lists what differs. An expert configuration that does not fit in
device memory by our model is flagged and not compared; one that fits only in the 5% headroom the planner keeps
(memory_fraction 0.95) is compared but flagged as outside the planner's space.

``--all`` adds a second table for the rows fidelity.py completes with its default rule (micro-batch, tp/pp split,
recomputation...): their "expert" configuration is partly ours, so they are kept out of the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fidelity.py sits beside this script
import fidelity  # noqa: E402

from paraplan.cli.render import offload_label, schedule_label  # noqa: E402
from paraplan.cost_models.costs import CostOptions  # noqa: E402
from paraplan.cost_models.estimate import StrategySpec, estimate_strategy, stage_blocks  # noqa: E402
from paraplan.planner.search import MAX_VPP, search_plans  # noqa: E402
from paraplan.types import Plan  # noqa: E402
from paraplan.units import GiB  # noqa: E402

MEMORY_FRACTION = 0.95  # search_plans' default headroom; the expert is checked against the same bound
QUICK_ROWS = 5
# Cost options the planner does not search: it prices every candidate with CostOptions()'s values of these.
PLAN_BACKEND = "unconstrained"  # the backend (and cost profile: Megatron-LM's) the plans are searched with
FIXED_OPTIONS = [f.name for f in fields(CostOptions) if f.name not in ("vpp", "cp", "sequence_parallel",
                                                                      "selective_policy", "schedule")]
OUT_OF_SPACE = ("vpp", "memory headroom", "tp does not divide")  # flags that put the expert outside the plan's space


@dataclass
class QualityRow:
    """One published configuration against the plan for the same problem (times per optimizer step)."""

    id: str
    source: str
    model: str
    n_gpus: int
    global_batch: int
    seq_len: int
    expert: str
    expert_as_run_s: float
    expert_s: float  # priced with the planner's cost options (what the ratio uses)
    expert_memory_fraction: float  # predicted peak / device memory
    plan: str = ""
    plan_s: float = math.nan
    plan_time_s: float = 0.0
    options_differ: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    defaults: list[str] = field(default_factory=list)
    repriced_s: float = math.nan  # the plan priced again by estimate_strategy, where it can express the plan

    @property
    def compared(self) -> bool:
        return not math.isnan(self.plan_s) and self.expert_memory_fraction <= 1.0

    @property
    def ratio(self) -> float:
        return self.expert_s / self.plan_s if self.compared else math.nan

    @property
    def in_plan_space(self) -> bool:
        """Whether the planner's search space contains the expert configuration (then ratio >= 1 must hold)."""
        return self.compared and not any(f.startswith(OUT_OF_SPACE) for f in self.flags)


def planner_options(cluster_kind: str) -> dict:
    """The values of FIXED_OPTIONS the planner prices with (overlap_dp None resolved as CandidateCosts does)."""
    opts = {name: getattr(CostOptions(), name) for name in FIXED_OPTIONS}
    if opts["overlap_dp"] is None:
        opts["overlap_dp"] = cluster_kind == "cuda"
    opts["backend"] = PLAN_BACKEND  # search_plans prices with this backend's cost profile
    return opts


def expert_desc(st: StrategySpec) -> str:
    return (f"tp{st.tp} pp{st.pp} dp{st.dp}" + (f" cp{st.cp}" if st.cp > 1 else "") + f" mb{st.micro_batch_size}"
            + (f" vpp{st.vpp}" if st.vpp > 1 else "")
            + (" sp" if st.sequence_parallel and st.tp > 1 else "") + f" z{st.zero_stage}"
            + (" offload" if st.offload_optimizer not in ("none", False) else "") + f" rc:{st.recompute}")


def plan_desc(plan: Plan) -> str:
    s = plan.strategy
    blocks = sum(st.n_blocks for st in s.stages)
    full = sum(st.recompute_blocks for st in s.stages)
    sel = sum(st.selective_blocks for st in s.stages)
    policy = {"attention": "selective", "op": "op"}[s.selective_policy]
    rc = "full" if full == blocks else f"{full}/{blocks} full" if full else "none"
    if sel:
        rc = policy if sel == blocks else (rc + " + " if full else "") + f"{sel}/{blocks} {policy}"
    uneven = [st.n_blocks for st in s.stages] != stage_blocks(blocks, s.pp)  # estimate_strategy's split
    sched = f" {schedule_label(plan)}" if s.pp > 1 else ""
    return (f"tp{s.tp} pp{s.pp} dp{s.dp}" + (f" cp{s.cp}" if s.cp > 1 else "") + f" mb{s.micro_batch_size}"
            + sched + (" sp" if s.sequence_parallel else "")
            + f" z{s.zero_stage}" + (f" {offload_label(plan)}" if offload_label(plan) != "-" else "") + f" rc:{rc}"
            + (f" blocks{[st.n_blocks for st in s.stages]}" if uneven else ""))


def evaluate_row(row: dict, time_limit_s: float = 10.0) -> QualityRow:
    """Price the row's published configuration and plan the same problem.

    Raises:
        ParaplanError: the planner finds no plan (kept: a planner failure on a published run is a finding).
    """
    case = fidelity.build_case(row)
    spec, cluster, train, st = case.spec, case.cluster, case.train, case.strategy
    as_run = estimate_strategy(spec, cluster, train, st)
    mine = planner_options(cluster.device.kind)
    theirs = {name: getattr(st, name) for name in FIXED_OPTIONS}
    if theirs["overlap_dp"] is None:
        theirs["overlap_dp"] = cluster.device.kind == "cuda"
    differ = [f"{k} {theirs[k]}" for k in FIXED_OPTIONS if theirs[k] != mine[k]]
    # Sequence parallelism shards over the tp group: with tp 1 it is no setting at all (the planner's Candidate
    # rejects it), so it is dropped rather than counted as a difference.
    like = replace(st, **mine, sequence_parallel=st.sequence_parallel and st.tp > 1)
    est = estimate_strategy(spec, cluster, train, like)
    res = QualityRow(row["id"], row["source_group"], row.get("model_name") or spec.name, cluster.world_size,
                     train.global_batch, train.seq_len, expert_desc(like), as_run.step_time_s, est.step_time_s,
                     est.peak_memory_bytes / est.memory_capacity_bytes, options_differ=differ,
                     defaults=list(case.defaults))
    frac = res.expert_memory_fraction
    if frac > 1.0:
        res.flags.append(f"expert does not fit by our model ({est.peak_memory_bytes / GiB:.1f} GiB > "
                         f"{est.memory_capacity_bytes / GiB:.1f} GiB): not compared")
    elif frac > MEMORY_FRACTION:
        res.flags.append(f"memory headroom: expert fills {100 * frac:.1f}% of the device, above the planner's "
                         f"{100 * MEMORY_FRACTION:.0f}%")
    if like.vpp > MAX_VPP:
        res.flags.append(f"vpp {like.vpp}: more chunks than the planner searches (MAX_VPP {MAX_VPP})")
    if (spec.n_kv_heads or 1) % like.tp:
        res.flags.append(f"tp does not divide the {spec.n_kv_heads} KV heads (the planner requires it)")
    start = time.perf_counter()
    plan = search_plans(spec, cluster, train, top_k=1, backend=PLAN_BACKEND, time_limit_s=time_limit_s,
                        memory_fraction=MEMORY_FRACTION)[0]
    res.plan_time_s = time.perf_counter() - start
    res.plan, res.plan_s = plan_desc(plan), plan.predicted.step_time_s
    res.repriced_s = reprice(plan, spec, cluster, train)
    if abs(res.repriced_s - res.plan_s) > 1e-9 * res.plan_s:  # False for nan (not expressible)
        res.flags.append(f"plan re-priced by estimate_strategy: {res.repriced_s:.4f} s, not {res.plan_s:.4f} s")
    if plan.solver.status != "optimal":
        res.flags.append(f"a stage MILP stopped at its time limit (gap {100 * plan.solver.gap:.2f}%)")
    return res


def reprice(plan: Plan, spec, cluster, train) -> float:
    """The plan's step time by estimate_strategy (the cross-check that the planner reports the cost model's own
    number), or nan where estimate_strategy cannot express the plan: recomputation (full or selective) on some
    blocks but not all. Stage block counts are passed as they are (``--stage-blocks``)."""
    s = plan.strategy
    blocks = [st.n_blocks for st in s.stages]
    full = [st.recompute_blocks for st in s.stages]
    sel = [st.selective_blocks for st in s.stages]
    paged = [st.offload_blocks for st in s.stages]
    if (any(full) and full != blocks) or (any(sel) and sel != blocks) or (any(paged) and paged != blocks):
        return math.nan
    recompute = "full" if any(full) else ({"attention": "selective", "op": "op"}[s.selective_policy]
                                          if any(sel) else "none")
    st = StrategySpec(dp=s.dp, tp=s.tp, pp=s.pp, cp=s.cp, vpp=s.vpp, schedule=s.schedule,
                      micro_batch_size=s.micro_batch_size, recompute=recompute, stage_blocks=tuple(blocks),
                      zero_stage=s.zero_stage, offload_optimizer=s.offload_optimizer, offload_param=s.offload_param,
                      offload_ratio=s.offload_ratio, offload_activations=any(paged),
                      sequence_parallel=s.sequence_parallel, backend=PLAN_BACKEND)
    return estimate_strategy(spec, cluster, train, st).step_time_s


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else math.nan


HEAD = ["row", "source", "model", "GPUs", "gb x seq", "expert config", "expert s (as run)", "expert s",
        "plan config", "plan s", "ratio", "plan time s", "options as run", "flags"]


def _cells(r: QualityRow) -> list[str]:
    flags = r.flags + ([f"defaults: {'; '.join(r.defaults)}"] if r.defaults else [])
    return [r.id, r.source, r.model, str(r.n_gpus), f"{r.global_batch} x {r.seq_len}", r.expert,
            f"{r.expert_as_run_s:.3f}", f"{r.expert_s:.3f}", r.plan, f"{r.plan_s:.3f}",
            "-" if not r.compared else f"{r.ratio:.3f}", f"{r.plan_time_s:.1f}", ", ".join(r.options_differ) or "-",
            "; ".join(flags) or "-"]


def render_table(results: list[QualityRow], markdown: bool) -> list[str]:
    rows = [_cells(r) for r in results]
    if markdown:
        return ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)] + ["| " + " | ".join(c) + " |"
                                                                             for c in rows]
    widths = [max(len(c[i]) for c in rows + [HEAD]) for i in range(len(HEAD) - 1)]
    return ["  ".join(c[i].ljust(widths[i]) for i in range(len(HEAD) - 1)) + "  " + c[-1] for c in [HEAD] + rows]


def render_summary(results: list[QualityRow]) -> list[str]:
    cmp = [r for r in results if r.compared]
    inside = [r for r in cmp if r.in_plan_space]
    below = [r for r in cmp if r.ratio < 1 - 1e-9]
    lines = [f"rows {len(results)}, compared {len(cmp)} (expert fits by our model); geometric mean of expert/plan "
             f"{geomean([r.ratio for r in cmp]):.3f} (min {min((r.ratio for r in cmp), default=math.nan):.3f}, "
             f"max {max((r.ratio for r in cmp), default=math.nan):.3f}); in the planner's space {len(inside)}: "
             f"geometric mean {geomean([r.ratio for r in inside]):.3f}",
             f"rows with ratio < 1: {len(below)}"]
    for r in below:
        why = ("expert outside the planner's space: " + "; ".join(
            f for f in r.flags + r.defaults if f.startswith(OUT_OF_SPACE)) if not r.in_plan_space else
            "PLANNER BUG: the expert configuration is in the planner's space")
        lines.append(f"  - {r.id}: {r.ratio:.4f} ({why})")
    not_cmp = [r for r in results if not r.compared]
    if not_cmp:
        lines.append(f"not compared (expert does not fit by our model): {', '.join(r.id for r in not_cmp)}")
    checked = [r for r in results if not math.isnan(r.repriced_s)]
    agree = sum(abs(r.repriced_s - r.plan_s) <= 1e-9 * r.plan_s for r in checked)
    lines.append(f"plans estimate_strategy can express (each kind of recomputation on all blocks or none): "
                 f"{len(checked)}, re-priced to the same step time: {agree}")
    total = sum(r.plan_time_s for r in results)
    slow = max(results, key=lambda r: r.plan_time_s)
    lines.append(f"planning time: {total:.1f} s in all, slowest {slow.id} {slow.plan_time_s:.1f} s")
    return lines


def render(sections: list[tuple[str, list[QualityRow]]], markdown: bool) -> str:
    lines: list[str] = []
    for title, results in sections:
        if not results:
            continue
        lines += [("## " if markdown else "") + title, ""] + render_table(results, markdown) + [""]
        lines += [("- " if markdown and not s.startswith("  ") else "") + s.strip() if markdown else s
                  for s in render_summary(results)] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=fidelity.DEFAULT_DATA, help="published_runs.jsonl")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables and the command to FILE")
    parser.add_argument("--quick", action="store_true", help=f"first {QUICK_ROWS} rows only (CI)")
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each table only")
    parser.add_argument("--all", action="store_true",
                        help="add the rows fidelity.py completes with its default rule, in a second table")
    parser.add_argument("--time-limit", type=float, default=10.0, help="HiGHS time limit per stage MILP, s")
    args = parser.parse_args(argv)
    limit = QUICK_ROWS if args.quick else args.limit
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    stated, completed = [], []
    for row in rows:
        (stated if fidelity.build_case(row).fully_stated else completed).append(row)
    groups = [("Fully stated rows", stated)] + ([("Rows completed by fidelity.py's default rule", completed)]
                                                 if args.all else [])
    start = time.perf_counter()
    sections = []
    for title, group in groups:
        results = []
        for row in group[:limit]:
            results.append(evaluate_row(row, args.time_limit))
            print(f"{row['id']}: ratio {results[-1].ratio:.3f} ({results[-1].plan_time_s:.1f} s)", file=sys.stderr)
        sections.append((title, results))
    text = render(sections, args.markdown) + f"\nwall time {time.perf_counter() - start:.0f} s\n"
    print(text)
    if args.out:
        cmd = "python benchmarks/plan_quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
        args.out.write_text(("# Plan quality\n\n" if args.markdown else "") + f"`{cmd.strip()}`\n\n"
                            + (__doc__.split("\n\n", 2)[2] + "\n\n" if args.markdown else "") + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
