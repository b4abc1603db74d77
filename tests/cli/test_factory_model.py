"""A user factory model (examples/custom_factory.py) through profile -> plan (-> launch, integration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from paraplan.cli.app import app
from paraplan.models.presets import load_model_spec

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FACTORY = "custom_factory:build"
runner = CliRunner()


@pytest.fixture(autouse=True)
def examples_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))  # for the torchrun processes


def test_factory_spec_reads_the_chain():
    spec = load_model_spec(FACTORY)
    # examples/custom_factory.py: 4 blocks, byte vocabulary 256, hidden 256.
    assert (spec.family, spec.n_layers, spec.vocab, spec.hidden) == ("custom", 4, 256, 256)


def test_factory_needs_a_profile(tmp_path):
    result = runner.invoke(app, ["plan", FACTORY, "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "32"])
    assert result.exit_code == 1 and "paraplan profile" in result.output


def test_bad_factory_is_a_clear_error():
    result = runner.invoke(app, ["plan", "custom_factory:nope", "--cluster", "cpu:2", "--global-batch", "8",
                                 "--seq-len", "32"])
    assert result.exit_code == 1 and "cannot import factory" in result.output


@pytest.fixture
def planned(tmp_path) -> Path:
    prof, plan = tmp_path / "profile.json", tmp_path / "plan.json"
    result = runner.invoke(app, ["profile", FACTORY, "--micro-batches", "1,2", "--seq-len", "32", "--no-links",
                                 "--warmup", "1", "--repeats", "2", "-o", str(prof)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["plan", FACTORY, "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "32",
                                 "--profile", str(prof), "--strategy", "dp=2", "-o", str(plan)])
    assert result.exit_code == 0, result.output
    return plan


def test_factory_plan_uses_profiled_sizes(planned):
    plan = json.loads(planned.read_text())
    assert plan["strategy"]["tp"] == 1 and plan["predicted"]["compute_source"] == "profile"
    profile = json.loads((planned.parent / "profile.json").read_text())
    block = next(lp for lp in profile["layers"] if lp["kind"] == "block")
    # Parameters: nn.TransformerEncoderLayer(256, 4 heads, ffn 1024): in_proj 3h^2+3h, out_proj h^2+h,
    # linear1 h*4h+4h, linear2 4h*h+h, two LayerNorms 4h.
    h = 256
    assert block["param_count"] == 3 * h * h + 3 * h + h * h + h + 4 * h * h + 4 * h + 4 * h * h + h + 4 * h
    assert sum(s["n_blocks"] for s in plan["strategy"]["stages"]) == 4


@pytest.mark.integration
def test_factory_model_trains(planned, tmp_path):
    result = runner.invoke(app, ["launch", str(planned), "--backend", "torch", "--steps", "3",
                                 "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"]
