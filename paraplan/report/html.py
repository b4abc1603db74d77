"""Write a plan's report: one self-contained HTML page (figures embedded as base64 PNG data URIs, no script or
style from elsewhere, so it opens offline) and each figure as PNG and SVG in ``<name>_files/`` beside it.

Every file is written atomically (a temporary file renamed over the target). The page carries one inline script:
on load it checks that every image decoded (``naturalWidth > 0``) and records the result in
``<body data-figures="ok N">`` (or ``broken: ...``), which the browser test reads.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from paraplan.errors import OutputError, ParaplanError
from paraplan.files import check_output_path, read_model, read_text, write_atomic
from paraplan.types import Plan
from paraplan.units import GiB


class ReportError(ParaplanError):
    """A report input that cannot be used: a missing or invalid plan, a run directory without metrics."""


@dataclass(frozen=True)
class ReportFiles:
    """What :func:`write_report` wrote: the page and the figure files."""

    html: Path
    figures: list[Path]
    notes: list[str]


def read_metrics(run_dir: Path) -> list[dict]:
    """The last metrics row of each step of a run (``metrics.jsonl``, paraplan.backends.train_common), by step.

    Lines that are not JSON objects with an integer ``step`` (a line cut by a killed job) are skipped.

    Raises:
        ReportError: ``run_dir`` is not a directory, has no metrics.jsonl, or no usable row.
    """
    if not run_dir.is_dir():
        raise ReportError(f"--run {run_dir} is not a directory; give the run directory `paraplan launch` wrote")
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        raise ReportError(f"--run {run_dir} has no metrics.jsonl: the run has not logged a step yet. Launch the plan "
                          "(paraplan launch PLAN.json --run-dir DIR) or drop --run")
    last: dict[int, dict] = {}
    for line in read_text(path, "metrics file", ReportError).splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and not isinstance(row["step"], bool):
            last[row["step"]] = row  # rows of a restarted job repeat steps: the last one counts
    if not last:
        raise ReportError(f"{path} holds no metrics row (JSON objects with a 'step'); is it a paraplan run?")
    return [last[k] for k in sorted(last)]


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    target = check_output_path(path, "figure")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except OSError as exc:
        raise OutputError(f"cannot write figure {path}: {exc.strerror or exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _render(fig) -> tuple[bytes, bytes]:
    """(PNG, SVG) bytes of a figure, without the date and version stamps, so a figure of the same plan is the same
    file (the README's figures are committed)."""
    import matplotlib

    matplotlib.rcParams["svg.hashsalt"] = "paraplan"
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=110, metadata={"Software": None})
    fig.savefig(svg, format="svg", metadata={"Date": None, "Creator": None})
    return png.getvalue(), svg.getvalue()


