"""Predicted vs measured step time and per-rank memory of launched plans on this machine (cpu:2).

For each model: profile it here (with the threads each of the 2 training processes gets), then for each forced
strategy plan with that profile, launch it with each backend, and compare the mean measured step time (steps after
the first two) and the peak memory per rank (resident set size, max over ranks and steps) with the plan's
prediction. Run on an otherwise idle machine: the two training processes need both cores.

    python benchmarks/cpu_launch.py --out benchmarks/results/cpu_launch.md

Error is (predicted - measured) / measured.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from paraplan.backends.launch import cpu_threads_per_process, launch_plan
from paraplan.catalog import load_cluster_spec
from paraplan.cli.app import parse_strategy
from paraplan.cli.render import WARMUP_STEPS, measured_summary
from paraplan.models.presets import load_model_spec
from paraplan.planner.search import search_plans
from paraplan.profiler import profile_model
from paraplan.types import TrainSpec
from paraplan.units import MiB

STRATEGIES = ["dp=2", "tp=2", "pp=2", "dp=2,zero=3"]


def run(models: list[str], backends: list[str], steps: dict[str, int], global_batch: int, seq_len: int,
        micro_batch: int) -> list[dict]:
    import torch

    cluster = load_cluster_spec("cpu:2")
    threads = cpu_threads_per_process(2)
    rows = []
    for name in models:
        spec = load_model_spec(name)
        torch.set_num_threads(threads)
        profile = profile_model(spec, [micro_batch], seq_len, dtype="fp32", links=True)
        train = TrainSpec(global_batch=global_batch, seq_len=seq_len, dtype="fp32")
        for forced in STRATEGIES:
            override = parse_strategy(f"{forced},mb={micro_batch}")
            plan = search_plans(spec, cluster, train, profile, override, top_k=1, backend="any")[0]
            for backend in backends:
                with tempfile.TemporaryDirectory() as tmp:
                    _, metrics = launch_plan(plan, backend, Path(tmp), steps=steps[name], quiet=True)  # type: ignore
                meas = measured_summary(metrics)
                pred = plan.predicted
                rows.append({
                    "model": name, "strategy": forced, "backend": backend,
                    "measured_step_s": meas["step_time_s"], "predicted_step_s": pred.step_time_s,
                    "measured_mem_bytes": meas["peak_memory_bytes"], "predicted_mem_bytes": pred.peak_memory_bytes,
                    "loss": f"{meas['first_loss']:.3f} -> {meas['last_loss']:.3f}",
                })
                print(_line(rows[-1]), flush=True)
    return rows


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas * 100


def _line(r: dict) -> str:
    return (f"| {r['model']} | {r['strategy']} | {r['backend']} | {r['measured_step_s']:.3f} | "
            f"{r['predicted_step_s']:.3f} | {_err(r['predicted_step_s'], r['measured_step_s']):+.0f}% | "
            f"{r['measured_mem_bytes'] / MiB:.0f} | {r['predicted_mem_bytes'] / MiB:.0f} | "
            f"{_err(r['predicted_mem_bytes'], r['measured_mem_bytes']):+.0f}% | {r['loss']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-tiny,llama-small")
    parser.add_argument("--backends", default="torch,deepspeed")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps-tiny", type=int, default=8)
    parser.add_argument("--steps-small", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    models = args.models.split(",")
    steps = {m: args.steps_small if "small" in m else args.steps_tiny for m in models}
    header = ("| model | strategy | backend | measured step (s) | predicted step (s) | error | measured peak RSS/rank "
              "(MiB) | predicted peak (MiB) | error | loss |\n|---|---|---|---|---|---|---|---|---|---|")
    print(header)
    rows = run(models, args.backends.split(","), steps, args.global_batch, args.seq_len, args.micro_batch)
    t_err = [abs(_err(r["predicted_step_s"], r["measured_step_s"])) for r in rows]
    m_err = [abs(_err(r["predicted_mem_bytes"], r["measured_mem_bytes"])) for r in rows]
    summary = (f"\nstep time |error|: median {statistics.median(t_err):.0f}%, max {max(t_err):.0f}%; "
               f"peak memory |error|: median {statistics.median(m_err):.0f}%, max {max(m_err):.0f}%")
    print(summary)
    if args.out:
        text = (f"# Predicted vs measured on cpu:2 (this machine)\n\nCommand: `python benchmarks/cpu_launch.py "
                f"--out {args.out}`; global batch {args.global_batch}, seq {args.seq_len}, micro-batch "
                f"{args.micro_batch}, fp32, {cpu_threads_per_process(2)} thread(s) per process, measured step = "
                f"mean of steps after the first {WARMUP_STEPS}.\n\n{header}\n"
                + "\n".join(_line(r) for r in rows) + "\n" + summary + "\n")
        args.out.write_text(text)


if __name__ == "__main__":
    main()
