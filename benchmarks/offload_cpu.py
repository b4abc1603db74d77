"""NVMe offload on this machine (issue 9, item 3): a model whose model states exceed a per-process memory budget,
planned on cpu:2 with that budget, launched with DeepSpeed's NVMe offload into a directory on disk standing in for
NVMe; measured peak RSS per rank and step time against the plan's prediction, beside the same model planned
without a budget.

    python benchmarks/offload_cpu.py --out benchmarks/results/offload_cpu.md

Steps (all through the CLI, as a user runs them): `paraplan profile` (threads = cores / 2 processes), `paraplan
plan --cluster cpu:2 --device-memory BUDGET --backend deepspeed --profile`, `paraplan launch --nvme-path DIR`.
Peak memory is the resident set size each rank reports (max over ranks and steps), measured with
MALLOC_MMAP_THRESHOLD_=65536 so freed buffers go back to the system (../shared/PLATFORM.md). Run on an otherwise
idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from paraplan.backends.launch import cpu_threads_per_process, read_metrics
from paraplan.cli.render import WARMUP_STEPS, measured_summary, offload_label, recompute_label
from paraplan.types import Plan
from paraplan.units import GiB, MiB

MODEL, GB, SEQ, MB = "llama-small", 8, 256, [1, 2, 4]


def _run(*args: str, env: dict | None = None) -> None:
    print("$ paraplan " + " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "paraplan", *args], check=True, env=env)


def case(tmp: Path, budget: str | None, steps: int, profile: Path) -> dict:
    name = f"budget-{budget}" if budget else "no-budget"
    plan_path = tmp / f"{name}.json"
    args = ["plan", MODEL, "--cluster", "cpu:2", "--global-batch", str(GB), "--seq-len", str(SEQ), "--profile",
            str(profile), "--backend", "deepspeed", "--top", "1", "-o", str(plan_path)]
    if budget:
        args += ["--device-memory", budget]
    _run(*args)
    plan = Plan.model_validate_json(plan_path.read_text())
    run_dir, nvme = tmp / f"run-{name}", tmp / f"nvme-{name}"
    nvme.mkdir()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    launch = ["launch", str(plan_path), "--backend", "deepspeed", "--steps", str(steps), "--run-dir", str(run_dir)]
    if "nvme" in (plan.strategy.offload_optimizer, plan.strategy.offload_param):
        launch += ["--nvme-path", str(nvme)]
    _run(*launch, env=env)
    rows = read_metrics(run_dir)
    meas = measured_summary(rows)
    s, p = plan.strategy, plan.predicted
    return {
        "case": name, "budget": budget or "-",
        "plan": f"dp={s.dp} tp={s.tp} pp={s.pp} mb={s.micro_batch_size} ZeRO-{s.zero_stage}, {recompute_label(plan)}",
        "placement": offload_label(plan),
        "predicted_mem_mib": p.peak_memory_bytes / MiB, "measured_mem_mib": meas["peak_memory_bytes"] / MiB,
        "predicted_step_s": p.step_time_s, "measured_step_s": meas["step_time_s"],
        "nvme_mib_per_rank": p.nvme_bytes / MiB,
        "loss": f"{meas['first_loss']:.3f} -> {meas['last_loss']:.3f}", "steps": len(rows),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", default="1GiB", help="memory per process the offload plan must fit")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp_s:  # on this disk, as an NVMe directory would be
        tmp = Path(tmp_s)
        profile = tmp / "profile.json"
        _run("profile", MODEL, "--micro-batches", ",".join(map(str, MB)), "--seq-len", str(SEQ), "--dtype", "fp32",
             "--threads", str(cpu_threads_per_process(2)), "-o", str(profile))
        rows = [case(tmp, None, args.steps, profile), case(tmp, args.budget, args.steps, profile)]
    cols = ["case", "plan", "placement", "predicted_mem_mib", "measured_mem_mib", "predicted_step_s",
            "measured_step_s", "nvme_mib_per_rank", "loss", "steps"]
    lines = [f"# NVMe offload on cpu:2 ({MODEL}, global batch {GB} x seq {SEQ}, fp32)", "",
             f"`python benchmarks/offload_cpu.py --budget {args.budget} --steps {args.steps} --out "
             "benchmarks/results/offload_cpu.md`", "",
             "Peak memory: RSS per rank, max over ranks and steps (MALLOC_MMAP_THRESHOLD_=65536); step time: mean "
             f"after the first {WARMUP_STEPS} steps. `{args.budget}` is the `--device-memory` budget per process "
             f"({float(args.budget.rstrip('GiB')) * GiB / MiB:.0f} MiB).", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    print(json.dumps(rows, indent=1))
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
