"""``paraplan calibrate RUN_DIR...``: fit the cost model's free coefficients to launched runs
(``paraplan.cost_models.calibration``) and write the calibration file ``plan``/``estimate --calibration`` take."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def calibration_summary(cal) -> dict:
    """The ``--json`` output: the coefficients, their priors, the fit's errors and each run's residuals."""
    return cal.model_dump(mode="json")


def _render(console, cal, output: Path) -> None:
    from rich.table import Table

    from paraplan.units import format_bytes, format_seconds

    coef = Table(title=f"calibration: {cal.backend} on {cal.cluster}, {cal.dtype} ({', '.join(cal.models)})")
    for col in ("coefficient", "fitted", "uncalibrated"):
        coef.add_column(col, justify="right")
    for name in ("compute_scale_fwd", "compute_scale_bwd", "link_time_scale", "optimizer_scale"):
        coef.add_row(name, f"{getattr(cal, name):.3f}", f"{cal.prior[name]:.3f}")
    coef.add_row("latency_s", format_seconds(cal.latency_s), format_seconds(cal.prior["latency_s"]))
    coef.add_row("step_overhead_s", format_seconds(cal.step_overhead_s), "0")
    coef.add_row("memory_scale", f"{cal.memory_scale:.3f}", "1")
    coef.add_row("memory_offset", format_bytes(cal.memory_offset_bytes), "0")
    console.print(coef)
    runs = Table(title="runs (error = (prediction - measured) / measured)")
    for col in ("run", "strategy", "measured step", "uncalibrated", "calibrated", "measured peak", "uncalibrated",
                "calibrated"):
        runs.add_column(col, justify="right")
    for r in cal.runs:
        def err(p: float, m: float) -> str:
            return f"{(p - m) / m:+.0%}"

        runs.add_row(Path(r.run_dir).name, r.strategy, format_seconds(r.measured_step_s),
                     f"{format_seconds(r.predicted_step_s)} {err(r.predicted_step_s, r.measured_step_s)}",
                     f"{format_seconds(r.calibrated_step_s)} {err(r.calibrated_step_s, r.measured_step_s)}",
                     format_bytes(r.measured_peak_bytes),
                     f"{format_bytes(r.predicted_peak_bytes)} {err(r.predicted_peak_bytes, r.measured_peak_bytes)}",
                     f"{format_bytes(r.calibrated_peak_bytes)} "
                     f"{err(r.calibrated_peak_bytes, r.measured_peak_bytes)}")
    console.print(runs)
    if not any(r.phases for r in cal.runs):
        console.print("no run recorded phase times (launch --phases): only step totals were fitted, and "
                      "coefficients they cannot tell apart stayed near their uncalibrated values", highlight=False)
    console.print(f"wrote {output}", highlight=False)


def register(app: typer.Typer, guard) -> None:
    """Add ``calibrate`` to the typer app (called by paraplan.cli.app)."""

    @app.command("calibrate")
    @guard
    def calibrate_cmd(
        run_dirs: Annotated[list[Path], typer.Argument(
            help="Run directories of `paraplan launch PLAN --phases` (one cluster, backend and dtype; two or more "
                 "strategies, e.g. dp=2 and pp=2).")],
        output: Annotated[Path, typer.Option("-o", "--output", help="Where to write the calibration file.")
                          ] = Path("calibration.json"),
        profile: Annotated[Optional[Path], typer.Option(
            help="The profile the plans were priced with (default: the path each plan records).")] = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the calibration as JSON.")] = False,
    ) -> None:
        """Fit the cost model's compute, link, optimizer, per-step and memory coefficients to launched runs."""
        from paraplan.cli import app as cli
        from paraplan.cost_models.calibration import fit_calibration, read_run, write_calibration
        from paraplan.files import check_output_path

        check_output_path(output, "-o")
        runs = [read_run(d, profile) for d in run_dirs]
        cal = fit_calibration(runs)
        write_calibration(cal, output)
        if as_json:
            cli.print_json(calibration_summary(cal))
            return
        _render(cli.console, cal, output)
