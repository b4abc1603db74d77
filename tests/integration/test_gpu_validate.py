"""benchmarks/gpu_validate.sh: the GPU check's pipeline runs on CPU with --dry-run, and refuses to start without a GPU.

The dry run is what CI can check of the script: profile llama-tiny on cpu:1, plan it with and without the profile,
launch each backend for two steps and write the measured vs predicted table. The numbers it writes are CPU
numbers, so only the table's shape and the runs' success are asserted here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_validate.sh"


def _load_module():
    spec = importlib.util.spec_from_file_location("gpu_validate", REPO / "benchmarks" / "gpu_validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env() -> dict[str, str]:
    env = dict(os.environ, PARAPLAN_PYTHON=sys.executable)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))
    return env


def test_catalog_device_names_from_torch_device_names():
    gv = _load_module()
    gib = 2**30
    assert gv.catalog_device("NVIDIA H200", 140 * gib) == "H200-141GB"
    assert gv.catalog_device("NVIDIA H100 80GB HBM3", 79 * gib) == "H100-80GB"
    assert gv.catalog_device("NVIDIA A100-SXM4-80GB", 79 * gib) == "A100-80GB"
    assert gv.catalog_device("NVIDIA A100-SXM4-40GB", 39 * gib) == "A100-40GB"
    with pytest.raises(ValueError, match="--cluster"):
        gv.catalog_device("Some Other GPU", 16 * gib)


def test_without_a_gpu_it_exits_1_before_running_anything(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    out = tmp_path / "report.md"
    proc = subprocess.run(["bash", str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=_env(),
                          timeout=60, check=False)
    assert proc.returncode == 1
    assert "no NVIDIA GPU" in proc.stderr and "--dry-run" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_dry_run_needs_its_own_output_file():
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=_env(),
                          timeout=60, check=False)
    assert proc.returncode == 1
    assert "--out" in proc.stderr


@pytest.mark.integration
def test_dry_run_writes_the_table_for_both_backends(tmp_path):
    out = tmp_path / "gpu_validate.md"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=_env(), timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "DRY RUN on CPU" in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| profile") or ln.startswith("| analytic")]
    # One row per plan and backend; none failed.
    assert {(r.split("|")[1].strip(), r.split("|")[3].strip()) for r in rows} == {
        (plan, backend) for plan in ("profile", "analytic") for backend in ("torch", "deepspeed")}
    assert not any("failed" in r for r in rows)
    # The commands it ran are listed so the table can be reproduced.
    assert "paraplan profile llama-tiny" in text and "paraplan launch" in text
    # No temporary file is left beside the report.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
