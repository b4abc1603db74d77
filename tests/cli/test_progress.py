"""Live progress of ``plan``'s search and ``launch``'s job: drawn on a terminal only, never with --json or piped."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from rich.console import Console

from conftest import run_cli as run
from paraplan.catalog import load_cluster_spec
from paraplan.cli import progress
from paraplan.cli.progress import LaunchMonitor, MetricsTail, SearchDisplay
from paraplan.models.presets import load_model_spec
from paraplan.planner.search import search_plans
from paraplan.types import TrainSpec

BASE = ["--cluster", "8xH100-80GB", "--global-batch", "64", "--seq-len", "4096"]


def _terminal() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=200), buf


def test_search_display_counts_match_the_searchs_totals(monkeypatch):
    console, buf = _terminal()
    monkeypatch.setattr(progress.sys.stdout, "isatty", lambda: True, raising=False)
    display = SearchDisplay(console)
    assert display.active
    with display as on_progress:
        plans = search_plans(load_model_spec("llama3-8b"), load_cluster_spec("8xH100-80GB"),
                             TrainSpec(global_batch=64, seq_len=4096), top_k=2, progress=on_progress)
    last = display.last
    # One callback per candidate the rules allow; each ends solved, pruned by a bound, or unable to fit.
    assert display.calls == last.total == last.solved + last.pruned + last.cannot_fit
    assert last.solved == plans[0].solver.milps_solved
    assert last.total + last.rejected == plans[0].solver.candidates
    assert last.best_step_time_s == pytest.approx(plans[0].predicted.step_time_s, rel=1e-9)
    drawn = buf.getvalue()
    assert "MILPs solved" in drawn and "pruned by bound" in drawn and "ms/step at dp=" in drawn


def test_search_display_is_quiet_off_a_terminal_or_with_json(monkeypatch):
    console, buf = _terminal()
    monkeypatch.setattr(progress.sys.stdout, "isatty", lambda: True, raising=False)
    assert not SearchDisplay(console, quiet=True).active  # --json
    monkeypatch.setattr(progress.sys.stdout, "isatty", lambda: False, raising=False)
    display = SearchDisplay(console)  # stdout piped, stderr a terminal
    assert not display.active
    with display as on_progress:
        search_plans(load_model_spec("llama-tiny"), load_cluster_spec("cpu:2"),
                     TrainSpec(global_batch=4, seq_len=64, dtype="fp32"), top_k=1, progress=on_progress)
    assert display.calls > 0 and buf.getvalue() == ""
    piped = Console(file=io.StringIO())  # not a terminal
    assert not SearchDisplay(piped).active


def test_plan_json_on_a_pipe_is_clean_json_with_nothing_on_stderr(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "paraplan", "plan", "llama3-8b", *BASE, "--json", "-o",
                           str(tmp_path / "plan.json")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["strategy"]["dp"] == 8
    assert "MILPs solved" not in proc.stderr and "planning" not in proc.stderr
    # explain searches again for the next-best plans: its --json too is the only thing on stdout.
    proc = subprocess.run([sys.executable, "-m", "paraplan", "explain", str(tmp_path / "plan.json"), "--alternatives",
                           "1", "--compare", "zero=1", "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [a["label"] for a in json.loads(proc.stdout)["alternatives"]] == ["#2", "compare 1"]
    assert "MILPs solved" not in proc.stderr


def test_plan_table_through_the_cli_runner_has_no_progress(tmp_path):
    result = run("plan", "llama-tiny", "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "64", "-o",
                 str(tmp_path / "plan.json"))
    assert result.exit_code == 0, result.output
    assert "MILPs solved" not in result.output and "pruned by bound" not in result.output


def test_metrics_tail_skips_earlier_rows_and_waits_for_whole_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "loss": 5.0}) + "\n")  # a resumed run's earlier step
    tail = MetricsTail(path)
    assert tail.read() == []
    with path.open("a") as f:
        f.write(json.dumps({"step": 1, "loss": 4.0, "tokens_per_s": 10.0}) + "\n" + '{"step": 2, "lo')
    assert [r["step"] for r in tail.read()] == [1]
    with path.open("a") as f:
        f.write('ss": 3.5}\n{"phase": "x"}\n')
    assert tail.read() == [{"step": 2, "loss": 3.5}]


def test_launch_monitor_draws_steps_loss_and_tokens_per_s(tmp_path, monkeypatch):
    console, buf = _terminal()
    monkeypatch.setattr(progress.sys.stdout, "isatty", lambda: True, raising=False)
    path = tmp_path / "metrics.jsonl"
    with LaunchMonitor(console, path, steps=4, interval_s=60) as monitor:
        assert monitor.active
        path.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s, "step_time_s": 0.25,
                                            "tokens_per_s": 1024.0 * (s + 1)}) + "\n" for s in range(3)))
        monitor.poll()
    drawn = buf.getvalue()
    assert [r["step"] for r in monitor.rows] == [0, 1, 2]
    assert "3/4" in drawn and "loss 3.0000" in drawn and "3,072 tokens/s" in drawn and "250.0 ms" in drawn


def test_launch_monitor_is_quiet_off_a_terminal(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    buf = io.StringIO()
    with LaunchMonitor(Console(file=buf), path, steps=2) as monitor:
        path.write_text(json.dumps({"step": 0, "loss": 1.0}) + "\n")
        monitor.poll()
    assert not monitor.active and buf.getvalue() == ""
    assert monitor._thread is None  # nothing polls in the background
