"""Fuzz the CLI (issue 7, item 4): any mix of good and bad model, cluster, profile and plan files and option values
ends in exit code 0 or 1, never a traceback, and a failed command leaves no file behind.

Hypothesis draws each option from a pool of valid values and the kinds of bad input users produce (wrong types,
out-of-range numbers, missing, binary, directory, truncated or hand-edited files). ``launch`` always runs with
``--dry-run`` (nothing trains); ``profile`` uses tiny shapes so each example takes a fraction of a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import make_plan, run_cli

FUZZ = settings(max_examples=int(os.environ.get("PARAPLAN_FUZZ_EXAMPLES", "40")), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Input files of every kind, good and bad, made once."""
    d = tmp_path_factory.mktemp("inputs")
    files: dict[str, Path] = {}

    def put(name: str, content: str | bytes) -> None:
        path = d / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
        files[name] = path

    put("model_ok.yaml", "family: llama\nn_layers: 2\nhidden: 64\nffn_hidden: 128\nn_heads: 4\nn_kv_heads: 2\n"
                         "vocab: 256\nmax_seq_len: 256\n")
    put("model_bool.yaml", "family: llama\nn_layers: true\nhidden: 64\nffn_hidden: 128\nn_heads: 4\nn_kv_heads: 2\n"
                           "vocab: 256\n")
    put("model_missing.json", json.dumps({"family": "llama", "n_layers": 2}))
    put("model_list.yaml", "- 1\n- 2\n")
    put("hf_llama.json", json.dumps({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                     "vocab_size": 256, "max_position_embeddings": 256, "hidden_act": "silu"}))
    put("hf_moe.json", json.dumps({"model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128,
                                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                                   "vocab_size": 256, "num_local_experts": 8, "num_experts_per_tok": 2}))
    put("binary.json", bytes(range(256)) * 8)
    put("truncated.json", '{"schema_version": 1, "model": {')
    put("cluster_ok.yaml", "nodes: 1\ndevices_per_node: 2\ndevice: H100-80GB\n")
    put("cluster_bad.yaml", "nodes: 0\ndevices_per_node: two\ndevice: Z100\n")
    put("cluster_str.yaml", "just a string\n")
    plan = make_plan(dp=2)
    put("plan_ok.json", plan.model_dump_json())
    raw = json.loads(plan.model_dump_json())
    put("plan_v99.json", json.dumps({**raw, "schema_version": 99}))
    put("plan_accum.json", json.dumps({**raw, "strategy": {**raw["strategy"], "grad_accum": 3}}))
    put("plan_extra.json", json.dumps({**raw, "surprise": 1}))
    prof = run_cli("profile", "llama-tiny", "--seq-len", "16", "--micro-batches", "1,2", "--warmup", "0",
                   "--repeats", "1", "--no-links", "-o", str(d / "profile_ok.json"))
    assert prof.exit_code == 0, prof.output
    files["profile_ok.json"] = d / "profile_ok.json"
    raw = json.loads(files["profile_ok.json"].read_text())
    put("profile_v0.json", json.dumps({**raw, "schema_version": 0}))
    put("profile_neg.json", json.dumps({**raw, "seq_len": -5}))
    try:  # a private null device: a regression that replaces devices must not damage the machine's own
        os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except PermissionError:
        os.mkfifo(d / "null")
    files["null"] = d / "null"
    (d / "folder").mkdir()
    files["folder"] = d / "folder"
    files["missing"] = d / "does-not-exist.json"
    return files


def _paths(inputs: dict[str, Path], *names: str):
    return st.sampled_from([str(inputs[n]) for n in names])


NUM = st.sampled_from(["1", "2", "4", "8", "0", "-1", "3", "1.5", "abc", "", "99999999999999999999"])
FLOAT = st.sampled_from(["1e-3", "0", "-1", "0.5", "nan", "inf", "x", "10"])


@contextlib.contextmanager
def _in_empty_dir():
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as d:
        os.chdir(d)
        try:
            yield Path(d)
        finally:
            os.chdir(cwd)


