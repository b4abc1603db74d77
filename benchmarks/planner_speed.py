"""How long `paraplan plan` takes, start-up included: model x cluster size -> wall time, candidates, MILPs, best plan.

Each row runs the real console command (`python -m paraplan plan ... --json`) in a fresh process and times it
from start to exit, so import time counts as a user feels it. Goals (issue 8): llama3-405b on 16,384 H100
(global batch 2048, seq 8192) <= 2 s, every row <= 5 s.

    python benchmarks/planner_speed.py [--quick] [--backend any] [--markdown] [--out FILE]

``--quick`` runs three rows (CI runs it to keep the script working); the full table is committed under
benchmarks/results/ with the command that made it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (model, nodes x 8 H100, global batch, seq len): the sizes, 8 to 16,384 GPUs.
ROWS = [
    ("llama3-8b", 1, 256, 8192), ("llama3-8b", 8, 1024, 8192), ("llama3-8b", 128, 2048, 8192),
    ("llama3-70b", 8, 1024, 8192), ("llama3-70b", 64, 2048, 8192), ("llama3-70b", 1024, 2048, 8192),
    ("llama3-405b", 64, 2048, 8192), ("llama3-405b", 512, 2048, 8192), ("llama3-405b", 2048, 2048, 8192),
    ("gpt3-175b", 8, 1536, 2048), ("gpt3-175b", 128, 1536, 2048), ("gpt3-175b", 1024, 1536, 2048),
]
QUICK = [ROWS[0], ROWS[4], ROWS[8]]


def run_row(model: str, nodes: int, gb: int, seq: int, backend: str) -> dict:
    cluster = f"{nodes}x8xH100-80GB" if nodes > 1 else "8xH100-80GB"
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "paraplan", "plan", model, "--cluster", cluster, "--global-batch", str(gb),
               "--seq-len", str(seq), "--backend", backend, "--json", "-o", str(Path(d) / "plan.json")]
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - start
    row = {"model": model, "gpus": nodes * 8, "global_batch": gb, "seq_len": seq, "wall_s": wall}
    if proc.returncode != 0:
        row["best"] = "no plan: " + proc.stderr.strip().splitlines()[-1][:80]
        return row
    out = json.loads(proc.stdout)
    s, sol = out["strategy"], out["solver"]
    row.update(candidates=sol["candidates"], milps=sol["milps_solved"], search_s=sol["search_time_s"],
               step_s=out["predicted"]["step_time_s"],
               best=(f"dp{s['dp']} tp{s['tp']} pp{s['pp']}" + (f" cp{s['cp']}" if s["cp"] > 1 else "")
                     + f" mb{s['micro_batch_size']} ZeRO-{s['zero_stage']}"
                     + (f" {s['schedule']}" + (f" vpp{s['vpp']}" if s["vpp"] > 1 else "") if s["pp"] > 1 else "")
                     + (" sp" if s.get("sequence_parallel") else "")
                     + f" rec {sum(s['recompute_blocks'])}/{sum(s['stage_blocks'])}"
                     + (f" + {sum(s['selective_blocks'])} {s['selective_policy']}-sel"
                        if sum(s["selective_blocks"]) else "")))
    return row


def render(rows: list[dict], markdown: bool) -> str:
    head = ["model", "GPUs", "gb x seq", "wall s", "search s", "candidates", "MILPs", "step s", "best plan"]
    lines = []
    for r in rows:
        lines.append([r["model"], str(r["gpus"]), f"{r['global_batch']} x {r['seq_len']}", f"{r['wall_s']:.2f}",
                      f"{r.get('search_s', 0):.2f}", str(r.get("candidates", "-")), str(r.get("milps", "-")),
                      f"{r['step_s']:.2f}" if "step_s" in r else "-", r["best"]])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head, *lines])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="three rows only (CI)")
    ap.add_argument("--backend", default="any", help="plan's --backend (default any)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    rows = [run_row(*r, args.backend) for r in (QUICK if args.quick else ROWS)]
    table = render(rows, args.markdown)
    worst = max(r["wall_s"] for r in rows)
    summary = f"slowest row {worst:.2f} s (goal <= 5 s); backend {args.backend}"
    print(table)
    print(summary)
    if args.out:
        args.out.write_text(f"`python benchmarks/planner_speed.py --backend {args.backend}"
                            f"{' --markdown' if args.markdown else ''}`\n\n{table}\n\n{summary}\n")


if __name__ == "__main__":
    main()
