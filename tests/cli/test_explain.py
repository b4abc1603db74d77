"""``plan --explain`` and ``paraplan explain``: bottleneck, binding memory, and what alternatives change and cost."""

from __future__ import annotations

import json

import pytest

from conftest import assert_user_error, run_cli as run
from paraplan.catalog import load_cluster_spec
from paraplan.cli.explain import (
    compare_strategy, explain_plans, plan_knobs, price_plan, price_strategy, resolve_compare,
)
from paraplan.cost_models.estimate import StrategySpec, estimate_strategy
from paraplan.models.presets import load_model_spec
from paraplan.planner.search import search_plans
from paraplan.types import TrainSpec
from paraplan.units import GiB

LLAMA3_8B_PARAMS = 8_030_261_248  # Meta's Llama 3 8B (Hugging Face model card / safetensors index: 8.03B)
# llama-small (h 768, ffn 2048, 12 heads of 64, 4 kv heads, vocab 256, 16 blocks, untied head): per block q, o
# 2 x 768^2 + k, v 2 x 768 x 256 + SwiGLU 3 x 768 x 2048 + 2 norms x 768 = 6,292,992; x 16 + embedding and head
# 2 x 256 x 768 + final norm 768.
LLAMA_SMALL_PARAMS = 16 * 6_292_992 + 2 * 256 * 768 + 768
BASE = ["--cluster", "8xH100-80GB", "--global-batch", "64", "--seq-len", "4096"]


@pytest.fixture(scope="module")
def plans8b():
    """The search's 3 best plans for Llama 3 8B on one 8 x H100 node (0.5 s)."""
    return search_plans(load_model_spec("llama3-8b"), load_cluster_spec("8xH100-80GB"),
                        TrainSpec(global_batch=64, seq_len=4096), top_k=3)


@pytest.fixture(scope="module")
def plan_file(plans8b, tmp_path_factory):
    path = tmp_path_factory.mktemp("explain") / "plan.json"
    path.write_text(plans8b[0].model_dump_json())
    return path


def test_components_add_up_to_the_plans_step_time(plans8b):
    for plan in plans8b:
        priced = price_plan(plan)
        assert priced.exact, priced.notes  # re-priced stage by stage, the same numbers as the plan file
        assert sum(priced.components_s.values()) == pytest.approx(plan.predicted.step_time_s, rel=1e-9)
        assert priced.components_s["bubble"] == pytest.approx(plan.predicted.bubble_s, abs=1e-12)
        assert priced.device.used_bytes == pytest.approx(plan.predicted.peak_memory_bytes)


def test_exposed_dp_communication_is_the_bottleneck_on_a_slow_network():
    # Two nodes of one GPU joined by 100 MB/s: a 101M-parameter model's bf16 gradient all-reduce sends
    # 2 (n-1)/n x 2 bytes x P = 2P bytes per rank (n = 2), at least 2.0 s, against milliseconds of compute.
    clus = load_cluster_spec("2x1xH100-80GB").model_copy(update={"inter_node_bandwidth_bytes_per_s": 1e8})
    spec, train = load_model_spec("llama-small"), TrainSpec(global_batch=2, seq_len=128)
    priced = price_strategy(spec, clus, train, StrategySpec(dp=2, tp=1, pp=1, micro_batch_size=1))
    comp, secs = priced.bottleneck()
    assert comp == "dp_comm"
    floor = 2 * LLAMA_SMALL_PARAMS / 1e8  # the link at full speed, nothing hidden behind the backward
    assert secs >= floor - priced.components_s["compute"]
    assert secs / priced.step_time_s > 0.9


def test_a_short_pipeline_is_bubble_bound():
    # pp = 8 with m = 4 micro-batches: 1F1B idles (p - 1) of (m + p - 1) slots on equal stages, 7/11 of the
    # pipeline; the embedding and head make the stages unequal, which only adds idle time.
    spec, clus = load_model_spec("llama3-8b"), load_cluster_spec("8xH100-80GB")
    priced = price_strategy(spec, clus, TrainSpec(global_batch=4, seq_len=4096),
                            StrategySpec(dp=1, tp=1, pp=8, micro_batch_size=1))
    comp, secs = priced.bottleneck()
    assert comp == "bubble"
    pipeline = sum(v for k, v in priced.components_s.items() if k not in ("dp_comm", "optimizer", "offload"))
    assert secs / pipeline >= 7 / 11 - 1e-9


def test_compared_delta_is_the_difference_of_two_estimates(plans8b):
    # The third plan recomputes and pages nothing, so estimate_strategy prices it exactly as the plan file does.
    plan = plans8b[2]
    assert sum(st.offload_blocks + st.recompute_blocks + st.selective_blocks for st in plan.strategy.stages) == 0
    backend = price_plan(plan).backend  # the backend cost profile the search priced it under
    extra = {"backend": backend} if backend is not None else {}
    same = estimate_strategy(plan.model, plan.cluster, plan.train, StrategySpec(**plan_knobs(plan), **extra))
    assert same.step_time_s == pytest.approx(plan.predicted.step_time_s, rel=1e-9)
    text = "tp=2,zero=1,recompute=selective"
    st = resolve_compare(plan, text, backend)
    assert (st.dp, st.tp, st.pp, st.micro_batch_size) == (4, 2, 1, plan.strategy.micro_batch_size)  # dp refills
    other = estimate_strategy(plan.model, plan.cluster, plan.train, st)
    ex = explain_plans([plan], [text]).to_json()
    alt = ex["alternatives"][0]
    assert alt["step_time_delta_s"] == pytest.approx(other.step_time_s - same.step_time_s, rel=1e-9)
    assert sum(alt["breakdown_delta_s"].values()) == pytest.approx(alt["step_time_delta_s"], rel=1e-9)
    assert alt["peak_memory_delta_bytes"] == pytest.approx(other.peak_memory_bytes - same.peak_memory_bytes)
    assert alt["changes"]["dp"] == {"plan": "8", "this": "4"} and alt["changes"]["tp"] == {"plan": "1", "this": "2"}
    assert alt["breakdown_delta_s"]["tp_comm"] > 0 and alt["breakdown_delta_s"]["recompute"] > 0


