"""How fast a device runs the three kinds of work in a transformer layer: GEMMs, attention kernels, element-wise ops.

Used when no measured profile is given: compute time = work / (peak x efficiency), where the efficiency depends on
the shapes through one documented curve per device (the issue's "matmul-efficiency curve"):

GEMM (``M x K`` times ``K x N``, M = tokens of the micro-batch, K and N the layer's (tp-sharded) dimensions):
    ``t = max(flops / (peak x ceiling x waves), bytes / (memory_bandwidth x MEMORY_BW_EFFICIENCY))``
    - ``ceiling``: the largest fraction of the dense peak a bf16 matmul sustains on the device (the maximum
      achievable matmul FLOPS, MAMF, or on power-limited Hopper its sustained counterpart MSMF; see
      :data:`DEVICE_EFFICIENCY` for the measurement cited per device);
    - ``waves``: wave quantization, ``tiles / (ceil(tiles / n_sm) n_sm)`` with ``tiles = ceil(M/128) ceil(N/128)``
      output tiles of 128 x 128 spread over the device's streaming multiprocessors;
    - the second term is the roofline's memory side: ``bytes = dtype (M K + K N + M N)``.
    Source: NVIDIA "Matrix Multiplication Background User's Guide" (arithmetic intensity, tile and wave
    quantization); Anthony et al. 2024, "The Case for Co-Designing Model Architectures with Hardware"
    (arXiv 2401.14489), sec. 4 (GEMM throughput falls for small or badly divisible h / t, b s).
    Large GEMMs reach the ceiling; a small hidden size, a high tp degree or few tokens per micro-batch lower it.

Attention core (softmax(Q K^T) V):
    - fused "flash" kernels: ``t = actual_flops / (peak x attention_fraction)``; a causal kernel skips the masked
      half, so actual forward FLOPs are ``2 b s^2 h`` (half the ``4 b s^2 h`` that MFU conventions count), and the
      backward does 2.5x the forward's matmul work (it recomputes Q K^T: five matmuls against two).
      Source: Dao 2023 (FlashAttention-2, arXiv 2307.08691) sec. 4 FLOP conventions; utilization figures below.
    - "unfused" (Megatron-LM 2021): the two batched matmuls at GEMM efficiency with ``M = N = s, K = h/a``, plus the
      memory traffic of the ``b a s^2`` score matrix (see ``transformer.attention_score_bytes``).

Element-wise ops (norms, residual adds, activation functions, rotary, dropout, cross-entropy): memory bound,
``bytes / (memory_bandwidth x MEMORY_BW_EFFICIENCY)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Literal

from paraplan.types import DeviceSpec

AttentionKernel = Literal["flash3", "flash2", "flash1", "unfused"]
ATTENTION_KERNELS: tuple[str, ...] = ("flash3", "flash2", "flash1", "unfused")
# "flash3": Hopper-native fused attention (FlashAttention-3; cuDNN's fused attention, which TransformerEngine and so
# Megatron-Core use on Hopper, is of the same class). Shah et al. 2024 report 1.5-2.0x FlashAttention-2's speed on
# H100; the middle, 1.75x, is taken for forward and backward alike. The pytorch/benchmark FA3 run (PR #2391: 590-621
# TFLOP/s at head dim 128, s 4k-16k, 60-63% of the H100 peak) agrees with 1.75 x 35% = 61%. On other devices
# FlashAttention-3 does not run: their flash2 figure stands in.
FA3_OVER_FA2_H100 = 1.75

# Achieved fraction of the datasheet memory bandwidth for streaming element-wise kernels. Assumption (stated, not
# measured here): STREAM-like copies reach 80-90% of HBM bandwidth on A100/H100; fused framework kernels less.
MEMORY_BW_EFFICIENCY = 0.8
TILE = 128  # output tile edge (cuBLAS's common 128 x 128 / 128 x 256 tiles; the smaller is used)

_MAMF = ("stas00/ml-engineering, compute/accelerator/README.md, 'Maximum Achievable Matmul FLOPS comparison "
         "table' (bf16 matmul, best shape)")
_FA2 = ("Dao 2023, FlashAttention-2 (arXiv 2307.08691), abstract: FlashAttention reaches 25-40% of the A100 "
        "peak, FlashAttention-2 50-73%")
_FA3 = ("Shah et al. 2024, FlashAttention-3 (arXiv 2407.08608), abstract: FlashAttention-2 reaches 35% of the "
        "H100 peak")


@dataclass(frozen=True)
class DeviceEfficiency:
    """The per-device constants of the curves above, each with its source.

    Attributes:
        matmul_ceiling: measured bf16 GEMM throughput a training run can sustain / dense peak.
        n_sm: streaming multiprocessors (wave quantization); 0 disables it (CPU).
        attention_fraction: actual attention FLOP/s / dense peak, forward and backward, per kernel family.
    """

    matmul_ceiling: float
    n_sm: int
    attention_fraction: dict[str, float]
    sources: dict[str, str] = field(default_factory=dict)


_AMPERE = DeviceEfficiency(
    matmul_ceiling=267.9 / 312, n_sm=108,
    # FlashAttention-2's 50-73% is the forward; its backward is slower: the lower end is used for fwd + bwd.
    # FlashAttention(-1, and its Triton port): the middle of 25-40%.
    attention_fraction={"flash3": 0.50, "flash2": 0.50, "flash1": 0.325},
    sources={"matmul_ceiling": _MAMF + ": A100 SXM 267.9 of 312 TFLOP/s (85.9%)",
             "n_sm": "NVIDIA A100 Tensor Core GPU Architecture whitepaper: 108 SMs",
             "attention_fraction": _FA2},
)
# Hopper GEMMs hit the 700 W limit: training runs at the power-saturated ("sustainable") rate of all 8 GPUs of a
# node busy, not the boost burst. (That a synchronous job runs at the pace of its slowest GPU is modelled for every
# device by straggler_factor below, from the same benchmark's spread of GPUs within a node.)
_MSMF = ("stas00/ml-engineering, compute/accelerator/benchmarks/README.md: H200 bf16 MSMF 698.6 TFLOP/s with all 8 "
         "GPUs busy (702.9 alone; burst MAMF 828); H100 SXM and H200 share the GH100 die and the 700 W limit")
_HOPPER = DeviceEfficiency(
    matmul_ceiling=698.6 / 989, n_sm=132,
    # FlashAttention-2 (no Hopper-specific instructions) reaches 35% of the H100 peak (FA3 paper); the FA1-class
    # Triton kernel is scaled from the A100 figures by the same Hopper penalty, 0.325 x 0.35 / 0.50 = 0.23.
    attention_fraction={"flash3": 0.35 * FA3_OVER_FA2_H100, "flash2": 0.35, "flash1": 0.325 * 0.35 / 0.50},
    sources={"matmul_ceiling": _MSMF + " (the burst MAMF is 792.1, " + _MAMF + ")",
             "n_sm": "NVIDIA H100 Tensor Core GPU Architecture whitepaper: 132 SMs (SXM5)",
             "attention_fraction": _FA3 + "; flash1 scaled from " + _FA2},
)
# Blackwell: the power-saturated rate with all 8 GPUs busy (n = 40 runs); no published attention-kernel fraction, so
# FlashAttention-2's Hopper figure stands in (an assumption); SM count not used (no wave quantization).
_BLACKWELL = DeviceEfficiency(
    matmul_ceiling=1426.4 / 2250, n_sm=0, attention_fraction={"flash3": 0.35, "flash2": 0.35, "flash1": 0.23},
    sources={"matmul_ceiling": "stas00/ml-engineering, compute/accelerator/benchmarks/README.md: B200 bf16 MSMF "
                               "1426.4 TFLOP/s, all 8 GPUs x 5 rounds (MAMF 1751)",
             "attention_fraction": "assumption: " + _FA3 + " (Hopper figure)"},
)
# Devices without a published matmul or attention measurement: the planner's former constant (0.6 of peak for
# GEMMs) and FlashAttention-2's Hopper figure; stated assumptions, not measurements.
_GENERIC_GPU = DeviceEfficiency(
    matmul_ceiling=0.6, n_sm=0, attention_fraction={"flash3": 0.35, "flash2": 0.35, "flash1": 0.23},
    sources={"all": "assumption: no published MAMF / attention measurement in the sources used here"},
)
_CPU = DeviceEfficiency(
    matmul_ceiling=0.6, n_sm=0, attention_fraction={"flash3": 0.3, "flash2": 0.3, "flash1": 0.3},
    sources={"all": "nominal; CPU plans should use a measured profile (paraplan profile)"},
)

DEVICE_EFFICIENCY: dict[str, DeviceEfficiency] = {
    "A100-40GB": _AMPERE,
    "A100-80GB": _AMPERE,
    "H100-80GB": _HOPPER,
    "H200-141GB": _HOPPER,
    "B200-180GB": _BLACKWELL,
}


def device_efficiency(device: DeviceSpec) -> DeviceEfficiency:
    """Constants of ``device`` (by catalog name); CPU and unknown devices get the stated generic assumptions."""
    if device.kind == "cpu":
        return _CPU
    return DEVICE_EFFICIENCY.get(device.name, _GENERIC_GPU)


# GPU-to-GPU spread of sustained matmul throughput: within one 8-GPU node the slowest GPU ran at 727 TFLOP/s against a
# median of 752 (stas00/ml-engineering, compute/accelerator/benchmarks/README.md, H200 MSMF across a node's GPUs).
# Read as a normal spread, the slowest of 8 sits z(8) = 1.43 standard deviations below the median, so the standard
# deviation is (1 - 727/752) / z(8) = 2.3% of the median. Assumption: the same relative spread for every GPU model
# (no per-device measurement is published for the others).
_SLOWEST_OF_NODE, _NODE_MEDIAN, _NODE_GPUS = 727.0, 752.0, 8


def expected_slowest_z(n: int) -> float:
    """Standard deviations below the median of the expected slowest of ``n`` draws from a normal distribution.

    Formula: Blom's approximation of the expected extreme order statistic, ``Phi^-1((n - 0.375) / (n + 0.25))``
    (Blom 1958, "Statistical Estimates and Transformed Beta-Variables"); 0 for ``n <= 1``.
    """
    if n <= 1:
        return 0.0
    return NormalDist().inv_cdf((n - 0.375) / (n + 0.25))


GPU_SPEED_SPREAD = (1.0 - _SLOWEST_OF_NODE / _NODE_MEDIAN) / expected_slowest_z(_NODE_GPUS)


def straggler_factor(n_devices: int) -> float:
    """Pace of a synchronous job on ``n_devices`` GPUs relative to a median GPU: its expected slowest GPU.

    Every step ends in collectives over all ranks (data-parallel gradient reduction), so every rank waits for the
    slowest: ``1 - z(n) x GPU_SPEED_SPREAD`` with z from :func:`expected_slowest_z` (1.0 on one GPU; 0.967 on 8,
    0.940 on 128, 0.930 on 512, 0.914 on 6144).
    Source: the spread measured in a node (see GPU_SPEED_SPREAD); order statistics of the normal distribution.
    """
    return 1.0 - expected_slowest_z(n_devices) * GPU_SPEED_SPREAD


def wave_efficiency(m: int, n: int, n_sm: int) -> float:
    """Fraction of the last wave's tiles that do work: ``tiles / (ceil(tiles / n_sm) n_sm)`` (1.0 without SMs).

    Source: NVIDIA Matrix Multiplication Background User's Guide, "Wave Quantization".
    """
    if n_sm <= 0:
        return 1.0
    tiles = math.ceil(m / TILE) * math.ceil(n / TILE)
    return tiles / (math.ceil(tiles / n_sm) * n_sm)


def gemm_time_s(device: DeviceSpec, dtype: str, m: int, k: int, n: int, dtype_bytes: int) -> float:
    """Time of one ``(m x k) @ (k x n)`` GEMM: the roofline maximum of compute and memory time (see module doc).

    Args:
        m, k, n: GEMM dimensions (elements); dtype_bytes: bytes per element of the operands and result.
    """
    eff = device_efficiency(device)
    flops = 2.0 * m * k * n
    compute = flops / (device.peak_flops_per_s[dtype] * eff.matmul_ceiling * wave_efficiency(m, n, eff.n_sm))
    memory = dtype_bytes * (m * k + k * n + m * n) / (device.memory_bandwidth_bytes_per_s * MEMORY_BW_EFFICIENCY)
    return max(compute, memory)


def memory_time_s(device: DeviceSpec, n_bytes: float) -> float:
    """Time to stream ``n_bytes`` through device memory (element-wise, memory-bound kernels)."""
    return n_bytes / (device.memory_bandwidth_bytes_per_s * MEMORY_BW_EFFICIENCY)


def flash_attention_time_s(device: DeviceSpec, dtype: str, actual_flops: float, kernel: str) -> float:
    """Time of fused-attention work of ``actual_flops`` (FLOPs the kernel really performs, masked half skipped)."""
    eff = device_efficiency(device)
    return actual_flops / (device.peak_flops_per_s[dtype] * eff.attention_fraction[kernel])
