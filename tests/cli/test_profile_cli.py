"""`paraplan profile` and what `plan`/`estimate` do with its file: the thread count it records, and a profile of
another model, sequence length or dtype refused with exit 1 and what to re-run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_user_error, run_cli as run

SEQ = 32


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory) -> Path:
    """llama-tiny profiled at seq-len 32 in fp32 with one thread (the CLI sets torch's threads; restored after)."""
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    threads = torch.get_num_threads()
    try:
        result = run("profile", "llama-tiny", "--micro-batches", "1", "--seq-len", str(SEQ), "--no-links",
                     "--warmup", "0", "--repeats", "1", "--threads", "1", "-o", str(path))
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return path


def test_cpu_profile_records_the_threads_it_ran_with(tiny_profile):
    prof = json.loads(tiny_profile.read_text())
    assert prof["device_kind"] == "cpu" and prof["cpu_threads"] == 1


def test_profile_rejects_an_unknown_dtype(tmp_path):
    result = run("profile", "llama-tiny", "--micro-batches", "1", "--seq-len", "8", "--no-links", "--dtype", "fp64",
                 "-o", str(tmp_path / "p.json"))
    assert_user_error(result, "fp64", "fp32")
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("model,extra,fragment", [
    ("llama-tiny", ["--no-links"], "drop --no-links"),
    ("moe-tiny", [], "dense llama"),
])
def test_overheads_it_cannot_time_are_refused_before_profiling(tmp_path, model, extra, fragment):
    """`--overheads` on a model or a profile it cannot time: exit 1 and what to change, no file written."""
    result = run("profile", model, "--micro-batches", "1", "--seq-len", "8", "--overheads", *extra,
                 "-o", str(tmp_path / "p.json"))
    assert_user_error(result, fragment, "--overheads")
    assert not (tmp_path / "p.json").exists()


PLAN = ["--cluster", "cpu:2", "--global-batch", "8", "--strategy", "dp=2"]
ESTIMATE = ["--cluster", "cpu:2", "--global-batch", "8", "--tp", "1", "--pp", "1", "--dp", "2", "--micro-batch", "1"]


@pytest.mark.parametrize("command,extra", [("plan", PLAN), ("estimate", ESTIMATE)])
@pytest.mark.parametrize("model,seq_len,dtype,fragments", [
    ("llama-tiny", SEQ, "fp32", []),
    ("llama-small", SEQ, "fp32", ["is of model llama-tiny, not llama-small"]),
    ("llama-tiny", 2 * SEQ, "fp32", [f"taken at seq-len {SEQ}", f"--seq-len {SEQ}"]),
    ("llama-tiny", SEQ, "bf16", ["taken in fp32", "--dtype fp32"]),
])
def test_profile_must_match_model_seq_len_and_dtype(tiny_profile, tmp_path, command, extra, model, seq_len, dtype,
                                                    fragments):
    out = ["-o", str(tmp_path / "plan.json")] if command == "plan" else []
    result = run(command, model, *extra, "--seq-len", str(seq_len), "--dtype", dtype, "--profile", str(tiny_profile),
                 *out)
    if not fragments:
        assert result.exit_code == 0, result.output
        return
    assert_user_error(result, *fragments)
