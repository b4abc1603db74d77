"""Helpers of benchmarks/gpu_validate.sh: map this GPU to a catalog cluster, compare plans, write the report.

The shell script runs the pipeline (profile, plan with and without the profile, launch each backend); this module
holds what is easier in Python:

    python benchmarks/gpu_validate.py cluster                 # 1x<catalog device> for GPU 0, e.g. 1xH200-141GB
    python benchmarks/gpu_validate.py same-strategy A.json B.json   # exit 0 when the two plans' strategies match
    python benchmarks/gpu_validate.py report --work DIR --out FILE ...

``report`` reads ``DIR/runs.tsv`` (one line per launch: plan label, plan file, backend, run directory, exit code),
each plan's ``predicted`` and each run's ``metrics.jsonl`` and writes a Markdown table of measured against
predicted step time and peak memory per rank. Measured step time is the mean after the warm-up steps and measured
peak memory the max over ranks and steps, as ``paraplan launch`` prints them (``paraplan.cli.render.
measured_summary``); error = (predicted - measured) / measured. The file is written to a temporary name beside
``--out`` and renamed, so a failure leaves no half-written report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

from paraplan.backends.launch import read_metrics
from paraplan.cli.render import WARMUP_STEPS, measured_summary
from paraplan.units import GiB, MiB

# Substring of torch.cuda.get_device_name() -> catalog device (paraplan/catalog.py). Checked in order, so the
# more specific names come first. The catalog's figures are the SXM parts; PCIe and NVL boards of the same chip
# map to them too (their clocks and bandwidths are lower: the report names the board).
_DEVICE_RULES: list[tuple[str, str]] = [
    ("H200", "H200-141GB"),
    ("H100", "H100-80GB"),
    ("B200", "B200-180GB"),
    ("L4", "L4-24GB"),
    ("V100", "V100-32GB"),
]
A100_80GB_MIN_BYTES = 60 * GiB  # an A100-80GB reports ~79 GiB total, an A100-40GB ~39 GiB


def catalog_device(gpu_name: str, total_memory_bytes: int) -> str:
    """Catalog device name for a CUDA device.

    Args:
        gpu_name: ``torch.cuda.get_device_name()``, e.g. ``NVIDIA H200`` or ``NVIDIA H100 80GB HBM3``.
        total_memory_bytes: ``torch.cuda.get_device_properties().total_memory`` (tells the A100s apart).

    Raises:
        ValueError: a GPU the catalog does not hold.
    """
    if "A100" in gpu_name:
        return "A100-80GB" if total_memory_bytes >= A100_80GB_MIN_BYTES else "A100-40GB"
    for key, name in _DEVICE_RULES:
        if key in gpu_name:
            return name
    raise ValueError(f"GPU '{gpu_name}' is not in paraplan's catalog (paraplan/catalog.py); pass --cluster "
                     "with a cluster file describing it")


def _cmd_cluster(_: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 1
    props = torch.cuda.get_device_properties(0)
    try:
        print(f"1x{catalog_device(torch.cuda.get_device_name(0), props.total_memory)}")
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def _strategy_key(plan_path: Path) -> dict:
    strategy = dict(json.loads(plan_path.read_text())["strategy"])
    # Per-stage predicted times differ between a profiled and an analytic plan of the same strategy.
    strategy["stages"] = [{k: v for k, v in s.items() if k not in ("time_per_micro_batch_s", "memory_bytes")}
                          for s in strategy["stages"]]
    return strategy


def _cmd_same_strategy(args: argparse.Namespace) -> int:
    return 0 if _strategy_key(args.a) == _strategy_key(args.b) else 1


def strategy_text(strategy: dict) -> str:
    """Short text of a plan's strategy: ``dp=1 tp=1 pp=1 mb=4 accum=8 zero=0 recompute=0/16``."""
    blocks = sum(s["n_blocks"] for s in strategy["stages"])
    full = sum(s["recompute_blocks"] for s in strategy["stages"])
    text = (f"dp={strategy['dp']} tp={strategy['tp']} pp={strategy['pp']} mb={strategy['micro_batch_size']} "
            f"accum={strategy['grad_accum']} zero={strategy['zero_stage']} recompute={full}/{blocks}")
    if strategy.get("offload_optimizer", "none") != "none" or strategy.get("offload_param", "none") != "none":
        text += f" offload={strategy['offload_optimizer']}/{strategy['offload_param']}"
    return text


