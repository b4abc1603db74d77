"""Collective communication time: latency + bytes / bus bandwidth with nccl-tests' ring factors.

Source: NVIDIA nccl-tests ``doc/PERFORMANCE.md``: for n ranks, all-reduce moves ``2(n-1)/n`` of the buffer over
each rank's link; reduce-scatter, all-gather and all-to-all ``(n-1)/n``. Bandwidths are the cluster's per-device,
per-direction link figures times :data:`LINK_EFFICIENCY`.

Placement (Megatron-LM's default rank order): tp varies fastest, then dp, then pp. A tp group stays within a node
(the planner only makes tp <= devices per node); a dp group spans nodes when ``tp * dp > devices_per_node``;
pipeline neighbours are on different nodes when ``tp * dp >= devices_per_node``.
"""

from __future__ import annotations

from typing import Literal

from paraplan.types import ClusterSpec

# Achieved bus bandwidth / datasheet link bandwidth for large messages. Assumption: nccl-tests all-reduce on
# DGX A100/H100 reaches about 80% of the per-direction NVLink figure and of the InfiniBand line rate.
LINK_EFFICIENCY = 0.8

Collective = Literal["all_reduce", "all_gather", "reduce_scatter", "p2p"]


def _factor(op: Collective, n: int) -> float:
    if op == "all_reduce":
        return 2.0 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter"):
        return (n - 1) / n
    return 1.0


def link(cluster: ClusterSpec, spans_nodes: bool) -> tuple[float, float]:
    """(bandwidth bytes/s, latency s) of the link a group uses."""
    if spans_nodes:
        return cluster.inter_node_bandwidth_bytes_per_s * LINK_EFFICIENCY, cluster.inter_node_latency_s
    return cluster.intra_node_bandwidth_bytes_per_s * LINK_EFFICIENCY, cluster.intra_node_latency_s


def collective_time_s(cluster: ClusterSpec, op: Collective, n_bytes: float, n: int, spans_nodes: bool) -> float:
    """Time of one collective over ``n`` ranks on a buffer of ``n_bytes`` (per rank, full size).

    Formula: ``latency + factor(op, n) * n_bytes / bus_bandwidth``; 0 when n == 1.
    Source: nccl-tests doc/PERFORMANCE.md (algorithm vs bus bandwidth).
    """
    if n <= 1 or n_bytes <= 0:
        return 0.0
    bw, lat = link(cluster, spans_nodes)
    return lat + _factor(op, n) * n_bytes / bw


def dp_spans_nodes(cluster: ClusterSpec, tp: int, dp: int) -> bool:
    return tp * dp > cluster.devices_per_node


def pp_spans_nodes(cluster: ClusterSpec, tp: int, dp: int) -> bool:
    return cluster.nodes > 1 and tp * dp >= cluster.devices_per_node