def _fmt_s(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms" if seconds < 2 else f"{seconds:,.2f} s"


def _summary(plan: Plan) -> str:
    s, p = plan.strategy, plan.predicted
    rows = [
        ("model", plan.model.name), ("cluster", f"{plan.cluster.name} ({plan.cluster.world_size} devices)"),
        ("batch", f"{plan.train.global_batch} sequences x {plan.train.seq_len} tokens, {plan.train.dtype}"),
        ("strategy", f"dp={s.dp} tp={s.tp} pp={s.pp} cp={s.cp} ep={s.ep} micro-batch={s.micro_batch_size} "
                     f"m={s.grad_accum} ZeRO-{s.zero_stage} schedule={s.schedule} vpp={s.vpp}"),
        ("offload", f"optimizer {s.offload_optimizer}, parameters {s.offload_param}"),
        ("predicted step", f"{_fmt_s(p.step_time_s)} = pipeline {_fmt_s(p.compute_s)} (bubble {_fmt_s(p.bubble_s)})"
                           f" + DP/ZeRO comm {_fmt_s(p.dp_comm_s)} + optimizer {_fmt_s(p.optimizer_s)} + offload "
                           f"{_fmt_s(p.offload_s)}"),
        ("throughput", f"{p.tokens_per_s:,.0f} tokens/s, MFU {p.mfu:.1%}" if plan.cluster.device.kind == "cuda"
         else f"{p.tokens_per_s:,.0f} tokens/s"),
        ("peak memory", f"{p.peak_memory_bytes / GiB:,.2f} GiB of {p.memory_capacity_bytes / GiB:,.1f} GiB per device"),
        ("binding", p.binding or "n/a"), ("compute source", p.compute_source),
        ("solver", f"{plan.solver.solver}, {plan.solver.status}; {plan.solver.milps_solved} MILPs over "
                   f"{plan.solver.candidates} candidates in {plan.solver.search_time_s:.1f} s"),
    ]
    return _table(["", ""], rows, header=False)


def _table(head: list[str], rows: list[tuple], header: bool = True) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _top_k(plan: Plan) -> str:
    ranked = sorted((r for r in plan.candidates or [] if r.rank is not None), key=lambda r: r.rank or 0)
    if not ranked:
        return "<p>No top-k list in this plan file.</p>"
    best = ranked[0].step_time_s
    rows = [(r.rank, r.label, _fmt_s(r.step_time_s), f"{(r.step_time_s / best - 1):+.1%}",
             f"{(r.peak_memory_bytes or 0) / GiB:,.2f} GiB") for r in ranked]
    return _table(["rank", "candidate", "step time", "vs best", "peak memory"], rows)


_CHECK = """<script>
window.addEventListener("load", function () {
  var bad = [];
  for (var i = 0; i < document.images.length; i++) {
    var im = document.images[i];
    if (!(im.complete && im.naturalWidth > 0)) { bad.push(im.alt); }
  }
  document.body.setAttribute("data-figures", bad.length ? "broken: " + bad.join(", ")
                                                        : "ok " + document.images.length);
});
</script>"""

_STYLE = """<style>
body { font-family: sans-serif; max-width: 1400px; margin: 1em auto; color: #222; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
.side { display: flex; gap: 1em; align-items: flex-start; }
.note { color: #8a4b00; }
</style>"""


def write_report(plan_path: Path, out: Path, run_dir: Path | None = None, profile_path: Path | None = None
                 ) -> ReportFiles:
    """Render the report of the plan at ``plan_path`` (and of the run in ``run_dir``) into ``out``.

    Args:
        plan_path: a plan file from ``paraplan plan -o``.
        out: the HTML page; figures go to ``<out stem>_files/`` beside it.
        run_dir: a run directory from ``paraplan launch`` (its metrics.jsonl), or None.
        profile_path: the profile a profile-priced plan was made with, when its recorded path does not hold it.

    Raises:
        ReportError: missing or invalid plan, run directory without metrics, a schedule that cannot be drawn.
        ProfileError: the plan's profile cannot be read.
        OutputError: ``out`` or the figure folder cannot be written.
    """
    from paraplan.report import figures
    from paraplan.report.breakdown import load_plan_profile, plan_costs
    from paraplan.report.schedule import ScheduleError, schedule_order, simulate

    if out.is_dir():
        raise OutputError(f"-o {out} is a directory; give the page's file name, e.g. {out / 'report.html'}")
    check_output_path(out, "-o")
    plan = read_model(plan_path, Plan, "plan", ReportError, f"run `paraplan plan ... -o {plan_path}` first")
    rows = read_metrics(run_dir) if run_dir is not None else None
    costs = plan_costs(plan, load_plan_profile(plan, profile_path))
    s = plan.strategy
    notes = []
    if costs.mismatch > 1e-6:
        notes.append(f"The cost model of this paraplan gives stage times or memory up to {costs.mismatch:.1%} "
                     "different from the plan file's (made by another version or profile); the figures show this "
                     "version's split.")
    try:
        timeline = simulate(schedule_order(s.schedule, s.pp, s.vpp, s.grad_accum), costs.op_times, costs.tail)
    except ScheduleError as exc:
        raise ReportError(f"cannot draw the pipeline schedule: {exc}") from None
    if abs(timeline.pipeline_s - costs.pipeline_s) > 1e-3 * costs.pipeline_s:
        notes.append(f"The timeline runs the schedule's operation order with these stage times and takes "
                     f"{_fmt_s(timeline.pipeline_s)} for the pipeline; the cost model's closed form "
                     f"(m max_s t_s + w (sum_s t_s - max_s t_s)) says {_fmt_s(costs.pipeline_s)} "
                     f"({timeline.pipeline_s / costs.pipeline_s - 1:+.1%}): the closed form is exact for equal "
                     "stages only (tests/unit/test_report_schedule.py).")
    figs = {"timeline": figures.timeline_figure(plan, timeline, costs), "memory": figures.memory_figure(plan, costs),
            "candidates": figures.candidates_figure(plan)}
    if rows is not None:
        figs.update(figures.run_figures(plan, rows, costs))
        if not any(isinstance(r.get("phases"), dict) for r in rows):
            notes.append("The run's metrics rows carry no per-phase times ('phases'); launch with --phases to "
                         "record them.")
    folder = out.parent / f"{out.stem}_files"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create {folder}: {exc.strerror or exc}") from None
    uris, written = {}, []
    for name, fig in figs.items():
        png, svg = _render(fig)
        for ext, data in (("png", png), ("svg", svg)):
            _write_bytes_atomic(folder / f"{name}.{ext}", data)
            written.append(folder / f"{name}.{ext}")
        uris[name] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    write_atomic(out, _page(plan, plan_path, run_dir, rows, uris, notes, folder.name), "-o")
    return ReportFiles(out, written, notes)


def _img(uris: dict[str, str], name: str, alt: str) -> str:
    return (f'<img src="{uris[name]}" alt="{html.escape(alt)}"><p><small>Files: {name}.png, {name}.svg'
            "</small></p>")


def _page(plan: Plan, plan_path: Path, run_dir: Path | None, rows: list[dict] | None, uris: dict[str, str],
          notes: list[str], folder: str) -> str:
    title = f"paraplan report: {plan.model.name} on {plan.cluster.name}"
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             _STYLE, "</head><body>", f"<h1>{html.escape(title)}</h1>",
             f"<p>Plan: {html.escape(str(plan_path))}. Figures also in {html.escape(folder)}/ (PNG and SVG).</p>",
             _summary(plan)]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in notes]
    parts += ["<h2>Pipeline schedule, first step</h2>",
              "<p>Each rank's operations in the order the schedule runs them, timed with the cost model's "
              "per-stage forward, backward, recomputation, exposed communication and offload-transfer times; grey "
              "is idle (the bubble). Labels: F/B forward/backward (I/W: input and weight gradient), micro-batch, "
              "and virtual stage after the dot when vpp &gt; 1.</p>",
              _img(uris, "timeline", "pipeline schedule timeline"),
              "<h2>Memory per stage</h2>",
              "<p>Bytes per device of each pipeline rank by class, against device memory, and what it keeps in host "
              "memory and on NVMe against its share of them; the fullest tier (binding) in red.</p>",
              _img(uris, "memory", "memory per stage"),
              "<h2>Candidate space</h2>",
              '<div class="side"><div>' + _img(uris, "candidates", "candidate space") + "</div><div>"
              "<h3>Top plans</h3>" + _top_k(plan) + "</div></div>"]
    if rows is not None:
        parts += [f"<h2>Run: {html.escape(str(run_dir))}</h2>",
                  f"<p>{len(rows)} steps logged; predicted step {_fmt_s(plan.predicted.step_time_s)}, measured "
                  f"median {_fmt_s(_median([r.get('step_time_s') for r in rows]))}.</p>",
                  _img(uris, "run", "measured against predicted")]
        if "phases" in uris:
            parts.append(_img(uris, "phases", "time per phase"))
    parts += [_CHECK, "</body></html>\n"]
    return "\n".join(parts)


def _median(values: list) -> float:
    xs = sorted(float(v) for v in values if isinstance(v, (int, float)))
    if not xs:
        return float("nan")
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2