def _err(pred: float, meas: float) -> str:
    return f"{(pred - meas) / meas * 100:+.0f}%" if meas > 0 else "-"


def measure_run(run_dir: Path) -> dict | None:
    """Measured step time (s), peak memory per rank (bytes) and losses of a run; None without metrics.

    ``peak_reserved_bytes`` is the max over ranks and steps of the trainers' ``peak_reserved_bytes``
    (torch.cuda.max_memory_reserved, recorded on CUDA only), else None.
    """
    rows = read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []
    if not rows:
        return None
    meas = measured_summary(rows)
    reserved = [max(r["peak_reserved_bytes"]) for r in rows if r.get("peak_reserved_bytes")]
    meas["peak_reserved_bytes"] = max(reserved) if reserved else None
    meas["steps"] = len(rows)
    meas["timed"] = (f"steps {WARMUP_STEPS + 1}-{len(rows)}" if len(rows) > WARMUP_STEPS
                     else f"all {len(rows)} steps, warm-up included")
    return meas


def _log_tail(run_dir: Path, lines: int = 3) -> str:
    log = run_dir / "train.log"
    if not log.exists():
        return "no train.log"
    tail = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-lines:]
    return " / ".join(t.replace("|", "\\|")[:200] for t in tail)


HEADER = ("| plan | strategy | backend | measured step (s) | predicted step (s) | error | measured peak/rank (MiB) | "
          "measured reserved/rank (MiB) | predicted peak (MiB) | error | loss | timed |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_rows(work: Path) -> tuple[list[str], list[str]]:
    """Markdown rows, one per (plan, backend) in ``work/runs.tsv``, and the failed launches."""
    rows, failed = [], []
    for line in (work / "runs.tsv").read_text().splitlines():
        label, plan_file, backend, run_dir, code = line.split("\t")
        plan = json.loads(Path(plan_file).read_text())
        pred = plan["predicted"]
        strategy = strategy_text(plan["strategy"])
        meas = measure_run(Path(run_dir)) if code == "0" else None
        if meas is None:
            failed.append(f"{label}/{backend}")
            rows.append(f"| {label} | {strategy} | {backend} | failed (exit {code}): {_log_tail(Path(run_dir))} | "
                        f"{pred['step_time_s']:.4f} | - | - | - | {pred['peak_memory_bytes'] / MiB:.0f} | - | - | - |")
            continue
        reserved = meas["peak_reserved_bytes"]
        rows.append(
            f"| {label} | {strategy} | {backend} | {meas['step_time_s']:.4f} | {pred['step_time_s']:.4f} | "
            f"{_err(pred['step_time_s'], meas['step_time_s'])} | {meas['peak_memory_bytes'] / MiB:.0f} | "
            f"{'not recorded' if reserved is None else f'{reserved / MiB:.0f}'} | "
            f"{pred['peak_memory_bytes'] / MiB:.0f} | {_err(pred['peak_memory_bytes'], meas['peak_memory_bytes'])} | "
            f"{meas['first_loss']:.3f} -> {meas['last_loss']:.3f} | {meas['timed']} |")
    return rows, failed


def environment() -> dict[str, str]:
    """Device, driver and library versions of this machine."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except Exception as exc:  # noqa: BLE001 - reported, not fatal: the torch backend still runs
        env["deepspeed"] = f"not importable ({type(exc).__name__})"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = f"{torch.cuda.get_device_name(0)}, {props.total_memory / GiB:.1f} GiB"
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]).splitlines()[0:1]
        env["driver"] = env["driver"][0] if env["driver"] else "unknown (nvidia-smi failed)"
    else:
        env["device"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), no GPU"
        env["driver"] = "-"
    env["commit"] = _run(["git", "rev-parse", "--short", "HEAD"]).strip() or "unknown (no git checkout)"
    return env


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def render_report(args: argparse.Namespace) -> tuple[str, list[str]]:
    work: Path = args.work
    rows, failed = table_rows(work)
    env = environment()
    commands = (work / "commands.txt").read_text().rstrip()
    mode = "DRY RUN on CPU (plumbing check, not a GPU result)" if args.dry_run else "GPU"
    same = (work / "same_strategy").exists()
    notes = [
        f"- measured step = mean step time after the first {WARMUP_STEPS} steps (all steps when there are no more), "
        "from each run's `metrics.jsonl`; predicted = `plan.json` `predicted.step_time_s`; error = (predicted - "
        "measured) / measured.",
        "- measured peak/rank = max over ranks and steps of `metrics.jsonl` `peak_memory_bytes`: "
        "`torch.cuda.max_memory_allocated` on CUDA, peak resident set size on CPU (`paraplan/backends/"
        "train_common.py::peak_memory_bytes`); measured reserved/rank = `peak_reserved_bytes`, "
        "`torch.cuda.max_memory_reserved` (what the caching allocator holds, what an out-of-memory error counts), "
        "recorded on CUDA only (\"not recorded\" on CPU).",
        "- predicted peak = `predicted.peak_memory_bytes`, which includes the cost model's fixed allowance "
        "(`memory_breakdown_bytes.other`) for the CUDA context, workspaces and fragmentation; allocated memory "
        "excludes the CUDA context, so compare it with care.",
    ]
    if same:
        notes.append("- the analytic plan chose the same strategy as the profiled plan, so its rows reuse the "
                     "profiled plan's runs (measured numbers identical, only the prediction differs).")
    text = "\n".join([
        f"# Predicted vs measured on one GPU ({mode})",
        "",
        f"Date (UTC): {args.date}. Device: {env['device']}; driver {env['driver']}; torch {env['torch']} (CUDA "
        f"{env['cuda']}); deepspeed {env['deepspeed']}; Python {env['python']}; paraplan commit {env['commit']}.",
        "",
        f"Model {args.model}, cluster {args.cluster}, global batch {args.global_batch}, sequence {args.seq_len}, "
        f"{args.dtype}, profiled micro-batches {args.micro_batches}, {args.steps} steps per run. "
        f"Total wall time {args.elapsed_s} s.",
        "",
        HEADER,
        *rows,
        "",
        *notes,
        "",
        "Commands (`bash benchmarks/gpu_validate.sh" + (" --dry-run" if args.dry_run else "") + "` ran them; "
        "`WORK` is its temporary directory, `paraplan` is `python -m paraplan`):",
        "",
        "```bash",
        commands,
        "```",
        "",
    ])
    return text, failed


def write_atomic_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file beside it and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cmd_report(args: argparse.Namespace) -> int:
    text, failed = render_report(args)
    write_atomic_text(args.out, text)
    print(text)
    if failed:
        print(f"launch failed: {', '.join(failed)} (see the table and the run logs)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("cluster", help="print 1x<catalog device> for GPU 0").set_defaults(fn=_cmd_cluster)
    same = sub.add_parser("same-strategy", help="exit 0 when two plans have the same strategy")
    same.add_argument("a", type=Path)
    same.add_argument("b", type=Path)
    same.set_defaults(fn=_cmd_same_strategy)
    rep = sub.add_parser("report", help="write the measured vs predicted table")
    rep.add_argument("--work", type=Path, required=True)
    rep.add_argument("--out", type=Path, required=True)
    for name in ("model", "cluster", "dtype", "micro-batches", "date", "elapsed-s"):
        rep.add_argument(f"--{name}", required=True)
    rep.add_argument("--global-batch", type=int, required=True)
    rep.add_argument("--seq-len", type=int, required=True)
    rep.add_argument("--steps", type=int, required=True)
    rep.add_argument("--dry-run", action="store_true")
    rep.set_defaults(fn=_cmd_report)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
