"""Plans that fit only with the memory tiers (issue 9): what `paraplan plan` picks for models too large for the
devices' memory, with the placement, predicted step time and the binding limit.

    python benchmarks/offload_plans.py --out benchmarks/results/offload_plans.md

Each row is `paraplan plan MODEL --cluster C --global-batch B --seq-len S --backend deepspeed` (the backend that runs
NVMe offload), and the same search with every tier forbidden (`--strategy offload=none,offload_param=none,
offload_act=false`) to show it would not fit. Figures are predictions of the analytic cost model (catalog devices).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from paraplan.catalog import load_cluster_spec
from paraplan.cli.render import offload_label, recompute_label
from paraplan.errors import NoFeasiblePlanError
from paraplan.models.presets import load_model_spec
from paraplan.planner.search import search_plans
from paraplan.types import StrategyOverride, TrainSpec
from paraplan.units import format_bytes, format_seconds

CASES = [  # model, cluster, global batch, sequence length, what it stands for
    ("llama3-405b", "8xH100-80GB", 64, 4096, "405B on one node"),
    ("gpt3-175b", "8xH100-80GB", 64, 2048, "175B on one node"),
    ("llama3-70b", "8xA100-40GB", 32, 4096, "70B fine-tuning on one A100-40GB node"),
    ("llama3-8b", "1xL4-24GB", 16, 4096, "8B on a single L4"),
]
NO_TIERS = StrategyOverride(offload_optimizer="none", offload_param="none", offload_activations=False)


def run() -> list[dict]:
    rows = []
    for model, cluster_name, gb, seq, what in CASES:
        spec, cluster = load_model_spec(model), load_cluster_spec(cluster_name)
        train = TrainSpec(global_batch=gb, seq_len=seq, dtype="bf16")
        plan = search_plans(spec, cluster, train, top_k=1, backend="deepspeed")[0]
        try:
            search_plans(spec, cluster, train, override=NO_TIERS, top_k=1, backend="deepspeed")
            without = "fits"
        except NoFeasiblePlanError:
            without = "no plan fits"
        s, p = plan.strategy, plan.predicted
        rows.append({
            "case": what, "command": f"paraplan plan {model} --cluster {cluster_name} --global-batch {gb} "
                                     f"--seq-len {seq} --backend deepspeed",
            "strategy": f"dp={s.dp} tp={s.tp} pp={s.pp} mb={s.micro_batch_size} ZeRO-{s.zero_stage}",
            "recompute": recompute_label(plan), "placement": offload_label(plan),
            "step": format_seconds(p.step_time_s), "tokens_per_s": f"{p.tokens_per_s:,.0f}", "mfu": f"{p.mfu:.1%}",
            "device": f"{format_bytes(p.peak_memory_bytes)} / {format_bytes(p.memory_capacity_bytes)}",
            "host": format_bytes(p.host_bytes), "nvme": format_bytes(p.nvme_bytes),
            "binding": p.binding, "without_tiers": without,
        })
        print(rows[-1], flush=True)
    return rows


def to_markdown(rows: list[dict]) -> str:
    cols = ["case", "strategy", "recompute", "placement", "step", "tokens_per_s", "mfu", "device", "host", "nvme",
            "binding", "without_tiers"]
    head = ("# Plans that fit with offload and paging\n\n`python benchmarks/offload_plans.py --out "
            "benchmarks/results/offload_plans.md`; each row is the command in the list below (analytic cost model, "
            "catalog devices). `device`: peak per GPU of usable capacity; `host`, `nvme`: per GPU; "
            "`without_tiers`: the same search with every tier forbidden.\n\n")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    cmds = "\n".join(f"- {r['case']}: `{r['command']}`" for r in rows)
    return head + "\n".join(lines) + "\n\nCommands:\n\n" + cmds + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="write the markdown table here")
    args = ap.parse_args()
    text = to_markdown(run())
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