def test_dp_only_strategy_that_does_not_fit_names_the_device_and_the_overflow():
    # Plain data parallelism without ZeRO keeps every state on every GPU: 16 bytes per parameter with mixed
    # precision Adam (2 bf16 weights + 2 bf16 grads + 12 fp32 master/momentum/variance, ZeRO paper sec. 3.1),
    # 16 x 8.03e9 = 119.7 GiB, + 2 GiB runtime overhead; with seq 128, mb 1 and full recomputation the
    # activations stay under 1 GiB. 80 GiB per H100: over by 41.7 to 42.7 GiB.
    spec, clus = load_model_spec("llama3-8b"), load_cluster_spec("8xH100-80GB")
    plan = search_plans(spec, clus, TrainSpec(global_batch=8, seq_len=128), top_k=1)[0]
    # The generic cost model (backend None: 16 bytes per parameter); backend cost profiles count more.
    priced = compare_strategy(plan, "dp=8,tp=1,pp=1,zero=0,mb=1,recompute=full", backend=None)
    assert not priced.fits
    (over,) = priced.overflows
    floor = 16 * LLAMA3_8B_PARAMS + 2 * GiB - 80 * GiB
    assert over.tier == "device" and over.stage == 0
    assert floor <= -over.headroom_bytes <= floor + 1 * GiB
    result = run("explain", _write(plan, "dp-only.json"), "--alternatives", "0", "--compare",
                 "dp=8,tp=1,pp=1,zero=0,mb=1,recompute=full")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    # The command prices it under the plan's own backend cost profile.
    as_cli = compare_strategy(plan, "dp=8,tp=1,pp=1,zero=0,mb=1,recompute=full", backend=price_plan(plan).backend)
    assert -as_cli.device.headroom_bytes >= -over.headroom_bytes - 1  # no profile keeps fewer states than 16 B
    assert f"device memory overflows by {-as_cli.device.headroom_bytes / GiB:.2f} GiB on stage 0" in text


def _write(plan, name: str) -> str:
    import tempfile
    from pathlib import Path

    path = Path(tempfile.mkdtemp()) / name
    path.write_text(plan.model_dump_json())
    return str(path)


def test_explain_command_words_table_and_clean_json(plan_file):
    result = run("explain", str(plan_file), "--alternatives", "2", "--compare", "zero=1")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for frag in ("Bottleneck: compute", "Binding constraint: device memory on stage 0", "headroom", "#2", "#3",
                 "compare 1", "ZeRO 3 -> 1", "step time by component"):
        assert frag in text, frag
    result = run("explain", str(plan_file), "--alternatives", "1", "--compare", "zero=1", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["plan"]["bottleneck"]["component"] == "compute"
    assert out["plan"]["binding"]["tier"] == "device"
    assert [a["label"] for a in out["alternatives"]] == ["#2", "compare 1"]
    assert out["alternatives"][1]["compare"] == "zero=1"


def test_plan_explain_json_keeps_the_summary_and_adds_the_explanation(tmp_path):
    out_path = tmp_path / "plan.json"
    result = run("plan", "llama3-8b", *BASE, "--top", "2", "--explain", "--compare", "pp=2", "--json",
                 "-o", str(out_path))
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["strategy"]["dp"] == 8 and "predicted" in out
    labels = [a["label"] for a in out["explain"]["alternatives"]]
    assert labels == ["#2", "compare 1"]
    assert out["explain"]["alternatives"][1]["settings"]["pp"] == "2"


@pytest.mark.parametrize("text, fragment", [
    ("dp=x", "--compare 'dp=x'"),
    ("foo=1", "--compare 'foo=1'"),
    ("dp=8,dp=4", "gives dp twice"),
    ("tp=3", "tp x pp x cp = 3 does not divide the 8 devices"),
    ("dp=3", "must equal the 8 devices"),
    ("zero=1,mb=3", "--compare 'zero=1,mb=3'"),
])
def test_bad_compare_strings_are_user_errors(plan_file, text, fragment):
    result = run("explain", str(plan_file), "--alternatives", "0", "--compare", text)
    assert_user_error(result, fragment)


def test_plan_with_bad_compare_writes_no_plan(tmp_path):
    out_path = tmp_path / "plan.json"
    result = run("plan", "llama3-8b", *BASE, "--compare", "tp=5", "-o", str(out_path))
    assert_user_error(result, "--compare 'tp=5'")
    assert not out_path.exists()
