"""``paraplan report``: the page a user opens (in a real headless browser), its figures, its numbers against the
plan's, the candidate space the plan keeps, and clear errors."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess

import pytest

from conftest import assert_user_error, run_cli as run
from paraplan.report.breakdown import plan_costs
from paraplan.report.html import write_report
from paraplan.types import Plan

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def plans(tmp_path_factory):
    """A CPU plan (pp=2, 1F1B) and a GPU-cluster plan (llama3-8b on 8 H100, pp=4 interleaved, vpp=2)."""
    d = tmp_path_factory.mktemp("plans")
    out = {}
    for name, args in (
        ("cpu", ["llama-tiny", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "64",
                 "--strategy", "pp=2"]),
        ("gpu", ["llama3-8b", "--cluster", "8xH100-80GB", "--global-batch", "16", "--seq-len", "4096",
                 "--strategy", "pp=4,vpp=2,schedule=interleaved_1f1b", "--backend", "torch"]),
    ):
        path = d / f"{name}.json"
        result = run("plan", *args, "-o", str(path))
        assert result.exit_code == 0, result.output
        out[name] = path
    return out


def _open_in_chromium(page, tmp_path) -> tuple[str, str]:
    """(DOM after load, browser log) of ``page`` in headless Chromium."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
         "--enable-logging=stderr", "--v=0", f"--user-data-dir={tmp_path / 'chromium'}", "--dump-dom",
         page.resolve().as_uri()],
        capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


@pytest.mark.parametrize("which", ["cpu", "gpu"])
def test_report_opens_in_a_browser_with_every_figure(plans, tmp_path, which):
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (Debian package chromium; .ci/run installs it)")
    page = tmp_path / "report.html"
    result = run("report", str(plans[which]), "-o", str(page))
    assert result.exit_code == 0, result.output
    dom, log = _open_in_chromium(page, tmp_path)
    # The page's own load check: every <img> decoded (naturalWidth > 0); three figures without --run.
    assert 'data-figures="ok 3"' in dom, dom[-500:]
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not console, console


def test_page_is_self_contained_and_figures_are_written_beside_it(plans, tmp_path):
    page = tmp_path / "r.html"
    files = write_report(plans["gpu"], page)
    text = page.read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)
    assert "<link" not in text and "<script src" not in text
    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 3
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    names = sorted(p.name for p in files.figures)
    assert names == ["candidates.png", "candidates.svg", "memory.png", "memory.svg", "timeline.png", "timeline.svg"]
    assert all(p.parent == tmp_path / "r_files" and p.stat().st_size > 1000 for p in files.figures)
    assert (tmp_path / "r_files" / "timeline.svg").read_text().lstrip().startswith("<?xml")
    # Same plan, same files (the README commits them).
    png = (tmp_path / "r_files" / "memory.png").read_bytes()
    write_report(plans["gpu"], page)
    assert (tmp_path / "r_files" / "memory.png").read_bytes() == png


@pytest.mark.parametrize("which", ["cpu", "gpu"])
def test_breakdown_adds_up_to_the_plans_stage_numbers(plans, which):
    plan = Plan.model_validate_json(plans[which].read_text())
    costs = plan_costs(plan)
    assert costs.mismatch < 1e-9
    s = plan.strategy
    per_rank = [0.0] * s.pp
    for v in s.virtual_stages():
        ot = costs.op_times[v.index]
        per_rank[v.rank] += sum(d for _, d in ot.forward) + sum(d for _, d in ot.backward)
    for st, total, mem in zip(s.stages, per_rank, costs.memory):
        assert total == pytest.approx(st.time_per_micro_batch_s, rel=1e-9)
        assert mem.device_bytes == pytest.approx(st.memory_bytes, rel=1e-9)
    assert max(m.device_bytes for m in costs.memory) == pytest.approx(plan.predicted.peak_memory_bytes, rel=1e-9)


