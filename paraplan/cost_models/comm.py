"""Collective communication time: latency + bytes / bus bandwidth with nccl-tests' ring factors, hierarchical
across nodes.

Source: NVIDIA nccl-tests ``doc/PERFORMANCE.md``: for n ranks, all-reduce moves ``2(n-1)/n`` of the buffer over
each rank's link; reduce-scatter, all-gather and all-to-all ``(n-1)/n``. Bandwidths are the cluster's per-device,
per-direction link figures times :data:`LINK_EFFICIENCY`.

Groups that span nodes (hierarchical, as NCCL does on rail-optimized DGX-style nodes with one NIC per GPU): a group
of ``n = g N`` ranks, ``g`` on each of ``N`` nodes, runs the collective within each node over NVLink and across
nodes over the ``g`` NICs its ranks own, each NIC carrying ``1/g`` of the data:
    all-reduce  = reduce-scatter(g, S) + all-reduce(N, S/g) + all-gather(g, S)
    all-gather / reduce-scatter = intra-node part(g, S) + inter-node part(N, S/g)
so a group with all 8 GPUs of each node moves its inter-node share at 8 NICs' bandwidth, and a group with one GPU
per node (tp = 8) at one NIC's.

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


def _flat(cluster: ClusterSpec, op: Collective, n_bytes: float, n: int, spans_nodes: bool) -> float:
    if n <= 1 or n_bytes <= 0:
        return 0.0
    bw, lat = link(cluster, spans_nodes)
    return lat + _factor(op, n) * n_bytes / bw


def collective_time_s(
    cluster: ClusterSpec, op: Collective, n_bytes: float, n: int, spans_nodes: bool, per_node: int | None = None,
) -> float:
    """Time of one collective over ``n`` ranks on a buffer of ``n_bytes`` (per rank, full size).

    Formula: within a node ``latency + factor(op, n) * n_bytes / bus_bandwidth``; across nodes the hierarchical
        sum of the module docstring with ``g = per_node`` ranks per node (``per_node=None`` or 1: a flat ring over
        the inter-node link). 0 when n == 1.
    Source: nccl-tests doc/PERFORMANCE.md (algorithm vs bus bandwidth); NCCL's tree/ring over multiple NICs.
    """
    if n <= 1 or n_bytes <= 0:
        return 0.0
    if not spans_nodes:
        return _flat(cluster, op, n_bytes, n, False)
    g = max(1, min(per_node or 1, n))
    nodes = max(1, n // g)
    if g == 1:
        return _flat(cluster, op, n_bytes, n, True)
    if op == "p2p":
        return _flat(cluster, "p2p", n_bytes, 2, True)
    inter = _flat(cluster, op, n_bytes / g, nodes, True)
    if op == "all_reduce":
        return _flat(cluster, "reduce_scatter", n_bytes, g, False) + inter + _flat(
            cluster, "all_gather", n_bytes, g, False)
    return _flat(cluster, op, n_bytes, g, False) + inter


def dp_spans_nodes(cluster: ClusterSpec, tp: int, dp: int) -> bool:
    return tp * dp > cluster.devices_per_node


def dp_per_node(cluster: ClusterSpec, tp: int, dp: int) -> int:
    """Members of one dp group on each node it touches (tp ranks fill a node first)."""
    return max(1, min(dp, cluster.devices_per_node // max(tp, 1)))


def pp_spans_nodes(cluster: ClusterSpec, tp: int, dp: int) -> bool:
    return cluster.nodes > 1 and tp * dp >= cluster.devices_per_node
