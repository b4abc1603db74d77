"""Activation paging (``train_common.paged_activations``) on one llama-tiny block, in one process.

Paging moves saved tensors out and back unchanged, so outputs and gradients must equal the unwrapped block's bit for
bit (rtol = atol = 0), whatever the tier and however many forwards are in flight.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import retained_bytes

from paraplan.backends.train_common import PAGE_MIN_BYTES, paged_activations
from paraplan.models.build import build_model
from paraplan.models.presets import PRESETS

# llama-tiny block at b=2, s=64, fp32: the hidden state (b, s, h) is 2 x 64 x 384 x 4 = 192 KiB, above the 64 KiB
# threshold; the RMSNorm statistics (b, s, 1) are 512 bytes, below it.
B, S, H = 2, 64, 384


@pytest.fixture(scope="module")
def block() -> torch.nn.Module:
    return build_model(PRESETS["llama-tiny"], seed=0).blocks[0]


def _x(seed: int) -> torch.Tensor:
    return torch.randn(B, S, H, generator=torch.Generator().manual_seed(seed), requires_grad=True)


def _run(module: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    y = module(x)
    (gx,) = torch.autograd.grad(y.square().mean(), x, retain_graph=True)
    y.square().mean().backward()
    grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in module.named_parameters()}
    return y.detach(), gx, grads


def _assert_same(got, want) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert got[2].keys() == want[2].keys()
    for name, grad in want[2].items():
        torch.testing.assert_close(got[2][name], grad, rtol=0, atol=0, msg=name)


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.pt")) if directory.exists() else []


def test_nvme_tier_pages_to_files_and_matches_the_plain_block(block, tmp_path):
    paged = paged_activations(copy.deepcopy(block), "nvme", tmp_path / "act")
    x = _x(1)
    y = paged(x)
    written = _files(tmp_path / "act")
    assert written, "nothing was paged out"
    # Every file holds the bytes of one saved storage of at least the threshold, none of them a weight's.
    weights = {p.detach().view(torch.uint8).flatten().numpy().tobytes() for p in block.parameters()}
    for path in written:
        t = torch.load(path, weights_only=True)
        assert t.dtype == torch.uint8 and t.numel() >= PAGE_MIN_BYTES and t.numpy().tobytes() not in weights
    y.square().mean().backward()
    assert _files(tmp_path / "act") == []  # each file goes once the backward has used it
    _assert_same(_run(paged, _x(1)), _run(copy.deepcopy(block), _x(1)))
    assert _files(tmp_path / "act") == []


def test_state_dict_keeps_the_blocks_names(block, tmp_path):
    paged = paged_activations(copy.deepcopy(block), "nvme", tmp_path)
    assert paged.state_dict().keys() == block.state_dict().keys()
    paged.load_state_dict(block.state_dict())


def test_micro_batches_in_flight_backward_in_any_order(block, tmp_path):
    """A pipeline schedule runs several forwards before their backwards (1F1B: up to pp of them)."""
    paged = paged_activations(copy.deepcopy(block), "nvme", tmp_path)
    plain = copy.deepcopy(block)
    grads = {}
    for name, module in (("plain", plain), ("paged", paged)):
        xs = [_x(seed) for seed in (1, 2, 3)]
        ys = [module(x) for x in xs]
        gxs = [torch.autograd.grad(ys[i].square().mean(), xs[i])[0] for i in (2, 0, 1)]
        grads[name] = (ys, gxs)
    assert _files(tmp_path) == []
    for got, want in zip(grads["paged"][0] + grads["paged"][1], grads["plain"][0] + grads["plain"][1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_graph_dropped_without_backward_leaves_no_file(block, tmp_path):
    paged = paged_activations(copy.deepcopy(block), "nvme", tmp_path)
    y = paged(_x(1))
    assert _files(tmp_path)
    del y
    assert _files(tmp_path) == []


def test_nvme_tier_frees_what_it_pages(block, tmp_path):
    """Kept for backward: everything the block saves without paging; with paging only what is under 64 KiB (norm
    statistics, rotary cos/sin of s x d = 64 x 64 x 4 = 16 KiB each) and what something else still references."""
    kept = {}
    for name, module in (("plain", copy.deepcopy(block)), ("paged", paged_activations(copy.deepcopy(block), "nvme",
                                                                                       tmp_path))):
        x = _x(1)
        kept[name], y = retained_bytes(module, x, exclude=[x])
        del y
    # The plain block keeps several hidden- and MLP-sized tensors (192 KiB to 512 KiB each); paged, none of them.
    assert kept["plain"] > 8 * B * S * H * 4
    assert kept["paged"] < B * S * H * 4, kept


def test_cpu_tier_on_a_cpu_device_keeps_tensors_in_place(block):
    """Host memory is a CPU device's memory: tier cpu copies nothing there (its copy path runs on GPUs, tests/gpu)."""
    paged = paged_activations(copy.deepcopy(block), "cpu", None)
    _assert_same(_run(paged, _x(1)), _run(copy.deepcopy(block), _x(1)))
    assert paged.pager.paged_bytes == 0


def test_unknown_tier_or_missing_directory_is_refused(block):
    with pytest.raises(ValueError, match="use one of cpu, nvme"):
        paged_activations(block, "disk", None)
    with pytest.raises(ValueError, match="needs a directory"):
        paged_activations(block, "nvme", None)
