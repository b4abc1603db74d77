"""`paraplan launch --dry-run`: the run directory's files and the printed command, for each backend."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from paraplan.cli.app import app

runner = CliRunner()


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    result = runner.invoke(app, ["plan", "llama-tiny", "--cluster", "cpu:2", "--global-batch", "8", "--seq-len", "64",
                                 "--strategy", "dp=2", "-o", str(path)])
    assert result.exit_code == 0, result.output
    return path


@pytest.mark.parametrize("backend,config", [("deepspeed", "ds_config.json"), ("torch", "torch_parallel.json")])
def test_dry_run_writes_files_and_prints_torchrun(tmp_path, plan_file, backend, config):
    run_dir = tmp_path / backend
    result = runner.invoke(app, ["launch", str(plan_file), "--backend", backend, "--dry-run", "--steps", "3",
                                 "--run-dir", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert "torch.distributed.run" in result.output and "--nproc-per-node=2" in result.output
    assert f"paraplan.backends.train_{backend}" in result.output
    for name in ("plan.json", "launch.json", config):
        assert (run_dir / name).is_file(), name
    launch = json.loads((run_dir / "launch.json").read_text())
    assert launch["steps"] == 3 and launch["nproc_per_node"] == 2
    assert launch["data_paths"], "default data: the standard library's sources"
    assert not (run_dir / "metrics.jsonl").exists()


def test_unknown_backend(tmp_path, plan_file):
    result = runner.invoke(app, ["launch", str(plan_file), "--backend", "megatron", "--run-dir", str(tmp_path)])
    assert result.exit_code == 1 and "use deepspeed or torch" in result.output


def test_missing_data_path(tmp_path, plan_file):
    result = runner.invoke(app, ["launch", str(plan_file), "--dry-run", "--data", str(tmp_path / "nope"),
                                 "--run-dir", str(tmp_path / "r")])
    assert result.exit_code == 1 and "no such file or directory" in result.output