def _check(args: list[str]) -> None:
    with _in_empty_dir() as d:
        result = run_cli(*args)
        assert result.exit_code in (0, 1), (args, result.exit_code, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
        assert "Traceback" not in result.output, (args, result.output)
        left = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
        if result.exit_code != 0:
            assert left == [], (args, left, result.output)
        else:
            assert not [p for p in left if p.endswith(".tmp")], (args, left)


def _opt(name: str, values):
    """Either leave the option out or give it one drawn value."""
    return st.one_of(st.just([]), values.map(lambda v: [name, v]))


@FUZZ
@given(data=st.data())
def test_plan_fuzz(inputs, data):
    model = data.draw(st.one_of(st.sampled_from(["llama-tiny", "gpt3-175b", "nope", "a:b", ""]),
                                _paths(inputs, "model_ok.yaml", "model_bool.yaml", "model_missing.json",
                                       "model_list.yaml", "hf_llama.json", "hf_moe.json", "binary.json", "folder",
                                       "missing")))
    cluster = data.draw(st.one_of(st.sampled_from(["cpu:2", "cpu:0", "cpu:x", "2xH100-80GB", "3xFOO", "0x8xA100-80GB"]),
                                  _paths(inputs, "cluster_ok.yaml", "cluster_bad.yaml", "cluster_str.yaml",
                                         "binary.json", "folder", "missing")))
    args = ["plan", model, "--cluster", cluster]
    args += data.draw(_opt("--global-batch", NUM)) + data.draw(_opt("--seq-len", st.sampled_from(["16", "64", "0",
                                                                                                   "100000", "z"])))
    args += data.draw(_opt("--profile", _paths(inputs, "profile_ok.json", "profile_v0.json", "profile_neg.json",
                                               "binary.json", "truncated.json", "folder", "missing")))
    args += data.draw(_opt("--dtype", st.sampled_from(["auto", "fp32", "bf16", "int8"])))
    args += data.draw(_opt("--strategy", st.sampled_from(["dp=2", "tp=2", "pp=2,mb=1", "zero=3", "offload=true",
                                                          "recompute=full", "dp=2,dp=1", "zero=9", "dp=", "=", ",",
                                                          "mb=0", "offload=maybe", "cp=2", "cp=3", "vpp=2",
                                                          "pp=2,schedule=zbv", "schedule=zbv,vpp=3", "recompute=op",
                                                          "schedule=gpipe", "vpp=0", "pp=1,vpp=2"])))
    args += data.draw(_opt("--backend", st.sampled_from(["any", "deepspeed", "torch", "unconstrained", "jax"])))
    args += data.draw(_opt("--top", NUM)) + data.draw(_opt("--lr", FLOAT)) + data.draw(_opt("--time-limit", FLOAT))
    args += data.draw(_opt("--memory-fraction", st.sampled_from(["0.95", "0", "1.5", "0.5", "x"])))
    args += data.draw(st.sampled_from([[], ["--json"]]))
    args += data.draw(_opt("-o", st.sampled_from(["plan.json", "sub/dir/plan.json", str(inputs["null"]),
                                                  "/proc/x.json", ".", "/"])))
    _check(args)


@FUZZ
@given(data=st.data())
def test_estimate_fuzz(inputs, data):
    model = data.draw(st.one_of(st.sampled_from(["llama-tiny", "llama3-8b", "nope"]),
                                _paths(inputs, "model_ok.yaml", "hf_moe.json", "binary.json", "folder")))
    cluster = data.draw(st.sampled_from(["cpu:2", "8xH100-80GB", "cpu:-1", str(inputs["cluster_bad.yaml"])]))
    args = ["estimate", model, "--cluster", cluster]
    for name in ("--global-batch", "--seq-len", "--tp", "--pp", "--dp", "--micro-batch"):
        args += data.draw(_opt(name, NUM))
    args += data.draw(_opt("--vpp", NUM)) + data.draw(_opt("--zero", st.sampled_from(["0", "1", "3", "4", "-1"])))
    args += data.draw(_opt("--cp", NUM))
    args += data.draw(_opt("--schedule", st.sampled_from(["1f1b", "gpipe", "zb", "zero_bubble", "zbv",
                                                          "interleaved_1f1b"])))
    args += data.draw(_opt("--recompute", st.sampled_from(["none", "selective", "op", "full", "half"])))
    args += data.draw(_opt("--strategy", st.sampled_from(["dp=1,tp=1,pp=1,mb=1", "cp=2", "vpp=2,pp=2", "x=1"])))
    args += data.draw(_opt("--stage-blocks", st.sampled_from(["1,1", "0,3,3,0", "a", "6"])))
    args += data.draw(_opt("--attention", st.sampled_from(["flash2", "flash1", "unfused", "magic"])))
    args += data.draw(_opt("--dtype", st.sampled_from(["auto", "fp16", "fp8"])))
    args += data.draw(_opt("--profile", _paths(inputs, "profile_ok.json", "binary.json", "folder")))
    args += data.draw(st.lists(st.sampled_from(["--sequence-parallel", "--offload-optimizer", "--tp-comm-overlap",
                                                "--no-dp-overlap", "--json"]), max_size=3, unique=True))
    _check(args)


@FUZZ
@given(data=st.data())
def test_launch_dry_run_fuzz(inputs, data):
    plan = data.draw(_paths(inputs, "plan_ok.json", "plan_v99.json", "plan_accum.json", "plan_extra.json",
                            "binary.json", "truncated.json", "profile_ok.json", "folder", "missing"))
    args = ["launch", plan, "--dry-run"]
    args += data.draw(_opt("--backend", st.sampled_from(["torch", "deepspeed", "jax"])))
    args += data.draw(_opt("--steps", NUM))
    args += data.draw(_opt("--data", st.sampled_from([str(inputs["model_ok.yaml"]), str(inputs["folder"]),
                                                      str(inputs["missing"])])))
    args += data.draw(_opt("--run-dir", st.sampled_from(["run", "a/b/run", str(inputs["null"]), "/proc/run"])))
    _check(args)


@settings(FUZZ, max_examples=max(5, FUZZ.max_examples // 4))
@given(data=st.data())
def test_profile_fuzz(inputs, data):
    model = data.draw(st.one_of(st.sampled_from(["llama-tiny", "nope", "llama3-405b"]),
                                _paths(inputs, "model_ok.yaml", "hf_llama.json", "hf_moe.json", "binary.json",
                                       "folder")))
    args = ["profile", model, "--no-links", "--warmup", "0", "--repeats", "1"]
    args += data.draw(_opt("--micro-batches", st.sampled_from(["1", "1,2", "0", "a,b", "", "-1"])))
    args += data.draw(_opt("--seq-len", st.sampled_from(["8", "16", "0", "-3", "99999"])))
    args += data.draw(_opt("--dtype", st.sampled_from(["fp32", "bf16", "fp8"])))
    args += data.draw(_opt("--threads", st.sampled_from(["1", "0", "-2"])))
    args += data.draw(st.sampled_from([[], ["--json"]]))
    args += data.draw(_opt("-o", st.sampled_from(["p.json", ".", str(inputs["null"])])))
    if "--seq-len" not in args:
        args += ["--seq-len", "8"]
    _check(args)
