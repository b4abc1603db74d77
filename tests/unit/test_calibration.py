"""Calibration from trial steps: the fit recovers known coefficients, the input transform matches hand arithmetic,
mismatched calibrations are refused, and the per-phase summary of profiler events."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
from calibration_helpers import MEM_OFFSET, MEM_SCALE, SEQ, TIMES, TRUE, TRUE_OVERHEADS, hand_profile, synthetic_run
from conftest import make_plan

from paraplan.backends.phases import merge_rank_phases, summarize_events
from paraplan.catalog import load_cluster_spec
from paraplan.cost_models.calibration import (
    CalibrationError, RunData, apply_calibration, check_calibration, coverage_warning, fit_calibration, nnls,
    plan_costs_at, predict_calibrated, read_calibration, transform_inputs, write_calibration,
)
from paraplan.cost_models.costs import predict
from paraplan.models.presets import load_model_spec

MiB = 2 ** 20


def test_transform_scales_compute_as_hand_arithmetic():
    """One process, no communication: step = m x (embed + L blocks + head) x (s_f fwd + s_b bwd) + optimizer;
    with the optimizer made free the step is exactly the scaled layer times."""
    plan = make_plan(cluster="cpu:1", seq_len=SEQ, global_batch=8, micro_batch_size=2)
    n = load_model_spec("llama-tiny").n_layers
    m = 4
    cluster, prof = transform_inputs(plan.cluster, hand_profile(), 1.5, 2.5, 0.0, 0.0, 0.0)
    step = predict(*plan_costs_at(plan, cluster, prof, None)).step_time_s
    fwd = TIMES["embed"][0] + n * TIMES["block"][0] + TIMES["head"][0]
    bwd = TIMES["embed"][1] + n * TIMES["block"][1] + TIMES["head"][1]
    assert step == pytest.approx(m * (1.5 * fwd + 2.5 * bwd), rel=1e-9)


def test_nnls_matches_brute_force_and_kkt():
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.normal(size=(9, 4))
        b = rng.normal(size=9)
        x = nnls(a, b)
        assert np.all(x >= 0)
        # KKT of min ||Ax - b||^2, x >= 0: gradient zero on the free coordinates, >= 0 on the ones at zero.
        grad = a.T @ (a @ x - b)
        assert np.allclose(grad[x > 0], 0, atol=1e-9)
        assert np.all(grad[x == 0] >= -1e-9)
        # And no grid point does better (a brute-force check on a coarse grid).
        best = min(float(np.sum((a @ np.array(p) - b) ** 2))
                   for p in itertools.product(np.linspace(0, 2, 9), repeat=4))
        assert float(np.sum((a @ x - b) ** 2)) <= best + 1e-12


def test_fit_recovers_known_coefficients(tmp_path):
    runs = [synthetic_run(tmp_path / "dp", dp=2), synthetic_run(tmp_path / "pp", pp=2)]
    cal = fit_calibration(runs, prior_weight=1e-7)
    for name, value in TRUE.items():
        assert getattr(cal, name) == pytest.approx(value, rel=1e-3, abs=1e-6), name
    assert cal.memory_scale == pytest.approx(MEM_SCALE, rel=1e-4)
    assert cal.memory_offset_bytes == pytest.approx(MEM_OFFSET, rel=1e-3)
    for r in cal.runs:
        assert r.calibrated_step_s == pytest.approx(r.measured_step_s, rel=1e-4)
        assert r.additivity_error < 1e-9
    # dp and pp runs say nothing of the tp and ZeRO-3 overheads: they stay at the prior, 0, and are not covered.
    assert cal.tp_overhead_s == 0 and cal.zero3_fetch_overhead_s == 0 and cal.mechanisms == []
    # A held-out strategy without them, generated the same way, is predicted as generated.
    held = synthetic_run(tmp_path / "dp16", global_batch=16, dp=2, recompute_blocks=3)
    step, peak = predict_calibrated(cal, held.plan, held.profile)
    assert step == pytest.approx(held.measured_step_s, rel=1e-3)
    assert peak == pytest.approx(held.measured_peak_bytes, rel=1e-3)


def test_fit_recovers_tp_and_zero3_overheads(tmp_path):
    """With a tp and a ZeRO-3 run among the calibration runs, their per-block and per-fetch overheads are fitted
    (every coefficient as generated), and strategies with other micro-batch counts are predicted as generated."""
    runs = [synthetic_run(tmp_path / "dp", dp=2), synthetic_run(tmp_path / "pp", pp=2),
            synthetic_run(tmp_path / "tp", tp=2), synthetic_run(tmp_path / "z3", dp=2, zero_stage=3)]
    cal = fit_calibration(runs, prior_weight=1e-7)
    for name, value in {**TRUE, **TRUE_OVERHEADS}.items():
        assert getattr(cal, name) == pytest.approx(value, rel=1e-3, abs=1e-6), name
    assert cal.mechanisms == ["tp", "zero3"]
    for kw in ({"tp": 2}, {"dp": 2, "zero_stage": 3}, {"tp": 2, "recompute_blocks": 6}):
        held = synthetic_run(tmp_path / "held", global_batch=16, **kw)
        step, _ = predict_calibrated(cal, held.plan, held.profile)
        assert step == pytest.approx(held.measured_step_s, rel=1e-3), kw
        assert coverage_warning(cal, held.plan) is None


def test_coverage_warning_names_what_the_runs_did_not_see(tmp_path):
    cal = fit_calibration([synthetic_run(tmp_path / "dp", dp=2), synthetic_run(tmp_path / "pp", pp=2)])
    assert coverage_warning(cal, make_plan(cluster="cpu:2", dp=2, seq_len=SEQ)) is None
    note = coverage_warning(cal, make_plan(cluster="cpu:2", tp=2, seq_len=SEQ))
    assert note is not None and "tensor parallelism" in note and "ZeRO-3" not in note
    note = coverage_warning(cal, make_plan(cluster="cpu:2", dp=2, zero_stage=3, seq_len=SEQ))
    assert note is not None and "ZeRO-3" in note


def test_prior_keeps_unidentified_coefficients(tmp_path):
    """One run without phases cannot separate the coefficients: the prior keeps link and optimizer figures near
    their uncalibrated values while the fit still matches the measured step."""
    run = synthetic_run(tmp_path / "dp", dp=2)
    run = RunData(run.run_dir, run.plan, run.backend, run.profile,
                  [{k: v for k, v in r.items() if k != "phases"} for r in run.rows])
    cal = fit_calibration([run])
    assert cal.runs[0].calibrated_step_s == pytest.approx(run.measured_step_s, rel=0.05)
    assert cal.link_time_scale == pytest.approx(1.0, abs=0.2)
    assert cal.optimizer_scale == pytest.approx(1.0, abs=0.2)


def test_mismatched_calibration_is_refused(tmp_path):
    cal = fit_calibration([synthetic_run(tmp_path / "dp", dp=2), synthetic_run(tmp_path / "pp", pp=2)])
    path = tmp_path / "cal.json"
    write_calibration(cal, path)
    cal = read_calibration(path)
    cpu2 = load_cluster_spec("cpu:2")
    check_calibration(cal, cpu2, "torch", "fp32")  # its own setting passes
    with pytest.raises(CalibrationError, match="cluster cpu:2, the plan for cpu:4"):
        check_calibration(cal, load_cluster_spec("cpu:4"), "torch", "fp32")
    with pytest.raises(CalibrationError, match="torch backend, the plan for deepspeed.*--backend torch"):
        check_calibration(cal, cpu2, "deepspeed", "fp32")
    with pytest.raises(CalibrationError, match="--backend torch"):
        check_calibration(cal, cpu2, "any", "fp32")
    with pytest.raises(CalibrationError, match="dtype fp32, the plan for bf16"):
        check_calibration(cal, cpu2, "torch", "bf16")
    with pytest.raises(CalibrationError, match="pass --profile"):
        apply_calibration(cal, cpu2, None)
    other = make_plan(cluster="cpu:2", dtype="bf16", seq_len=SEQ)
    with pytest.raises(CalibrationError, match="fp32"):
        predict_calibrated(cal, other, hand_profile())


def test_apply_calibration_lowers_capacity_for_the_planner(tmp_path):
    """The planner checks ``predicted <= capacity'``; with ``capacity' = (capacity - offset) / scale`` that is
    ``scale x predicted + offset <= capacity``, the calibrated peak against the real capacity."""
    cal = fit_calibration([synthetic_run(tmp_path / "dp", dp=2), synthetic_run(tmp_path / "pp", pp=2)],
                          prior_weight=1e-7)
    cpu2 = load_cluster_spec("cpu:2")
    clus, prof = apply_calibration(cal, cpu2, hand_profile())
    assert clus.device.memory_bytes == pytest.approx((cpu2.device.memory_bytes - MEM_OFFSET) / MEM_SCALE, rel=1e-3)
    assert prof.links == []  # applied once, on the cluster
    assert prof.layers[1].fwd_time_s == pytest.approx(TIMES["block"][0] * TRUE["compute_scale_fwd"], rel=1e-3)
    assert clus.intra_node_latency_s == pytest.approx(TRUE["latency_s"], rel=1e-3)


def test_read_calibration_errors(tmp_path):
    with pytest.raises(CalibrationError, match="does not exist"):
        read_calibration(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"cluster": "cpu:2"}')
    with pytest.raises(CalibrationError, match="not a calibration"):
        read_calibration(bad)


def _ev(name, start, end):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end))


def test_phase_summary_of_profiler_events():
    events = [
        _ev("paraplan/forward", 0, 1000), _ev("aten::mm", 100, 900),
        _ev("paraplan/backward", 1000, 3000), _ev("paraplan/backward", 1500, 2500),  # nested: counted once
        _ev("PP:0F1", 5000, 5500), _ev("PP:1B0", 6000, 6400), _ev("PP:0RECV_F1", 7000, 7100),
        _ev("paraplan/optimizer", 8000, 8300),
        # c10d calls on the main thread, their gloo work on worker threads (gloo runs reduce_scatter as all_reduce)
        _ev("c10d::allreduce_", 2000, 2010), _ev("c10d::_reduce_scatter_base_", 2100, 2110),
        _ev("gloo:all_reduce", 2011, 2600), _ev("gloo:all_reduce", 2111, 2300),
    ]
    out = summarize_events(events)
    assert out["forward_s"] == pytest.approx(1500e-6)
    assert out["backward_s"] == pytest.approx(2400e-6)
    assert out["optimizer_s"] == pytest.approx(300e-6)
    assert out["comm_s"] == pytest.approx({"all_reduce": 589e-6, "reduce_scatter": 189e-6})
    assert out["comm_count"] == {"all_reduce": 1, "reduce_scatter": 1}
    # Counts that do not match: the gloo event names are kept.
    out = summarize_events([_ev("gloo:all_gather", 0, 10), _ev("gloo:send", 20, 25)])
    assert out["comm_count"] == {"all_gather": 1, "send_recv": 1}
    merged = merge_rank_phases([{"forward_s": 1.0, "comm_s": {"all_reduce": 0.5}, "comm_count": {"all_reduce": 2}},
                                {"forward_s": 2.0, "comm_s": {}, "comm_count": {}}])
    assert merged["forward_s"] == [1.0, 2.0]
    assert merged["comm_s"] == {"all_reduce": [0.5, 0]}
