"""The torch backend's memory tiers on CUDA: activation paging to host memory and FSDP2's CPUOffloadPolicy.

Both need a GPU: on a CPU device tier cpu pages nothing (host memory is device memory) and CPUOffloadPolicy fails
without an accelerator (PLATFORM.md), so CI (CPU) skips this file; the recipe and refusals are unit-tested in
tests/unit/test_torch_native.py, paging to disk in tests/unit/test_paging.py. Not run yet (no GPU was available when
this was written).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_plan

from paraplan.backends.launch import launch_plan
from paraplan.backends.train_common import paged_activations
from paraplan.models.build import build_model
from paraplan.models.presets import PRESETS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

B, S, H = 2, 64, 384  # llama-tiny block input: 2 x 64 x 384 fp32 = 192 KiB, above the 64 KiB paging threshold
STEPS = 3
# Not measured. CPUOffloadPolicy runs AdamW on the CPU in fp32 on the same fp32 gradients, so only the Adam kernels
# (fused/foreach CUDA vs CPU) and the reduce order differ: the CPU strategies agree to 3e-7, 1e-4 leaves a wide margin
# while parameters or optimizer states left stale on the host (no update) move the loss by percents after step 0.
REL = 1e-4


def _forward_backward(module, x):
    module.zero_grad(set_to_none=True)
    before = torch.cuda.memory_allocated()
    y = module(x)
    kept = torch.cuda.memory_allocated() - before  # what the forward leaves allocated for backward (and y)
    (gx,) = torch.autograd.grad(y.square().mean(), x, retain_graph=True)
    y.square().mean().backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in module.named_parameters()}
    return y.detach(), gx, grads, kept


def test_cpu_tier_pages_to_host_and_matches_the_plain_block():
    block = build_model(PRESETS["llama-tiny"], seed=0).blocks[0].cuda()
    paged = paged_activations(copy.deepcopy(block), "cpu", None)
    x = torch.randn(B, S, H, device="cuda", generator=torch.Generator("cuda").manual_seed(1), requires_grad=True)
    want = _forward_backward(copy.deepcopy(block), x)
    got = _forward_backward(paged, x)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=0, atol=0, msg=name)
    assert paged.pager.paged_bytes > 0
    # Paged, the forward keeps on the device only its output and what is under 64 KiB; plain, several hidden- and
    # MLP-sized tensors (192 KiB to 512 KiB each).
    assert got[3] < want[3] / 2, (got[3], want[3])


def _rows(tmp_path_factory, name: str, **kwargs) -> tuple[object, list[dict]]:
    run_dir = tmp_path_factory.mktemp(name)
    _, rows = launch_plan(make_plan(cluster="1xH100-80GB", zero_stage=3, **kwargs), "torch", run_dir, steps=STEPS,
                          quiet=True)
    assert [r["step"] for r in rows] == list(range(STEPS))
    return run_dir, rows


@pytest.mark.integration
def test_cpu_offload_policy_with_paging_trains_like_the_plain_run(tmp_path_factory):
    import json

    _, plain = _rows(tmp_path_factory, "plain")
    run_dir, offloaded = _rows(tmp_path_factory, "offloaded", offload_param="cpu", offload_optimizer="cpu",
                               offload_blocks=2)
    recipe = json.loads((run_dir / "torch_parallel.json").read_text())
    assert recipe["data_parallel"]["wrapper"] == "FSDP2" and recipe["data_parallel"]["cpu_offload"]
    assert (recipe["paged_blocks"], recipe["activation_tier"]) == ([0, 1], "cpu")
    for got, want in zip(offloaded, plain):
        assert got["loss"] == pytest.approx(want["loss"], rel=REL), f"step {got['step']}"
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=REL), f"step {got['step']}"
    assert all(row["paged_bytes"] > 0 for row in offloaded)
    # Parameters, gradients and optimizer states live on the host: the device holds only gathered parameters and
    # activations, less than the plain run's fp32 weights + grads + two Adam moments.
    assert offloaded[-1]["peak_memory_bytes"][0] < plain[-1]["peak_memory_bytes"][0]
