"""Live progress on stderr for long commands: ``plan``'s search and ``launch``'s training job.

Both show only on an interactive terminal: with ``--json``, or when stdout or stderr is not a terminal (a pipe, a
file, CI, ``CliRunner``), nothing is drawn and the output is what it would be without them.
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


def interactive(console: Console, quiet: bool = False) -> bool:
    """Whether to draw live progress on ``console`` (stderr): not ``quiet``, and both it and stdout are terminals."""
    if quiet or not console.is_terminal:
        return False
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):  # a replaced or closed stdout
        return False


def _progress(console: Console) -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console, transient=True)


class SearchDisplay:
    """``plan``'s search as it runs: candidates evaluated of those the rules allow, MILPs solved, candidates pruned
    by a bound or unable to fit, and the incumbent (the best plan so far).

    Use as ``with SearchDisplay(err_console, quiet=as_json) as on_progress: search_plans(..., progress=on_progress)``.
    ``last`` holds the latest :class:`~paraplan.planner.search.SearchProgress` received (drawn or not).
    """

    def __init__(self, console: Console, quiet: bool = False) -> None:
        self.console = console
        self.active = interactive(console, quiet)
        self.last = None
        self.calls = 0
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self):
        if self.active:
            self._progress = _progress(self.console)
            self._task = self._progress.add_task("planning", total=None, info="enumerating candidates")
            self._progress.start()
        return self.update

    def update(self, p) -> None:
        """The search's callback: one call per candidate taken up (solved, pruned or found unable to fit)."""
        self.last, self.calls = p, self.calls + 1
        if self._progress is None:
            return
        best = "none yet" if p.best is None else f"{p.best_step_time_s * 1e3:,.1f} ms/step at {p.best.label()}"
        info = (f"{p.solved} MILPs solved, {p.pruned} pruned by bound, {p.cannot_fit} cannot fit "
                f"({p.rejected} excluded by rules); best {best}")
        self._progress.update(self._task, total=p.total, completed=p.solved + p.pruned + p.cannot_fit, info=info)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()


class MetricsTail:
    """New complete rows of a growing ``metrics.jsonl`` (a job's rank 0 appends one JSON line per step).

    Rows already in the file when the tail is made are skipped (a resumed run's earlier steps); a line still being
    written (no newline yet) is read once it is complete.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self._partial = b""

    def read(self) -> list[dict]:
        """The step rows appended since the last call (lines that are not a step row are skipped)."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        self.offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # after the last newline: incomplete (or empty)
        rows = []
        for line in lines:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "step" in row and "loss" in row:
                rows.append(row)
        return rows


class LaunchMonitor:
    """``launch``'s job as it runs: steps done of the run's, the latest loss, tokens/s and step time, read from
    ``metrics.jsonl`` every ``interval_s`` on a background thread.

    Use as ``with LaunchMonitor(err_console, run_dir / METRICS_FILE, steps) as monitor: launch_plan(...,
    quiet=monitor.active)`` (the live line replaces the job's own ``step`` lines on stdout).
    """

    def __init__(self, console: Console, metrics_path: Path, steps: int, quiet: bool = False,
                 interval_s: float = 0.5) -> None:
        self.console = console
        self.active = interactive(console, quiet)
        self.steps = steps
        self.interval_s = interval_s
        self.tail = MetricsTail(metrics_path)
        self.rows: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._progress: Progress | None = None
        self._task = None

    def __enter__(self) -> LaunchMonitor:
        if self.active:
            self._progress = _progress(self.console)
            self._task = self._progress.add_task("training", total=self.steps, info="waiting for the first step")
            self._progress.start()
            self._thread = threading.Thread(target=self._run, name="paraplan-launch-monitor", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        """Read the rows written since the last poll and redraw the line."""
        new = self.tail.read()
        if not new:
            return
        self.rows.extend(new)
        if self._progress is None:
            return
        last = new[-1]
        info = (f"loss {last['loss']:.4f}, {last.get('tokens_per_s', 0.0):,.0f} tokens/s, "
                f"step {last.get('step_time_s', 0.0) * 1e3:,.1f} ms")
        self._progress.update(self._task, completed=int(last["step"]) + 1, info=info)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._progress is not None:
            self.poll()
            self._progress.stop()
