"""The profiler on CUDA in bf16: the same hand-derived counts as on CPU, and host<->device links.

See tests/unit/test_profiler.py for the FLOP conventions the expected values follow.
"""

from __future__ import annotations

import pytest
import torch

from paraplan.models import load_model_spec
from paraplan.profiler import profile_links, profile_model
from paraplan.types import ModelProfile

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

# llama-tiny: hidden h, MLP size f, query heads a, key/value heads g, head dim d, vocabulary v.
H, F, A, G, D, V = 384, 1024, 6, 2, 64, 256
S = 128
MBS = [1, 2, 4]
BF16 = 2  # bytes
MATMUL_PARAMS = H * H + 2 * H * G * D + H * H + 3 * H * F  # q, k, v, o and the three SwiGLU matrices


@pytest.fixture(scope="module")
def tiny_cuda() -> ModelProfile:
    return profile_model(load_model_spec("llama-tiny"), MBS, S, dtype="bf16", device="cuda", links=True)


def test_profile_runs_on_cuda_in_bf16(tiny_cuda):
    assert tiny_cuda.device_kind == "cuda"
    assert tiny_cuda.dtype == "bf16"
    assert tiny_cuda.device_name == torch.cuda.get_device_name()


def test_block_params_and_flops(tiny_cuda):
    for mb in MBS:
        lp = tiny_cuda.layer("block", mb)
        assert lp.param_count == MATMUL_PARAMS + 2 * H  # plus two RMSNorm weights
        assert lp.param_bytes == lp.param_count * BF16
        matmul_fwd = 2 * MATMUL_PARAMS * mb * S
        attention_fwd = 4 * mb * A * S * S * D  # Q K^T and P V over the full s x s scores
        assert lp.fwd_flops == matmul_fwd + attention_fwd
        # Fused kernels (flash, memory-efficient, cuDNN) recompute Q K^T in backward: 10 b a s^2 d. torch's
        # math fallback keeps the scores instead: 8 b a s^2 d. Which one runs depends on the GPU and the build.
        assert lp.bwd_flops in {2 * matmul_fwd + 10 * mb * A * S * S * D, 2 * matmul_fwd + 8 * mb * A * S * S * D}


def test_head_flops_and_output(tiny_cuda):
    for mb in MBS:
        lp = tiny_cuda.layer("head", mb)
        assert lp.fwd_flops == 2 * mb * S * H * V
        assert lp.bwd_flops == 2 * lp.fwd_flops
        assert lp.output_bytes == mb * S * V * BF16


def test_block_activation_bytes_grow_linearly_with_micro_batch(tiny_cuda):
    act = {mb: tiny_cuda.layer("block", mb).activation_bytes for mb in MBS}
    assert act[4] - act[2] == 2 * (act[2] - act[1])
    assert act[4] == pytest.approx(4 * act[1], rel=0.02)
    assert tiny_cuda.layer("block", 1).output_bytes == S * H * BF16


def test_times_are_positive(tiny_cuda):
    for lp in tiny_cuda.layers:
        assert lp.fwd_time_s > 0 and lp.bwd_time_s > 0


def test_host_device_links():
    links = {lp.name: lp for lp in profile_links("cuda")}
    assert {"h2d_pinned", "d2h_pinned"} <= set(links)
    for name in ("h2d_pinned", "d2h_pinned"):
        assert links[name].bytes == 256 * 2**20
        assert links[name].bandwidth_bytes_per_s > 1e9  # any PCIe 3 x16 or better link moves > 1 GB/s pinned
    if torch.cuda.device_count() >= 2:
        assert links["allreduce_nccl_2gpu"].bandwidth_bytes_per_s > 0
