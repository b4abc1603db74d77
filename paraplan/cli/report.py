"""``paraplan report``: the plan's figures in one self-contained HTML page (paraplan.report)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer, guard) -> None:
    """Add ``report`` to the typer app (called by paraplan.cli.app)."""

    @app.command("report")
    @guard
    def report_cmd(
        plan: Annotated[Path, typer.Argument(help="Plan file from `paraplan plan -o`.")],
        run: Annotated[Optional[Path], typer.Option(
            "--run", help="Run directory from `paraplan launch` (its metrics.jsonl): adds measured against "
                          "predicted step time and memory, the loss curve and per-phase times.")] = None,
        profile: Annotated[Optional[Path], typer.Option(
            help="The profile a profile-priced plan was made with, when the path the plan records does not hold "
                 "it.")] = None,
        output: Annotated[Path, typer.Option(
            "-o", "--output", help="The HTML page; the figures go beside it as PNG and SVG in <name>_files/.")]
            = Path("report.html"),
    ) -> None:
        """Draw a plan: pipeline schedule, memory per stage, candidate space (and a run against it) as one HTML
        page with the images embedded, which opens without a network."""
        from paraplan.cli.app import console
        from paraplan.report.html import write_report

        files = write_report(plan, output, run, profile)
        console.print(f"wrote {files.html} and {len(files.figures)} figure files in {files.figures[0].parent}/",
                      highlight=False, soft_wrap=True)
        for note in files.notes:
            console.print(f"note: {note}", highlight=False, soft_wrap=True)
