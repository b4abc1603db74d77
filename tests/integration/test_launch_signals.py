"""SIGTERM (what SLURM's scancel sends) or SIGINT to the `paraplan launch` process alone stops the whole job.

The launcher runs as the real console command in a subprocess; the signal goes to its PID only, as a scheduler or
`kill PID` sends it (not to a process group, which would reach torchrun and the ranks without the launcher's help).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import make_plan

pytestmark = pytest.mark.integration

STEPS = 10_000  # far more than run before the signal: the job is mid-run when it comes
START_TIMEOUT_S = 50.0  # first step after about 20 s on 2 idle cores; more under load
# The launcher waits up to launch.SHUTDOWN_GRACE_S (15 s) before it kills what is left; allow that and some.
STOP_TIMEOUT_S = 25.0


def _processes_naming(text: str) -> list[str]:
    """Command lines of live processes that contain ``text`` (read from /proc; zombies have none)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmdline = entry.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{entry.parent.name}: {cmdline}")
    return found


def _metric_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.parametrize(("sig", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["TERM", "INT"])
def test_signal_to_launcher_stops_the_whole_job(tmp_path, sig, exit_code):
    plan_path, run_dir = tmp_path / "plan.json", tmp_path / "run"
    plan_path.write_text(make_plan(dp=2).model_dump_json())
    out, err = (tmp_path / "stdout").open("w"), (tmp_path / "stderr").open("w")
    # A session of its own, so the test can clean up the launcher's group if it misbehaves (signals still go to
    # the launcher's PID alone).
    launcher = subprocess.Popen(
        [sys.executable, "-m", "paraplan", "launch", str(plan_path), "--backend", "torch", "--steps", str(STEPS),
         "--run-dir", str(run_dir)],
        stdout=out, stderr=err, start_new_session=True,
    )
    metrics = run_dir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _metric_lines(metrics):
            assert launcher.poll() is None, (tmp_path / "stderr").read_text()
            assert time.monotonic() < deadline, "no training step within the start timeout"
            time.sleep(0.2)
        os.kill(launcher.pid, sig)
        code = launcher.wait(timeout=STOP_TIMEOUT_S)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
        out.close()
        err.close()
    stderr = (tmp_path / "stderr").read_text()
    assert code == exit_code, stderr
    assert "Traceback" not in stderr and sig.name in stderr, stderr
    assert _processes_naming(str(run_dir)) == []
    lines = _metric_lines(metrics)
    assert lines and all(isinstance(json.loads(line)["step"], int) for line in lines)
    assert (run_dir / "train.log").read_text().strip()