def test_plan_keeps_the_candidate_space(plans):
    plan = Plan.model_validate_json(plans["gpu"].read_text())
    recs = plan.candidates
    assert recs
    ranked = sorted((r for r in recs if r.rank), key=lambda r: r.rank)
    assert [r.rank for r in ranked] == list(range(1, len(ranked) + 1))
    assert ranked[0].step_time_s == pytest.approx(plan.predicted.step_time_s)
    assert ranked[0].peak_memory_bytes == pytest.approx(plan.predicted.peak_memory_bytes)
    solved = [r for r in recs if r.outcome == "solved"]
    assert min(r.step_time_s for r in solved) == pytest.approx(plan.predicted.step_time_s)
    # Pruned: their step-time bound could not beat the K-th best plan.
    kth = ranked[-1].step_time_s
    assert all((r.step_time_s is None or r.step_time_s >= kth * (1 - 1e-9)) and r.peak_memory_bytes is None
               for r in recs if r.outcome == "pruned")
    assert all(r.peak_memory_bytes is not None for r in recs if r.outcome != "pruned")


def test_old_plan_without_candidates_still_renders(plans, tmp_path):
    data = json.loads(plans["cpu"].read_text())
    del data["candidates"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    result = run("report", str(old), "-o", str(tmp_path / "old.html"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "old_files" / "candidates.png").exists()


def _metrics(run_dir, phases: bool) -> None:
    rows = []
    for step in range(1, 6):
        row = {"step": step, "loss": 5.0 - 0.3 * step, "step_time_s": 0.5 + 0.01 * step, "tokens_per_s": 1000.0,
               "peak_memory_bytes": [700_000_000, 710_000_000], "restart": 0}
        if phases and step == 2:  # the format of paraplan.backends.phases.merge_rank_phases (2 ranks)
            row["phases"] = {"forward_s": [0.2, 0.21], "backward_s": [0.25, 0.26], "optimizer_s": [0.05, 0.05],
                             "step_s": [0.52, 0.52], "comm_s": {"all_reduce": [0.03, 0.03]},
                             "comm_count": {"all_reduce": [4, 4]}}
        rows.append(row)
    rows.append({**rows[2], "loss": 9.9, "restart": 1})  # a restarted job's repeat of step 3: the last one counts
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 6, \"lo")


@pytest.mark.parametrize("phases", [True, False])
def test_report_with_a_run(plans, tmp_path, phases):
    run_dir = tmp_path / "run"
    _metrics(run_dir, phases)
    page = tmp_path / "r.html"
    result = run("report", str(plans["cpu"]), "--run", str(run_dir), "-o", str(page))
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,', text)) == (5 if phases else 4)
    assert (tmp_path / "r_files" / "run.png").exists()
    assert (tmp_path / "r_files" / "phases.png").exists() == phases
    assert "5 steps logged" in text
    if not phases:
        assert "no per-phase times" in result.output


def test_bad_input_is_a_clear_error(plans, tmp_path):
    assert_user_error(run("report", str(tmp_path / "none.json")), "does not exist", "paraplan plan")
    not_plan = tmp_path / "p.json"
    not_plan.write_text(json.dumps({"schema_version": 1, "model": {}}))
    assert_user_error(run("report", str(not_plan)), "plan", "invalid")
    (tmp_path / "empty_run").mkdir()
    assert_user_error(run("report", str(plans["cpu"]), "--run", str(tmp_path / "empty_run"), "-o",
                          str(tmp_path / "x.html")), "no metrics.jsonl", "drop --run")
    assert_user_error(run("report", str(plans["cpu"]), "-o", str(tmp_path)), "is a directory")
    assert not (tmp_path / "x.html").exists()


def test_report_of_an_offloading_plan_with_infeasible_candidates(tmp_path):
    # 1 GiB per process: most candidates fit nowhere (no stage split fits: no finite step bound, kept as None), the
    # chosen DeepSpeed plan puts states on NVMe, so the memory figure has a used NVMe tier.
    plan_path = tmp_path / "p.json"
    result = run("plan", "llama-small", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "256",
                 "--device-memory", "1GiB", "--backend", "deepspeed", "-o", str(plan_path))
    assert result.exit_code == 0, result.output
    plan = Plan.model_validate_json(plan_path.read_text())
    assert any(r.outcome == "infeasible" for r in plan.candidates)
    costs = plan_costs(plan)
    assert max(m.nvme_bytes for m in costs.memory) == pytest.approx(plan.predicted.nvme_bytes)
    result = run("report", str(plan_path), "-o", str(tmp_path / "r.html"))
    assert result.exit_code == 0, result.output
    assert len(re.findall(r'<img src="data:image/png;base64,', (tmp_path / "r.html").read_text())) == 3
