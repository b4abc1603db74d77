"""Context parallelism (cp=2, ring attention) end to end on 2 CUDA devices against a one-GPU run.

torch's ``context_parallel`` shards only the CUDA SDPA kernels, so this needs GPUs; CI (CPU) skips it and the recipe
and refusals are unit-tested in tests/unit/test_torch_native.py. Every run trains llama-tiny (fp32, seq_len 64,
global batch 8, micro-batch 2) from the same seed on the same samples: each cp rank computes the loss of its half of
every sequence (head-tail load balanced) with the global rotary positions, and gradients are averaged over dp x cp,
so losses and gradient norms must equal the single-GPU run's up to reduction order.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_plan

from paraplan.backends.launch import launch_plan

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.integration,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="context parallelism needs 2 CUDA devices"),
]

STEPS = 3
# Not measured (no multi-GPU machine was available when this was written). The CPU strategies agree to 3e-7
# relative; ring attention adds a log-sum-exp merge of the per-chunk attention outputs and fp32 SDPA runs the
# memory-efficient kernel on both sides, so 1e-3 leaves a wide margin while a wrong position shard (rotary angles of
# the local instead of the global positions) or an unaveraged cp gradient moves loss or gradient norm by percents.
REL = 1e-3
COMMON = dict(model="llama-tiny", seq_len=64, global_batch=8, micro_batch_size=2, dtype="fp32")


def _rows(tmp_path_factory, name: str, **kwargs) -> list[dict]:
    _, rows = launch_plan(make_plan(**COMMON, **kwargs), "torch", tmp_path_factory.mktemp(name), steps=STEPS,
                          quiet=True)
    assert [r["step"] for r in rows] == list(range(STEPS))
    return rows


@pytest.fixture(scope="module")
def one_gpu(tmp_path_factory) -> list[dict]:
    return _rows(tmp_path_factory, "one-gpu", cluster="1xH100-80GB")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("cp2", dict(cp=2)),
        # The attention policy checkpoints the SDPA call, which context_parallel has replaced by ring attention.
        ("cp2_selective_attention", dict(cp=2, selective_recompute=True)),
    ],
)
def test_context_parallel_matches_one_gpu(tmp_path_factory, one_gpu, name, kwargs):
    rows = _rows(tmp_path_factory, name, cluster="2xH100-80GB", **kwargs)
    for got, want in zip(rows, one_gpu):
        assert got["loss"] == pytest.approx(want["loss"], rel=REL), f"step {got['step']}"
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=REL), f"step {got['step']}"
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]
