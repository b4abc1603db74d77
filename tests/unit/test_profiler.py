"""Profiler checks against hand-derived parameter, FLOP and byte counts.

Conventions the expected values follow (torch.utils.flop_counter): a matmul of (m, k) by (k, n) is 2 m k n FLOPs;
element-wise ops, norms, softmax and embedding lookups count 0; attention counts Q K^T and P V over the full s x s
score matrix (the causal mask is ignored), i.e. 4 b a s^2 d forward and 10 b a s^2 d backward (the backward
recomputes Q K^T and runs four more matmuls: dP, dV, dQ, dK).
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn
from torch.utils import flop_counter

from paraplan.errors import ParaplanError, ProfileError
from paraplan.models import LayerChain, load_model_spec
from paraplan.profiler import layers as layers_mod
from paraplan.profiler import links as links_mod
from paraplan.profiler import profile_model
from paraplan.profiler.layers import sdpa_backward_flops, sdpa_forward_flops
from paraplan.profiler.links import allreduce_bus_bandwidth, profile_allreduce, profile_links
from paraplan.types import LinkProfile, ModelProfile, ModelSpec

# llama-tiny: hidden h, MLP size f, query heads a, key/value heads g, head dim d, vocabulary v.
H, F, A, G, D, V = 384, 1024, 6, 2, 64, 256
S = 64  # seq_len of the shared profile
MBS = [1, 2, 4]
FP32 = 4  # bytes


@pytest.fixture(scope="module")
def tiny() -> ModelProfile:
    return profile_model(load_model_spec("llama-tiny"), MBS, S, warmup=0, repeats=1, links=False)


def test_block_param_count_is_attention_plus_swiglu_plus_two_norms(tiny):
    # q and o are h x h; k and v map h to g*d (GQA); gate, up, down are h x f; two RMSNorm weights of size h.
    expected = H * H + 2 * H * G * D + H * H + 3 * H * F + 2 * H
    assert expected == 1_573_632
    for mb in MBS:
        lp = tiny.layer("block", mb)
        assert lp.param_count == expected
        assert lp.param_bytes == expected * FP32


def _block_matmul_params() -> int:
    # every weight except the two norm vectors is a matmul weight touched once per token
    return H * H + 2 * H * G * D + H * H + 3 * H * F


def test_block_fwd_flops_are_2_x_matmul_params_x_tokens_plus_attention(tiny):
    for mb in MBS:
        tokens = mb * S
        attention = 4 * mb * A * S * S * D  # Q K^T and P V, 2 b a s^2 d each; query heads a, not g
        assert tiny.layer("block", mb).fwd_flops == 2 * _block_matmul_params() * tokens + attention


def test_block_bwd_flops_are_twice_the_matmuls_plus_two_and_a_half_times_attention(tiny):
    # Each linear needs grad-input and grad-weight (2x its forward; the block's input requires grad, so the first
    # projections compute grad-input too). Attention backward is 5 matmuls of 2 b a s^2 d = 2.5x its forward.
    for mb in MBS:
        tokens = mb * S
        matmul_fwd = 2 * _block_matmul_params() * tokens
        attention_fwd = 4 * mb * A * S * S * D
        lp = tiny.layer("block", mb)
        assert lp.bwd_flops == 2 * matmul_fwd + 10 * mb * A * S * S * D
        assert lp.bwd_flops == pytest.approx(2 * lp.fwd_flops + attention_fwd / 2)


def test_cpu_attention_formulas_agree_with_torch_cuda_formulas():
    q, kv = (2, A, S, D), (2, G, S, D)
    assert sdpa_forward_flops(q, kv, kv) == flop_counter.sdpa_flop_count(q, kv, kv) == 4 * 2 * A * S * S * D
    assert sdpa_backward_flops(q, q, kv, kv) == flop_counter.sdpa_backward_flop_count(q, q, kv, kv)


def test_block_activation_bytes_grow_linearly_with_micro_batch(tiny):
    act = {mb: tiny.layer("block", mb).activation_bytes for mb in MBS}
    # Every saved tensor is proportional to b except RoPE's cos and sin, (1, s, d) each and shared by the batch:
    # act(b) = b * per_sequence + 2 s d * 4 bytes exactly.
    per_sequence = act[2] - act[1]
    assert act[4] - act[2] == 2 * per_sequence
    assert act[1] - per_sequence == 2 * S * D * FP32
    assert act[4] == pytest.approx(4 * act[1], rel=0.02)
    # Lower bound: the SwiGLU MLP alone saves gate, silu(gate), up and their product, f values per token each.
    assert per_sequence > 4 * S * F * FP32


def test_block_output_is_one_hidden_state_per_token(tiny):
    for mb in MBS:
        assert tiny.layer("block", mb).output_bytes == mb * S * H * FP32


def test_head_counts(tiny):
    for mb in MBS:
        tokens = mb * S
        lp = tiny.layer("head", mb)
        assert lp.param_count == H + H * V  # final RMSNorm weight + untied LM head
        assert lp.fwd_flops == 2 * tokens * H * V
        assert lp.bwd_flops == 2 * 2 * tokens * H * V  # grad-input and grad-weight of the LM head
        assert lp.output_bytes == tokens * V * FP32  # the logits
        # Saved by one forward, in fp32 values per token: RMSNorm's rsqrt(mean(x^2)) (1) and normalised x (h) for
        # the weight's gradient; the norm output (h) for the LM head's weight gradient; log_softmax's output (v).
        # Plus nll_loss's total_weight, a 4-byte scalar. Not counted: the input x and the targets.
        assert lp.activation_bytes == tokens * (1 + 2 * H + V) * FP32 + 4


def test_embed_counts(tiny):
    for mb in MBS:
        lp = tiny.layer("embed", mb)
        assert lp.param_count == V * H
        assert lp.fwd_flops == lp.bwd_flops == 0  # a lookup and a scatter-add, no matmul
        assert lp.activation_bytes == 0  # the backward needs only the token ids, which the caller holds
        assert lp.output_bytes == mb * S * H * FP32


def test_times_are_positive(tiny):
    assert len(tiny.layers) == 3 * len(MBS)
    for lp in tiny.layers:
        assert lp.fwd_time_s > 0 and lp.bwd_time_s > 0


def test_profile_metadata(tiny):
    assert (tiny.device_kind, tiny.dtype, tiny.seq_len, tiny.warmup, tiny.repeats) == ("cpu", "fp32", S, 0, 1)
    assert tiny.cpu_threads == torch.get_num_threads()  # nothing in these tests changes the thread count
    assert tiny.micro_batch_sizes() == MBS
    assert tiny.links == []


def test_profile_round_trips_through_json(tiny):
    assert ModelProfile.model_validate_json(tiny.model_dump_json()) == tiny


def test_bf16_halves_parameter_and_output_bytes():
    spec = load_model_spec("llama-tiny")
    prof = profile_model(spec, [1], 16, dtype="bf16", warmup=0, repeats=1, links=False)
    assert prof.dtype == "bf16"
    for lp in prof.layers:
        assert lp.param_bytes == 2 * lp.param_count
    assert prof.layer("block", 1).output_bytes == 16 * H * 2
    assert prof.layer("head", 1).output_bytes == 16 * V * 2


def test_progress_reports_each_layer_and_micro_batch():
    calls = []
    profile_model(load_model_spec("llama-tiny"), [2, 1], 8, warmup=0, repeats=1, links=False,
                  progress=lambda desc, done, total: calls.append((desc, done, total)))
    assert [(done, total) for _, done, total in calls] == [(i, 6) for i in range(1, 7)]
    assert calls[0][0].startswith("embed") and calls[-1][0].startswith("head")


def test_profiling_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    profile_model(load_model_spec("llama-tiny"), [1], 8, warmup=0, repeats=1, links=False)
    assert torch.equal(torch.rand(3), expected)


# A custom chain small enough to count every saved byte by hand.
TOY_VOCAB, TOY_H = 16, 8


def _toy_chain() -> LayerChain:
    block = lambda: nn.Sequential(nn.Linear(TOY_H, 4 * TOY_H), nn.Tanh(), nn.Linear(4 * TOY_H, TOY_H))  # noqa: E731
    return LayerChain(nn.Embedding(TOY_VOCAB, TOY_H), [block(), block()], nn.Linear(TOY_H, TOY_VOCAB, bias=False))


@pytest.fixture
def toy_spec(monkeypatch) -> ModelSpec:
    module = types.ModuleType("paraplan_toy_factory")
    module.build = _toy_chain
    monkeypatch.setitem(sys.modules, "paraplan_toy_factory", module)
    return ModelSpec(name="toy", family="custom", factory="paraplan_toy_factory:build", max_seq_len=32)


def test_custom_chain_counts_each_saved_storage_once(toy_spec):
    b, s = 3, 5
    tokens = b * s
    prof = profile_model(toy_spec, [b], s, warmup=1, repeats=2, links=False)
    block = prof.layer("block", b)
    assert block.param_count == (TOY_H * 4 * TOY_H + 4 * TOY_H) + (4 * TOY_H * TOY_H + TOY_H)
    # tanh saves its output (d tanh = 1 - tanh^2), which the second linear saves again as its input: one storage.
    # The first linear saves its input (the caller's x) and both save weights: not counted.
    assert block.activation_bytes == tokens * 4 * TOY_H * FP32
    assert block.fwd_flops == 2 * tokens * (TOY_H * 4 * TOY_H) * 2  # two matmuls of h x 4h; bias adds count 0
    assert block.bwd_flops == 2 * block.fwd_flops
    # The vocabulary comes from the factory's nn.Embedding (the spec has none): logits are (b, s, 16).
    assert prof.layer("head", b).output_bytes == tokens * TOY_VOCAB * FP32
    assert prof.layer("embed", b).param_count == TOY_VOCAB * TOY_H


def test_custom_chain_without_blocks_is_refused(monkeypatch):
    module = types.ModuleType("paraplan_toy_no_blocks")
    module.build = lambda: LayerChain(nn.Embedding(TOY_VOCAB, TOY_H), [], nn.Linear(TOY_H, TOY_VOCAB))
    monkeypatch.setitem(sys.modules, "paraplan_toy_no_blocks", module)
    spec = ModelSpec(name="empty", family="custom", factory="paraplan_toy_no_blocks:build")
    with pytest.raises(ProfileError, match="without blocks"):
        profile_model(spec, [1], 4, links=False)


def test_links_are_added_when_asked(monkeypatch):
    fake = [LinkProfile(name="host_memcpy", bytes=8, time_s=2.0, bandwidth_bytes_per_s=4.0)]
    monkeypatch.setattr(layers_mod, "profile_links", lambda device: fake)
    prof = profile_model(load_model_spec("llama-tiny"), [1], 8, warmup=0, repeats=1, links=True)
    assert prof.links == fake


def test_allreduce_bus_bandwidth_follows_nccl_tests():
    # nccl-tests PERFORMANCE.md: busbw = algbw * 2(n-1)/n; 2 ranks: busbw = algbw; 8 ranks: 1.75 algbw.
    assert allreduce_bus_bandwidth(100.0, 2.0, 2) == 50.0
    assert allreduce_bus_bandwidth(100.0, 2.0, 8) == 50.0 * 1.75


@pytest.mark.parametrize(
    ("backend", "n_ranks", "message"), [("gloo", 1, "at least 2 ranks"), ("mpi", 2, "use 'gloo' or 'nccl'")]
)
def test_bad_allreduce_requests_raise_profile_error(backend, n_ranks, message):
    with pytest.raises(ProfileError, match=message):
        profile_allreduce(backend, n_ranks)


def test_a_failing_allreduce_child_is_reported_not_waited_on(monkeypatch):
    monkeypatch.setattr(links_mod, "_CHILD", "import sys; sys.exit('rank 1 could not start')")
    with pytest.raises(ProfileError, match="rank 1 could not start"):
        profile_allreduce("gloo", 2)


@pytest.mark.integration  # starts a second process that imports torch: seconds, not milliseconds
def test_cpu_links_measure_memcpy_and_a_two_process_allreduce():
    links = {lp.name: lp for lp in profile_links("cpu")}
    assert set(links) == {"host_memcpy", "allreduce_gloo_2proc", "allreduce_gloo_2proc_small"}
    assert links["allreduce_gloo_2proc_small"].bytes < links["allreduce_gloo_2proc"].bytes
    for lp in links.values():
        assert lp.time_s > 0
        assert lp.bandwidth_bytes_per_s == pytest.approx(lp.bytes / lp.time_s)  # 2 ranks: busbw = algbw


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"micro_batch_sizes": []}, "no micro-batch sizes"),
        ({"micro_batch_sizes": [0, 2]}, "positive integers"),
        ({"micro_batch_sizes": [1.5]}, "positive integers"),
        ({"micro_batch_sizes": [True]}, "positive integers"),
        ({"seq_len": 0}, "seq_len must be a positive"),
        ({"seq_len": 2049}, "max_seq_len 2048"),
        ({"dtype": "fp64"}, "use one of bf16, fp16, fp32"),
        ({"warmup": -1}, "warmup"),
        ({"repeats": 0}, "repeats"),
        ({"device": "mps"}, "'cuda' or 'cpu'"),
        ({"device": "not-a-device"}, "not a torch device"),
    ],
)
def test_bad_inputs_raise_profile_error(kwargs, message):
    args = {"spec": load_model_spec("llama-tiny"), "micro_batch_sizes": [1], "seq_len": 8, "links": False}
    args.update(kwargs)
    with pytest.raises(ProfileError, match=message):
        profile_model(**args)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_says_to_use_cpu():
    with pytest.raises(ProfileError, match="use device 'cpu'"):
        profile_model(load_model_spec("llama-tiny"), [1], 8, device="cuda", links=False)


def test_profile_error_is_a_paraplan_error():
    assert issubclass(ProfileError, ParaplanError)
