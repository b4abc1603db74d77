"""Replace a CPU cluster's nominal link figures with the ones a profile measured on this machine.

A ``cpu:N`` cluster is N processes on the machine that was profiled, so the gloo all-reduce the profiler timed is
the link the plan will use. Two sizes give both terms of ``time = latency + factor * bytes / bandwidth``
(nccl-tests' bus-bandwidth model, ``paraplan.cost_models.comm``): the large all-reduce fixes the bandwidth, the
small one the latency. GPU clusters keep their datasheet figures: a profile of one GPU says nothing about the
network of a cluster that is not here.
"""

from __future__ import annotations

from paraplan.cost_models.comm import LINK_EFFICIENCY
from paraplan.types import ClusterSpec, ModelProfile


def calibrate_cluster(cluster: ClusterSpec, profile: ModelProfile | None) -> ClusterSpec:
    """``cluster`` with measured gloo bandwidth/latency and host memcpy bandwidth when both are CPU.

    Formula: memory bandwidth = 2 x host memcpy bytes/s; bus bandwidth from the 16 MiB all-reduce (stored by the profiler as nccl-tests busbw); latency =
        ``t_small - 2 (n-1)/n * small_bytes / busbw`` (floored at 0). The stored bandwidth is divided by
        :data:`LINK_EFFICIENCY` because :func:`paraplan.cost_models.comm.link` multiplies it back: a measurement
        is already the achieved figure.

    Returns:
        The same cluster when there is nothing to calibrate.
    """
    if profile is None or cluster.device.kind != "cpu" or profile.device_kind != "cpu":
        return cluster
    links = {lk.name: lk for lk in profile.links}
    update: dict[str, float] = {}
    big, small = links.get("allreduce_gloo_2proc"), links.get("allreduce_gloo_2proc_small")
    if big is not None:
        busbw = big.bandwidth_bytes_per_s
        update["intra_node_bandwidth_bytes_per_s"] = update["inter_node_bandwidth_bytes_per_s"] = busbw / LINK_EFFICIENCY
        if small is not None:
            latency = max(0.0, small.time_s - small.bytes / busbw)  # 2(n-1)/n = 1 for n = 2
            update["intra_node_latency_s"] = update["inter_node_latency_s"] = latency
    sources = dict(cluster.sources)
    if update:
        sources["links"] = "measured by `paraplan profile` on this machine (gloo all-reduce, 2 processes)"
    if "host_memcpy" in links:
        # A copy reads and writes every byte; the memory-bandwidth figure counts both.
        device = cluster.device.model_copy(
            update={"memory_bandwidth_bytes_per_s": 2 * links["host_memcpy"].bandwidth_bytes_per_s})
        return cluster.model_copy(update={**update, "device": device, "sources": sources})
    return cluster.model_copy(update={**update, "sources": sources})
