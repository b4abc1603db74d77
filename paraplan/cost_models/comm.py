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

import math
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


def _flat(cluster: ClusterSpec, op: Collective, n_bytes: float, n: int, spans_nodes: bool,
          latency: bool = True) -> float:
    if n <= 1 or n_bytes <= 0:
        return 0.0
    bw, lat = link(cluster, spans_nodes)
    return (lat if latency else 0.0) + _factor(op, n) * n_bytes / bw


# NCCL's own cost model (src/graph/tuning.cc, ``baseLat`` and ``hwLat``), microseconds, per protocol (LL, LL128,
# Simple): a collective costs a base latency plus one hop latency per algorithm step, NVLink hops inside a node,
# network hops across nodes. NCCL picks, per call, the algorithm and protocol with the least predicted time.
NCCL_PROTOCOLS = ("LL", "LL128", "Simple")
NCCL_BASE_LATENCY_US = {"ring": (6.6, 14.0, 8.4), "tree": (6.8, 14.0, 8.4)}
NCCL_HOP_LATENCY_US = {("ring", "nvlink"): (0.6, 1.9, 3.4), ("ring", "net"): (2.7, 4.0, 14.0),
                       ("tree", "nvlink"): (0.6, 1.25, 4.0), ("tree", "net"): (5.0, 8.5, 14.0)}
# Share of the link's bandwidth each protocol delivers: LL stores 4 data bytes with a 4-byte flag per 8-byte
# line, LL128 120 data bytes per 128-byte line (NCCL docs and src/device/prims_ll*.h); Simple the full link.
NCCL_PROTOCOL_EFFICIENCY = (0.5, 120 / 128, 1.0)


def nccl_latency_s(op: Collective, n: int, per_node: int, algorithm: str = "ring", protocol: int = 2) -> float:
    """Latency of one NCCL collective over ``n`` ranks, ``per_node`` of them on each node (NCCL's model).

    Formula (ring): ``base + (nsteps - inter_steps) * intra_hop + inter_steps * net_hop`` with ``nsteps = n - 1``
        for all-gather / reduce-scatter, ``2 (n - 1)`` for all-reduce, 1 for a point-to-point send; inter-node
        steps ``N - 1`` (all-reduce ``2 (N - 1)``) over ``N = n / per_node`` nodes; LL's NVLink hop x 1.8 when
        the group spans nodes. Tree (all-reduce only): ``base + 2 ((per_node - 1) intra_hop + log2(N) net_hop)``.
    Source: NVIDIA NCCL src/graph/tuning.cc (``ncclTopoTuneModel``: ``nInterSteps``, the tree's ``log2i(nNodes)``,
        the tables :data:`NCCL_BASE_LATENCY_US`, :data:`NCCL_HOP_LATENCY_US`).
    Assumptions: NVLink within a node, InfiniBand across; ``protocol`` indexes :data:`NCCL_PROTOCOLS`.
    """
    if n <= 1:
        return 0.0
    g = max(1, min(per_node, n))
    nodes = max(1, n // g)
    intra = NCCL_HOP_LATENCY_US[(algorithm, "nvlink")][protocol] * (1.8 if nodes > 1 and protocol == 0 else 1.0)
    net = NCCL_HOP_LATENCY_US[(algorithm, "net")][protocol]
    base = NCCL_BASE_LATENCY_US[algorithm][protocol]
    if algorithm == "tree":
        return 1e-6 * (base + 2 * ((g - 1) * intra + math.log2(nodes) * net))
    if op == "p2p":
        return 1e-6 * (base + (net if nodes > 1 else intra))
    steps, inter = (2 * (n - 1), 2 * (nodes - 1)) if op == "all_reduce" else (n - 1, nodes - 1)
    return 1e-6 * (base + (steps - inter) * intra + inter * net)


def _bandwidth_time_s(cluster: ClusterSpec, op: Collective, n_bytes: float, n: int, spans_nodes: bool,
                      g: int, latency: bool) -> float:
    if not spans_nodes:
        return _flat(cluster, op, n_bytes, n, False, latency)
    nodes = max(1, n // g)
    if g == 1:
        return _flat(cluster, op, n_bytes, n, True, latency)
    if op == "p2p":
        return _flat(cluster, "p2p", n_bytes, 2, True, latency)
    inter = _flat(cluster, op, n_bytes / g, nodes, True, latency)
    if op == "all_reduce":
        return _flat(cluster, "reduce_scatter", n_bytes, g, False, latency) + inter + _flat(
            cluster, "all_gather", n_bytes, g, False, latency)
    return _flat(cluster, op, n_bytes, g, False, latency) + inter


def collective_time_s(
    cluster: ClusterSpec, op: Collective, n_bytes: float, n: int, spans_nodes: bool, per_node: int | None = None,
    nccl_latency: bool = False,
) -> float:
    """Time of one collective over ``n`` ranks on a buffer of ``n_bytes`` (per rank, full size).

    Formula: within a node ``latency + factor(op, n) * n_bytes / bus_bandwidth``; across nodes the hierarchical
        sum of the module docstring with ``g = per_node`` ranks per node (``per_node=None`` or 1: a flat ring over
        the inter-node link), each part paying the cluster's latency once. 0 when n == 1.
        With ``nccl_latency`` (a backend cost profile names it; CUDA clusters only) the latency is NCCL's per
        algorithm step instead (:func:`nccl_latency_s`), and the time is NCCL's choice: the least over the
        protocols of ``latency_p + bandwidth time / efficiency_p``, over the ring and, for an all-reduce that
        spans nodes, the tree (assumption: the tree moves the bytes at the hierarchical ring's bandwidth).
    Source: nccl-tests doc/PERFORMANCE.md (algorithm vs bus bandwidth); NCCL's tree/ring over multiple NICs;
        NCCL src/graph/tuning.cc (per-step latency, per-call algorithm and protocol choice).
    """
    if n <= 1 or n_bytes <= 0:
        return 0.0
    g = max(1, min(per_node or 1, n)) if spans_nodes else n
    if not nccl_latency or cluster.device.kind != "cuda":
        return _bandwidth_time_s(cluster, op, n_bytes, n, spans_nodes, g, True)
    bw_s = _bandwidth_time_s(cluster, op, n_bytes, n, spans_nodes, g, False)
    ranks = 2 if op == "p2p" else n
    per = (1 if spans_nodes else ranks) if op == "p2p" else g
    algorithms = ("ring", "tree") if op == "all_reduce" and spans_nodes else ("ring",)
    return min(nccl_latency_s(op, ranks, per, a, p) + bw_s / NCCL_PROTOCOL_EFFICIENCY[p]
               for a in algorithms for p in range(len(NCCL_PROTOCOLS)))


def dp_spans_nodes(cluster: ClusterSpec, tp: int, dp: int) -> bool:
    return tp * dp > cluster.devices_per_node


def dp_per_node(cluster: ClusterSpec, tp: int, dp: int) -> int:
    """Members of one dp group on each node it touches (tp ranks fill a node first)."""
    return max(1, min(dp, cluster.devices_per_node // max(tp, 1)))


def pp_spans_nodes(cluster: ClusterSpec, tp: int, dp: int) -> bool:
    return cluster.nodes > 1 and tp * dp >= cluster.devices_per_node
