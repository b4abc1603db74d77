"""Device catalog and cluster presets.

Every figure cites its datasheet. Peak FLOP/s are dense (no 2:4 sparsity). Link figures are per device and per
direction (NVIDIA quotes NVLink as the bidirectional total; we halve it). Achievable fractions of these peaks are
cost-model assumptions and live in ``paraplan.cost_models``, not here.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from pydantic import ValidationError

from paraplan.errors import ClusterSpecError, format_validation_error
from paraplan.files import MAPPING_SUFFIXES, read_mapping
from paraplan.types import ClusterSpec, DeviceSpec
from paraplan.units import GB, GiB, format_bytes, parse_bytes

T = 1e12

_V100 = "NVIDIA Tesla V100 datasheet (2020), SXM2 column"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet (2021), SXM column"
_H100 = "NVIDIA H100 Tensor Core GPU datasheet (2023), H100 SXM column"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet (2024), H200 SXM column"
_B200 = "NVIDIA HGX B200 datasheet (2024): 8-GPU figures divided by 8, sparse figures halved"
_L4 = "NVIDIA L4 Tensor Core GPU datasheet (2023)"

DEVICES: dict[str, DeviceSpec] = {
    "V100-32GB": DeviceSpec(
        name="V100-32GB", memory_bytes=32 * GiB,
        peak_flops_per_s={"fp16": 125 * T, "bf16": 125 * T, "fp32": 15.7 * T},
        memory_bandwidth_bytes_per_s=900 * GB,
        sources={"all": _V100 + " (125 TFLOPS tensor fp16, 15.7 fp32, 900 GB/s HBM2, NVLink 300 GB/s); "
                 "V100 has no bf16: bf16 is treated as fp16"},
    ),
    "A100-40GB": DeviceSpec(
        name="A100-40GB", memory_bytes=40 * GiB,
        peak_flops_per_s={"bf16": 312 * T, "fp16": 312 * T, "fp32": 19.5 * T},
        memory_bandwidth_bytes_per_s=1555 * GB,
        sources={"all": _A100 + " (312 TFLOPS bf16/fp16 dense, 19.5 fp32, 1,555 GB/s HBM2, NVLink 600 GB/s)"},
    ),
    "A100-80GB": DeviceSpec(
        name="A100-80GB", memory_bytes=80 * GiB,
        peak_flops_per_s={"bf16": 312 * T, "fp16": 312 * T, "fp32": 19.5 * T},
        memory_bandwidth_bytes_per_s=2039 * GB,
        sources={"all": _A100 + " (312 TFLOPS bf16/fp16 dense, 19.5 fp32, 2,039 GB/s HBM2e, NVLink 600 GB/s)"},
    ),
    "H100-80GB": DeviceSpec(
        name="H100-80GB", memory_bytes=80 * GiB,
        peak_flops_per_s={"bf16": 989 * T, "fp16": 989 * T, "fp32": 67 * T},
        memory_bandwidth_bytes_per_s=3350 * GB,
        sources={"all": _H100 + " (1,979 TFLOPS bf16 with sparsity -> 989 dense, 67 fp32, 3.35 TB/s HBM3, "
                 "NVLink 900 GB/s)"},
    ),
    "H200-141GB": DeviceSpec(
        name="H200-141GB", memory_bytes=141 * GB,
        peak_flops_per_s={"bf16": 989 * T, "fp16": 989 * T, "fp32": 67 * T},
        memory_bandwidth_bytes_per_s=4800 * GB,
        sources={"all": _H200 + " (1,979 TFLOPS bf16 with sparsity -> 989 dense, 141 GB HBM3e, 4.8 TB/s, "
                 "NVLink 900 GB/s)"},
    ),
    "B200-180GB": DeviceSpec(
        name="B200-180GB", memory_bytes=180 * GB,
        peak_flops_per_s={"bf16": 2250 * T, "fp16": 2250 * T, "fp32": 75 * T},
        memory_bandwidth_bytes_per_s=8000 * GB,
        sources={"all": _B200 + " (36 PFLOPS bf16 sparse / 8 GPUs / 2 = 2.25 PFLOPS dense, 1.44 TB HBM3e / 8, "
                 "64 TB/s / 8, NVLink 5 1.8 TB/s per GPU, fp32 600 TFLOPS / 8)"},
    ),
    "L4-24GB": DeviceSpec(
        name="L4-24GB", memory_bytes=24 * GB,
        peak_flops_per_s={"bf16": 121 * T, "fp16": 121 * T, "fp32": 30.3 * T},
        memory_bandwidth_bytes_per_s=300 * GB,
        sources={"all": _L4 + " (242 TFLOPS bf16 with sparsity -> 121 dense, 30.3 fp32, 24 GB GDDR6, 300 GB/s, "
                 "PCIe Gen4 x16 64 GB/s, no NVLink)"},
    ),
}

# Interconnect per device and direction: (intra-node, inter-node, PCIe host link), bytes/s, with sources.
_LINKS: dict[str, tuple[float, float, float, str]] = {
    "V100-32GB": (150 * GB, 12.5 * GB, 16 * GB, _V100 + "; DGX-1: 4x100 Gb/s IB per 8 GPUs (~6 GB/s) -> 100 Gb/s"),
    "A100-40GB": (300 * GB, 25 * GB, 32 * GB, _A100 + "; DGX A100: 8x 200 Gb/s HDR IB per node (25 GB/s/GPU)"),
    "A100-80GB": (300 * GB, 25 * GB, 32 * GB, _A100 + "; DGX A100: 8x 200 Gb/s HDR IB per node (25 GB/s/GPU)"),
    "H100-80GB": (450 * GB, 50 * GB, 64 * GB, _H100 + "; DGX H100: 8x 400 Gb/s NDR IB per node (50 GB/s/GPU)"),
    "H200-141GB": (450 * GB, 50 * GB, 64 * GB, _H200 + "; DGX H200: 8x 400 Gb/s NDR IB per node (50 GB/s/GPU)"),
    "B200-180GB": (900 * GB, 50 * GB, 64 * GB, _B200 + "; DGX B200: 8x 400 Gb/s ConnectX-7 per node"),
    "L4-24GB": (32 * GB, 12.5 * GB, 32 * GB, _L4 + "; PCIe Gen4 x16 between GPUs, 100 Gb/s Ethernet across nodes"),
}

_ALIASES = {"H200": "H200-141GB", "B200": "B200-180GB", "L4": "L4-24GB", "V100": "V100-32GB", "H100": "H100-80GB",
            "A100": "A100-80GB", "H100-SXM": "H100-80GB"}


def _device(name: str) -> DeviceSpec:
    key = _ALIASES.get(name, name)
    for known in DEVICES:
        if known.lower() == key.lower():
            return DEVICES[known]
    raise ClusterSpecError(f"unknown device '{name}'; known devices: {', '.join(DEVICES)}")


def host_memory_bytes() -> float:
    """Physical memory of this machine, bytes (``os.sysconf``)."""
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def cpu_cluster(n_procs: int, device_memory_bytes: float | None = None) -> ClusterSpec:
    """``cpu:N``: N processes on this machine talking gloo over loopback.

    Memory per "device" is this machine's memory split evenly between the processes, or ``device_memory_bytes``
    (a budget, ``--device-memory``, so a plan can be forced to offload here). The NVMe tier is the free space of the
    file system of the current directory (``shutil.disk_usage``). The FLOP/s, link and disk figures are nominal
    placeholders (stated, not measured): plan a CPU cluster with ``--profile``, whose measured times replace the
    compute and link ones.
    """
    import shutil

    host = host_memory_bytes()
    dev = DeviceSpec(
        name="cpu", kind="cpu", memory_bytes=device_memory_bytes or host / n_procs,
        peak_flops_per_s={"fp32": 100e9, "bf16": 100e9, "fp16": 100e9},
        memory_bandwidth_bytes_per_s=10 * GB,
        sources={"all": "nominal figures for one CPU process; memory from os.sysconf; use a profile for times"},
    )
    return ClusterSpec(
        name=f"cpu:{n_procs}", nodes=1, devices_per_node=n_procs, device=dev,
        intra_node_bandwidth_bytes_per_s=2 * GB, inter_node_bandwidth_bytes_per_s=2 * GB,
        intra_node_latency_s=50e-6, inter_node_latency_s=50e-6, host_memory_bytes=host,
        pcie_bandwidth_bytes_per_s=10 * GB, nvme_bandwidth_bytes_per_s=1 * GB,
        nvme_capacity_bytes=float(shutil.disk_usage(".").free),
        sources={"links": "nominal gloo-over-loopback figures; `paraplan profile` measures the real ones",
                 "nvme": "free space of the current directory's file system; 1 GB/s nominal disk bandwidth"},
    )


# Host memory, NVMe capacity and NVMe bandwidth per device of the catalog's node (a node's figures divided by its
# 8 GPUs; a cluster of fewer devices per node gets that share per device), with sources.
_DGX_HOST = (256 * GiB, 3.84e12, 25 * GB / 8,
             "DGX H100/A100 datasheets: 2 TB host memory, 8 x 3.84 TB NVMe U.2 data drives per 8 GPUs; ~25 GB/s "
             "aggregate NVMe read in RAID 0 (8 drives at ~3.5 GB/s, assumption: writes as fast)")
_G6_HOST = (96 * GiB, 0.95e12, 0.75 * GB,
            "AWS EC2 G6 (g6.48xlarge: 8 L4, 768 GiB memory, 2 x 3.8 TB NVMe); NVMe ~3 GB/s per drive (assumption)")
_NODE_HOST = {"L4-24GB": _G6_HOST}


def gpu_cluster(nodes: int, per_node: int, device_name: str) -> ClusterSpec:
    """A homogeneous GPU cluster from the catalog: DGX-style nodes (per 8 GPUs: 2 TiB host memory, 8 NVMe drives of
    3.84 TB at ~3.5 GB/s each) for datacenter GPUs, AWS G6 nodes for L4; host memory and NVMe scale with the
    devices per node."""
    dev = _device(device_name)
    intra, inter, pcie, src = _LINKS[dev.name]
    host, nvme, nvme_bw, host_src = _NODE_HOST.get(dev.name, _DGX_HOST)
    return ClusterSpec(
        name=f"{nodes}x{per_node}x{dev.name}" if nodes > 1 else f"{per_node}x{dev.name}",
        nodes=nodes, devices_per_node=per_node, device=dev,
        intra_node_bandwidth_bytes_per_s=intra, inter_node_bandwidth_bytes_per_s=inter,
        host_memory_bytes=host * per_node, pcie_bandwidth_bytes_per_s=pcie,
        nvme_bandwidth_bytes_per_s=nvme_bw * per_node, nvme_capacity_bytes=nvme * per_node,
        sources={"links": src, "host": host_src},
    )


def _catalog_node_defaults(data: dict) -> dict:
    """Link, host-memory and NVMe fields of the catalog's node for a cluster file naming a catalog device, so such
    a file needs only ``nodes``, ``devices_per_node`` and ``device`` (its own fields override these)."""
    return gpu_cluster(1, 1, data["device"]).model_dump(exclude={"name", "nodes", "devices_per_node", "device",
                                                                  "schema_version"})


_PRESET = re.compile(r"^(?:(\d+)x)?(\d+)x([A-Za-z0-9-]+)$")


def load_cluster_spec(cluster: str, device_memory: str | None = None) -> ClusterSpec:
    """Resolve ``cpu:N``, ``8xH100-80GB``, ``4x8xA100-80GB`` (nodes x devices per node x device) or a YAML/JSON file;
    ``device_memory`` (``--device-memory``, e.g. ``1.5GiB``; ``device_memory`` in a cluster file) replaces the memory
    per device, a budget that makes plans offload (on ``cpu:N`` it is the share of this machine's memory each
    process may use). A cluster file with ``device: cpu`` describes processes on this machine, like ``cpu:N``
    with N = ``devices_per_node``.

    Raises:
        ClusterSpecError: unknown device or preset syntax, a file that fails validation (errors listed), or a
            device memory that is not a size.
    """
    spec = _load_cluster_spec(cluster)
    return spec if device_memory is None else _with_budget(spec, device_memory)


def _with_budget(spec: ClusterSpec, device_memory: str) -> ClusterSpec:
    try:
        budget = parse_bytes(device_memory)
    except ValueError as exc:
        raise ClusterSpecError(f"device memory budget: {exc}") from None
    device = spec.device.model_copy(update={"memory_bytes": budget})
    return spec.model_copy(update={"device": device, "name": f"{spec.name} ({format_bytes(budget)} per device)"})


def _load_cluster_spec(cluster: str) -> ClusterSpec:
    if cluster.startswith("cpu:"):
        n = cluster[4:]
        if not n.isdigit() or int(n) < 1:
            raise ClusterSpecError(f"cluster '{cluster}': write cpu:N with N >= 1 processes, e.g. cpu:2")
        return cpu_cluster(int(n))
    match = _PRESET.match(cluster)
    if match:
        nodes = int(match.group(1) or 1)
        per_node = int(match.group(2))
        if nodes < 1 or per_node < 1:
            raise ClusterSpecError(f"cluster '{cluster}': node and device counts must be >= 1")
        return gpu_cluster(nodes, per_node, match.group(3))
    path = Path(cluster)
    if path.suffix.lower() in MAPPING_SUFFIXES:
        data = read_mapping(path, "cluster file", ClusterSpecError)
        budget = data.pop("device_memory", None)  # a budget per device, e.g. "1.5GiB" (as --device-memory)
        if data.get("device") == "cpu":  # processes on one machine, as cpu:N
            data = {**cpu_cluster(int(data.get("devices_per_node", 1))).model_dump(exclude={"name", "schema_version"}),
                    **{k: v for k, v in data.items() if k != "device"}}
        elif isinstance(data.get("device"), str):
            data = {**_catalog_node_defaults(data), **data, "device": _device(data["device"]).model_dump()}
        try:
            spec = ClusterSpec(**{"name": path.stem, **data})
        except ValidationError as exc:
            raise ClusterSpecError(format_validation_error(f"cluster file {cluster}", exc)) from exc
        return spec if budget is None else _with_budget(spec, str(budget))
    raise ClusterSpecError(
        f"unknown cluster '{cluster}'; use cpu:N, DEVICESxTYPE (8xH100-80GB), NODESxDEVICESxTYPE (4x8xA100-80GB) "
        f"or a .yaml/.json file; devices: {', '.join(DEVICES)}"
    )
