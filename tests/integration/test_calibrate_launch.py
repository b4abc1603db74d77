"""A real 2-step cpu:2 run with --phases records per-phase times, and `paraplan calibrate` on it writes a file that
`estimate --calibration` accepts."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

pytestmark = pytest.mark.integration


def test_phases_then_calibrate_then_estimate(tmp_path):
    import torch

    from paraplan.backends.launch import launch_plan
    from paraplan.catalog import load_cluster_spec
    from paraplan.cli.app import parse_strategy
    from paraplan.models.presets import load_model_spec
    from paraplan.planner.search import search_plans
    from paraplan.profiler import profile_model
    from paraplan.types import TrainSpec

    spec = load_model_spec("llama-tiny")
    torch.set_num_threads(1)
    prof = profile_model(spec, [2], 64, dtype="fp32", warmup=1, repeats=1, links=False)
    prof_path = tmp_path / "profile.json"
    prof_path.write_text(prof.model_dump_json())
    train = TrainSpec(global_batch=4, seq_len=64, dtype="fp32")
    plan = search_plans(spec, load_cluster_spec("cpu:2"), train, prof, parse_strategy("dp=2,mb=2,zero=0"), top_k=1,
                        backend="torch", profile_path=str(prof_path))[0]
    run = tmp_path / "run"
    _, rows = launch_plan(plan, "torch", run, steps=2, quiet=True, phase_times=True)
    assert [r["step"] for r in rows] == [0, 1]
    assert "phases" not in rows[0]
    phases = rows[1]["phases"]
    assert len(phases["forward_s"]) == 2 and min(phases["forward_s"]) > 0 and min(phases["backward_s"]) > 0
    assert min(phases["optimizer_s"]) > 0
    assert min(phases["comm_count"]["all_reduce"]) >= 1  # DDP's gradient buckets at least
    # The profiled part of the step is part of its wall time.
    assert max(phases["forward_s"]) + max(phases["backward_s"]) < rows[1]["step_time_s"]

    cal = tmp_path / "cal.json"
    res = run_cli("calibrate", str(run), "-o", str(cal))
    assert res.exit_code == 0, res.output
    assert json.loads(cal.read_text())["runs"][0]["phases"] is True
    res = run_cli("estimate", "llama-tiny", "--cluster", "cpu:2", "--global-batch", "4", "--seq-len", "64",
                  "--strategy", "tp=2,dp=1,pp=1,mb=2", "--profile", str(prof_path), "--backend", "torch",
                  "--calibration", str(cal), "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["step_time_s"] > 0
