"""Calibration from trial steps on this machine (cpu:2): calibrate on two strategies, predict the others.

For each model and backend: profile the model here once (the threads each of the 2 training processes gets),
launch a few steps of the calibration strategies (dp=2 and pp=2) with per-phase times (``launch --phases``), fit
a calibration on them (``paraplan calibrate``), then launch the held-out strategies (tp=2, ZeRO-3, full
recomputation, a smaller micro-batch with more gradient accumulation) and compare their measured step time (median
of the steps after the first two) and peak memory per rank (resident set size, max over ranks and steps) with
the uncalibrated prediction (the plan's) and the calibrated one (the same plan re-priced on the calibration's
inputs, ``calibration.predict_calibrated``). Error is (predicted - measured) / measured.

    python benchmarks/calibration.py --write          # profiles, launches, writes benchmarks/results/calibration.md
    python benchmarks/calibration.py --analyze-only   # re-fits and re-tabulates the run directories of a past run

Run directories stay under ``--work-dir`` (default runs/calibration-bench). Run on an otherwise idle machine: the
two training processes need both cores; the load average at start and end is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "calibration.md"
CALIBRATE_ON = ["dp=2", "pp=2"]
HELD_OUT = ["tp=2", "dp=2,zero=3", "dp=2,recompute=full", "pp=2,mb=1", "tp=2,mb=1", "dp=2,zero=3,mb=1"]
STRATEGIES = CALIBRATE_ON + HELD_OUT
# (strategies calibrated on, whether the profile keeps the tp and ZeRO-3 overheads `paraplan profile` measured):
# dp + pp with them; dp + pp as before they were measured (priced at 0 unless a run shows them); and with a tp and a
# ZeRO-3 run, the only runs that show them (calibration.COEFFICIENTS tp_overhead_s, zero3_fetch_overhead_s).
CALIBRATION_SETS = [(CALIBRATE_ON, True), (CALIBRATE_ON, False), (CALIBRATE_ON + ["tp=2", "dp=2,zero=3"], True)]


def _run_name(strategy: str) -> str:
    return strategy.replace("=", "").replace(",", "-")


def launch_all(models: list[str], backends: list[str], work: Path, steps: dict[str, int], global_batch: int,
               seq_len: int, micro_batch: int, strategies: list[str]) -> None:
    import torch

    from paraplan.backends.launch import cpu_threads_per_process, launch_plan
    from paraplan.backends.overheads import profile_backend_overheads
    from paraplan.catalog import load_cluster_spec
    from paraplan.cli.app import parse_strategy
    from paraplan.errors import ParaplanError
    from paraplan.models.presets import load_model_spec
    from paraplan.planner.search import search_plans
    from paraplan.profiler import profile_model
    from paraplan.types import TrainSpec

    cluster = load_cluster_spec("cpu:2")
    torch.set_num_threads(cpu_threads_per_process(2))
    for name in models:
        spec = load_model_spec(name)
        prof_path = work / name / "profile.json"
        prof_path.parent.mkdir(parents=True, exist_ok=True)
        profile = profile_model(spec, sorted({1, micro_batch}), seq_len, dtype="fp32", links=True)
        profile = profile.model_copy(update={"backend_overheads": profile_backend_overheads(profile)})
        prof_path.write_text(profile.model_dump_json(indent=2))
        train = TrainSpec(global_batch=global_batch, seq_len=seq_len, dtype="fp32")
        for backend in backends:
            for forced in strategies:
                text = forced if "mb=" in forced else f"{forced},mb={micro_batch}"
                plan = search_plans(spec, cluster, train, profile, parse_strategy(text), top_k=1, backend=backend,
                                    profile_path=str(prof_path))[0]
                run = work / name / backend / _run_name(forced)
                metrics = run / "metrics.jsonl"
                if metrics.exists() and len(metrics.read_text().splitlines()) >= steps[name]:
                    continue  # done by an earlier invocation
                if run.exists():
                    shutil.rmtree(run)
                t0 = time.perf_counter()
                try:
                    launch_plan(plan, backend, run, steps=steps[name], quiet=True, phase_times=True)  # type: ignore
                except ParaplanError as exc:
                    print(f"{name} {backend} {forced}: FAILED {exc}", file=sys.stderr, flush=True)
                    continue
                print(f"{name} {backend} {forced}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)


def analyze(models: list[str], backends: list[str], work: Path, calibrate_on: list[str], strategies: list[str],
            overheads: bool = True) -> tuple[list[dict], list[dict]]:
    """Rows of the table for one calibration; ``overheads=False``: every run's profile without the backend
    overheads `paraplan profile` measured (as profiles were before), uncalibrated predictions re-priced so."""
    import dataclasses

    from paraplan.cost_models.calibration import (
        fit_calibration, plan_costs_at, predict_calibrated, prior_latency_s, read_run, transform_inputs,
    )
    from paraplan.cost_models.costs import predict

    def load(path: Path):
        run = read_run(path)
        if overheads:
            return run
        return dataclasses.replace(run, profile=run.profile.model_copy(update={"backend_overheads": {}}))

    rows, cals = [], []
    for name in models:
        for backend in backends:
            base = work / name / backend
            cal = fit_calibration([load(base / _run_name(s)) for s in calibrate_on])
            cals.append({"model": name, "backend": backend, **cal.model_dump(exclude={"runs"})})
            for forced in strategies:
                run = load(base / _run_name(forced))
                step, peak = predict_calibrated(cal, run.plan, run.profile)
                plan = run.plan
                uncal = predict(*plan_costs_at(plan, *transform_inputs(
                    plan.cluster, run.profile, 1, 1, 1, prior_latency_s(plan.cluster, run.profile), 1), backend))
                rows.append({
                    "model": name, "backend": backend, "strategy": forced,
                    "role": "calibration" if forced in calibrate_on else "held-out",
                    "plan": _plan_label(run.plan), "steps_timed": len(run.timed),
                    "measured_step_s": run.measured_step_s, "uncal_step_s": uncal.step_time_s,
                    "cal_step_s": step, "measured_mem": run.measured_peak_bytes,
                    "uncal_mem": uncal.peak_memory_bytes, "cal_mem": peak,
                    "step_min_s": min(r["step_time_s"] for r in run.timed),
                    "step_max_s": max(r["step_time_s"] for r in run.timed),
                })
    return rows, cals


def _plan_label(plan) -> str:
    from paraplan.cost_models.calibration import strategy_label

    return strategy_label(plan)


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas * 100


def table(rows: list[dict]) -> str:
    mib = 2 ** 20
    out = ["| model | backend | strategy (plan) | role | measured step (s) | timed steps min-max (s) | uncalibrated "
           "(s) | error | calibrated (s) | error | measured peak (MiB) | uncalibrated | error | calibrated | error |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(
            f"| {r['model']} | {r['backend']} | {r['strategy']} ({r['plan']}) | {r['role']} | "
            f"{r['measured_step_s']:.3f} | {r['step_min_s']:.2f}-{r['step_max_s']:.2f} | {r['uncal_step_s']:.3f} | "
            f"{_err(r['uncal_step_s'], r['measured_step_s']):+.0f}% | "
            f"{r['cal_step_s']:.3f} | {_err(r['cal_step_s'], r['measured_step_s']):+.0f}% | "
            f"{r['measured_mem'] / mib:.0f} | {r['uncal_mem'] / mib:.0f} | "
            f"{_err(r['uncal_mem'], r['measured_mem']):+.0f}% | {r['cal_mem'] / mib:.0f} | "
            f"{_err(r['cal_mem'], r['measured_mem']):+.0f}% |")
    return "\n".join(out)


def summary(rows: list[dict]) -> str:
    held = [r for r in rows if r["role"] == "held-out"]
    lines = []
    for label, subset in [("all held-out runs", held)] + [
            (f"held-out, {b}", [r for r in held if r["backend"] == b]) for b in sorted({r["backend"] for r in held})]:
        if not subset:
            continue
        parts = []
        for what, key in (("step time", "step_s"), ("peak memory", "mem")):
            m_key = "measured_step_s" if key == "step_s" else "measured_mem"
            for tag in ("uncal", "cal"):
                errs = [abs(_err(r[f"{tag}_{key}"], r[m_key])) for r in subset]
                parts.append(f"{what} {'calibrated' if tag == 'cal' else 'uncalibrated'} |error| median "
                             f"{statistics.median(errs):.0f}%, max {max(errs):.0f}%")
        lines.append(f"- {label} ({len(subset)}): " + "; ".join(parts))
    return "\n".join(lines)


def noise(rows: list[dict]) -> str:
    """Spread of the timed steps within each run: (max - min) / median."""
    spread = [(r["step_max_s"] - r["step_min_s"]) / r["measured_step_s"] * 100 for r in rows]
    return (f"- measurement noise: within one run the timed steps of the same strategy spread by (max - min) / "
            f"median {statistics.median(spread):.0f}% (median over runs), up to {max(spread):.0f}%")


def repeat_noise(rows: list[dict], other: Path, models: list[str], backends: list[str]) -> str:
    """|difference| of the measured step of each strategy between this invocation and ``other``'s, relative to
    the mean of the two."""
    from paraplan.cost_models.calibration import read_run

    diffs = []
    for r in rows:
        d = other / r["model"] / r["backend"] / _run_name(r["strategy"])
        if (d / "metrics.jsonl").exists():
            o = read_run(d).measured_step_s
            diffs.append(abs(r["measured_step_s"] - o) / ((r["measured_step_s"] + o) / 2) * 100)
    if not diffs:
        return ""
    return (f"- run-to-run noise: the same plan launched twice ({other} and this run, {len(diffs)} pairs) measured "
            f"step times differing by median {statistics.median(diffs):.0f}%, max {max(diffs):.0f}%")


def coefficients(cals: list[dict]) -> str:
    out = ["| model | backend | compute fwd x | compute bwd x | link time x | latency (ms) | optimizer x | "
           "tp per block (ms) | ZeRO-3 per fetch (ms) | per-step (s) | memory x | memory offset (MiB) |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def over(c: dict, key: str, mechanism: str) -> str:
        if mechanism in c["mechanisms"]:
            return f"{c[key] * 1e3:.1f}"
        return f"profile's ({c['prior'][key] * 1e3:.1f} uncalibrated)"  # not fitted: the timing applies

    for c in cals:
        out.append(f"| {c['model']} | {c['backend']} | {c['compute_scale_fwd']:.2f} | {c['compute_scale_bwd']:.2f} | "
                   f"{c['link_time_scale']:.2f} | {c['latency_s'] * 1e3:.2f} | {c['optimizer_scale']:.2f} | "
                   f"{over(c, 'tp_overhead_s', 'tp')} | {over(c, 'zero3_fetch_overhead_s', 'zero3')} | "
                   f"{c['step_overhead_s']:.3f} | {c['memory_scale']:.2f} | {c['memory_offset_bytes'] / 2**20:.0f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-tiny,llama-small")
    parser.add_argument("--backends", default="torch,deepspeed")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--steps-tiny", type=int, default=6)
    parser.add_argument("--steps-small", type=int, default=5)
    parser.add_argument("--work-dir", type=Path, default=Path("runs/calibration-bench"))
    parser.add_argument("--analyze-only", action="store_true", help="Re-fit and tabulate existing run directories.")
    parser.add_argument("--write", action="store_true", help=f"Write {RESULTS}.")
    parser.add_argument("--repeat-of", type=Path, default=None,
                        help="Work dir of an earlier invocation with the same runs: report how far the measured step "
                             "times of the two differ (run-to-run noise of the machine).")
    parser.add_argument("--calibrate-on", action="append", default=None,
                        help="Strategies to calibrate on, ';'-separated (the others are held out); repeat for "
                             "several calibrations (default: dp=2;pp=2 and dp=2;pp=2;tp=2;dp=2,zero=3).")
    parser.add_argument("--strategies", default=";".join(STRATEGIES),
                        help="Strategies launched and tabulated, ';'-separated (--strategy syntax).")
    args = parser.parse_args()
    models, backends = args.models.split(","), args.backends.split(",")
    strategies = args.strategies.split(";")
    sets = [(c.split(";"), True) for c in args.calibrate_on] if args.calibrate_on else CALIBRATION_SETS
    if any(not set(c) <= set(strategies) for c, _ in sets):
        parser.error("--calibrate-on names a strategy not in --strategies")
    meta_path = args.work_dir / "launch_meta.json"
    if not args.analyze_only:
        load_start = os.getloadavg()[0]
        t0 = time.perf_counter()
        steps = {m: args.steps_small if "small" in m else args.steps_tiny for m in models}
        launch_all(models, backends, args.work_dir, steps, args.global_batch, args.seq_len, args.micro_batch,
                   strategies)
        meta_path.write_text(json.dumps({"load_start": load_start, "load_end": os.getloadavg()[0],
                                         "minutes": (time.perf_counter() - t0) / 60}))
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    text, dump = "", []
    for calibrate_on, overheads in sets:
        rows, cals = analyze(models, backends, args.work_dir, calibrate_on, strategies, overheads)
        what = ("profiles with the tp and ZeRO-3 overheads `paraplan profile` measured" if overheads else
                "profiles without the measured overheads (priced at 0 unless a calibration run shows them)")
        text += (f"## Calibrated on {' + '.join(calibrate_on)}; {what}\n\n{table(rows)}\n\nFitted coefficients "
                 f"(tp and ZeRO-3 \"profile's\": no calibration run exercised them; the profile's two-process "
                 f"timing applies, beyond the collectives as the calibrated links price them; its uncalibrated value "
                 f"in brackets):\n\n{coefficients(cals)}\n\n{summary(rows)}\n\n")
        dump.append({"calibrate_on": calibrate_on, "overheads": overheads, "rows": rows, "calibrations": cals})
    text += noise(rows) + "\n"
    if args.repeat_of is not None:
        text += repeat_noise(rows, args.repeat_of, models, backends) + "\n"
    print(text)
    (args.work_dir / "calibration_rows.json").write_text(json.dumps(dump, indent=2))
    if args.write:
        header = (f"Command: `python benchmarks/calibration.py {' '.join(sys.argv[1:])}`; cpu:2 (gloo, "
                  f"{os.cpu_count()} cores), global batch {args.global_batch}, seq {args.seq_len}, micro-batch {args.micro_batch} unless the "
                f"strategy says mb=, fp32, steps {args.steps_tiny} (tiny) / {args.steps_small} (small), measured "
                "step = median of the steps after the first 2 (step 2 is the one profiled for phases, excluded). "
                + (f"Load average (1 min) {meta['load_start']:.1f} at start, {meta['load_end']:.1f} after the "
                   f"launches; {meta['minutes']:.0f} min of launches." if "load_start" in meta else "")
                + (f" {meta['note']}" if "note" in meta else ""))
        RESULTS.write_text(f"# Calibration from trial steps on cpu:2\n\n{header}\n\n{text}")


if __name__ == "__main__":
    main()
