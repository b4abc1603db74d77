"""benchmarks/ranking.py: Kendall's tau, the pairs it reports as mis-ordered, the groups and the rows added for it."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
_spec = importlib.util.spec_from_file_location("ranking", ROOT / "benchmarks" / "ranking.py")
ranking = importlib.util.module_from_spec(_spec)
sys.modules["ranking"] = ranking  # dataclasses look their module up there
_spec.loader.exec_module(ranking)


@pytest.fixture(scope="module")
def results():
    return ranking.evaluate()


@pytest.mark.parametrize("x, y, tau", [
    ([3, 2, 1], [30, 20, 10], 1.0),  # same order
    ([3, 2, 1], [10, 20, 30], -1.0),  # reversed
    ([3, 2, 1], [3, 1, 2], 1 / 3),  # one adjacent swap in 3: 2 concordant, 1 discordant pair
    ([4, 3, 2, 1], [4, 3, 1, 2], 2 / 3),  # one swap in 4: (5 - 1) / 6
    ([1, 2, 3], [1, 1, 2], 2 / math.sqrt(6)),  # tau-b with a tie in y: (2 - 0) / sqrt(2 * 3)
])
def test_kendall_tau_hand_examples(x, y, tau):
    assert ranking.kendall_tau(x, y) == pytest.approx(tau)


def test_kendall_tau_all_tied_is_undefined():
    assert math.isnan(ranking.kendall_tau([1.0, 2.0], [5.0, 5.0]))


def _run(rid, measured, predicted, lower=False):
    return ranking.Run(rid, "m", lower, measured, predicted, predicted, "", None, 0.0)


def test_pairs_report_measured_and_predicted_gaps():
    runs = [_run("a", 10.0, 12.0), _run("b", 12.0, 10.0), _run("c", 12.0, 11.0)]
    by = {(p.faster, p.slower): p for p in ranking.pairs(runs)}
    assert set(by) == {("b", "a"), ("c", "a")}  # b and c measured equal: no pair
    assert by["b", "a"].measured_gap == pytest.approx(0.2)
    assert by["b", "a"].predicted_gap == pytest.approx(10 / 12 - 1)
    assert by["b", "a"].misordered and by["b", "a"].big
    assert by["c", "a"].misordered


def test_time_metrics_rank_the_shorter_time_first():
    runs = [_run("slow", 2.0, 1.5, lower=True), _run("fast", 1.0, 1.0, lower=True)]
    (p,) = ranking.pairs(runs)
    assert (p.faster, p.slower) == ("fast", "slow")
    assert p.measured_gap == pytest.approx(1.0) and p.predicted_gap == pytest.approx(0.5)
    assert not p.misordered


def test_a_predicted_tie_counts_as_misordered():
    (p,) = ranking.pairs([_run("a", 1.0, 5.0), _run("b", 2.0, 5.0)])
    assert p.misordered and p.predicted_gap == pytest.approx(0.0)


def test_every_group_has_two_runs_of_one_metric(results):
    rows = ranking.load_rows()
    assert len({g.key for g in ranking.GROUPS}) == len(ranking.GROUPS)
    for group, runs in results:
        assert len(group.ids) >= 2 and all(i in rows for i in group.ids), group.key
        assert len({(r.metric, r.lower_is_better) for r in runs}) == 1, group.key
        assert all(r.measured > 0 and r.predicted > 0 for r in runs), group.key


def test_every_misordered_pair_is_listed_with_its_gap(results):
    text = ranking.render(results)
    for group, runs in results:
        block = "\n".join(ranking.render_group(group, runs))
        for p in ranking.misordered(runs):
            line = next(ln for ln in block.splitlines() if ln.startswith("- MIS-ORDERED") and p.faster in ln
                        and p.slower in ln)
            assert f"{100 * p.measured_gap:.1f}% measured" in line
            assert f"predicted {100 * p.predicted_gap:+.1f}%" in line
            assert ("(> 10% apart)" in line) == p.big
            assert group.key in ranking.GROUP_DIAGNOSIS  # every mis-ordered group has a written diagnosis
    assert "goal (no pair > 10% apart mis-ordered)" in text


def test_the_table_runs_and_writes_its_command(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ranking.md"
    monkeypatch.setattr(ranking, "RESULTS", out)
    assert ranking.main(["--write"]) == 0
    assert "Kendall tau" in capsys.readouterr().out
    assert f"`{ranking.COMMAND}`" in out.read_text().splitlines()[2]


def test_added_rows_cite_their_table_and_keep_the_schema():
    published = json.loads((ROOT / "benchmarks" / "data" / "published_runs.jsonl").read_text().splitlines()[0])
    for line in ranking.ADDED.read_text().splitlines():
        row = json.loads(line)
        assert set(published) <= set(row), row["id"]
        assert row["source"] and row["source_locator"].startswith("Table "), row["id"]
        assert row["schema_version"] == 1


def test_added_rows_agree_with_the_papers_own_totals():
    """Transcription check: Table 4's combined = forward + backward; Table 5's 'Throughput Increase' column
    (29.0%, 31.8%, 29.7%, 32.1%) = full-recompute time / present-work time - 1."""
    rows = ranking.load_rows()
    for rid, row in rows.items():
        if row["source_group"] == "korthikanti_2022_table4":
            om = row["other_measured"]
            assert om["layer_forward_ms"] + om["layer_backward_ms"] == pytest.approx(om["layer_combined_ms"])
    for size, increase in (("22b", 0.290), ("175b", 0.318), ("530b", 0.297), ("1t", 0.321)):
        full = rows[f"korthikanti_t5_{size}_full"]["iteration_time_s"]
        present = rows[f"korthikanti_t5_{size}_selective_sp"]["iteration_time_s"]
        assert full / present - 1 == pytest.approx(increase, abs=0.0015)
