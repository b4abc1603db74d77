"""Every memory tier a plan can choose, run by the DeepSpeed trainer (torchrun, 2 CPU processes, gloo).

- ZeRO-3 with parameters and optimizer states on NVMe (ZeRO-Infinity), launched through ``paraplan launch
  --nvme-path`` into a temporary directory: DeepSpeed's swap files appear there and the loss falls.
- Optimizer states in host memory (DeepSpeedCPUAdam; ZeRO-3, and ZeRO-1 under the pipeline engine) and
  activations paged to disk (``StagePlan.offload_blocks``): the losses equal those of a plain run.

Tolerance and loss drop as in ``test_deepspeed_launch.py`` (fp32; only the summation order and DeepSpeedCPUAdam's
vectorised update differ from torch's AdamW, ~1e-6 relative per step; a wrong update moves the loss by percents).
Paging writes each saved tensor to a file and reads back the same bytes, so it changes nothing numerically.

DeepSpeed JIT-compiles ``async_io`` (libaio) and ``cpu_adam`` on first use, minutes each on 2 cores; ``.ci/run``
builds them into ``build/torch_extensions``, which these tests use unless ``TORCH_EXTENSIONS_DIR`` says otherwise.
A test whose op is not built yet is skipped with the command that builds it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ds_runs import COMMON, STEPS, check_against_reference, reference, run_losses
from conftest import make_plan, run_cli

pytestmark = pytest.mark.integration

BUILD = ("TORCH_EXTENSIONS_DIR={dir} DS_ACCELERATOR=cpu python -c "
         "'from deepspeed.ops.op_builder import {b}; {b}().load()'")


def _built(op: str) -> bool:
    from torch.utils.cpp_extension import _get_build_directory

    return any(Path(_get_build_directory(op, verbose=False)).glob(f"{op}*.so"))


def _needs(op: str, builder: str):
    return pytest.mark.skipif(
        not _built(op), reason=f"DeepSpeed's {op} op is not built (minutes on 2 cores); build it once with: "
        + BUILD.format(dir=os.environ["TORCH_EXTENSIONS_DIR"], b=builder))


needs_cpu_adam = _needs("cpu_adam", "CPUAdamBuilder")
needs_async_io = _needs("async_io", "AsyncIOBuilder")


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory) -> list[float]:
    return reference(tmp_path_factory.mktemp("ds-reference"))


@needs_cpu_adam
@needs_async_io
def test_zero3_params_and_optimizer_on_nvme_through_paraplan_launch(tmp_path, reference_losses):
    plan = make_plan(**COMMON, cluster="cpu:2", dp=2, zero_stage=3, offload_optimizer="nvme", offload_param="nvme")
    plan_path, run_dir, nvme = tmp_path / "plan.json", tmp_path / "run", tmp_path / "nvme"
    plan_path.write_text(plan.model_dump_json())
    nvme.mkdir()
    result = run_cli("launch", str(plan_path), "--backend", "deepspeed", "--steps", str(STEPS), "--run-dir",
                     str(run_dir), "--nvme-path", str(nvme))
    assert result.exit_code == 0, result.output + (run_dir / "train.log").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    check_against_reference([r["loss"] for r in rows], reference_losses)
    # DeepSpeed swapped through the given directory: a parameter swap folder per rank (its files are removed when
    # the parameters are released) and the optimizer states' swap files, which stay.
    for rank in (0, 1):
        assert (nvme / "zero_stage_3" / "float32params" / f"rank{rank}").is_dir()
        assert list((nvme / "zero_stage_3" / "optimizer" / f"rank{rank}").glob("*.swp"))


@pytest.mark.parametrize(
    "strategy",
    [
        # ZeRO-3, optimizer states in host memory, blocks 1-2 paged to disk (the CPU cluster's activation tier).
        pytest.param(dict(dp=2, zero_stage=3, offload_optimizer="cpu", offload_blocks=2), id="zero3-cpu-adam-paged",
                     marks=needs_cpu_adam),
        # The pipeline engine at ZeRO-1 with DeepSpeedCPUAdam; each stage's first block recomputed, its next paged.
        pytest.param(dict(pp=2, zero_stage=1, offload_optimizer="cpu", recompute_blocks=1, offload_blocks=1),
                     id="pp2-zero1-cpu-adam-paged", marks=needs_cpu_adam),
    ],
)
def test_cpu_optimizer_offload_and_activation_paging_match_the_plain_run(tmp_path, reference_losses, strategy):
    plan = make_plan(**COMMON, cluster="cpu:2", **strategy)
    assert plan.strategy.activation_tier == "nvme"
    losses = run_losses(tmp_path / "run", plan)
    check_against_reference(losses, reference_losses)
    # Each rank paged into its own directory under the run directory (no --nvme-path); files go after backward.
    assert sorted(p.name for p in (tmp_path / "run" / "activations").iterdir()) == ["rank0", "rank1"]
