"""Measure data links: host<->device copies, host memory copies, and an all-reduce between two local processes.

Every figure is a median over a few timed repeats after untimed warm-up runs. Bandwidths are bytes moved per second
of wall time (one direction for copies; bus bandwidth for the all-reduce, see :func:`allreduce_bus_bandwidth`).
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import IO

import torch
import torch.distributed as dist

from paraplan.errors import ProfileError
from paraplan.types import LinkProfile
from paraplan.units import MiB

COPY_BYTES = 256 * MiB  # pinned host<->device buffer; large enough to reach PCIe/NVLink-C2C peak
HOST_COPY_BYTES = 128 * MiB  # host memcpy; much larger than any CPU cache
ALLREDUCE_BYTES = 16 * MiB  # per-rank payload of the 2-process all-reduce
SMALL_ALLREDUCE_BYTES = 64 * 1024
_WARMUP = 2
_REPEATS = 5
_TIMEOUT_S = 120.0


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to profile on: ``device`` if given, else ``cuda`` when available, else ``cpu``.

    Args:
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``, a ``torch.device``, or None for automatic.

    Raises:
        ProfileError: a device string torch does not understand, a device type other than cuda/cpu, or cuda
            requested on a machine without CUDA.
    """
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ProfileError(f"device '{device}' is not a torch device; use 'cuda', 'cuda:N' or 'cpu'") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ProfileError(f"device '{device}' asked for, but CUDA is not available here; use device 'cpu'")
        index = torch.cuda.current_device() if dev.index is None else dev.index
        if index >= torch.cuda.device_count():
            raise ProfileError(
                f"device '{device}' does not exist: {torch.cuda.device_count()} CUDA device(s) visible; "
                f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
        return torch.device("cuda", index)
    if dev.type != "cpu":
        raise ProfileError(f"device type '{dev.type}' is not supported; paraplan profiles on 'cuda' or 'cpu'")
    return dev


def device_name(device: torch.device) -> str:
    """Human-readable name of ``device``: the GPU model, or the CPU model with the torch thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def allreduce_bus_bandwidth(size_bytes: float, time_s: float, n_ranks: int) -> float:
    """Bus bandwidth of an all-reduce, comparable across rank counts.

    Formula: ``busbw = algbw * 2 (n - 1) / n`` with ``algbw = size_bytes / time_s``.
    Source: NVIDIA nccl-tests, doc/PERFORMANCE.md, "AllReduce" (a ring all-reduce moves ``2 (n-1)/n`` of the buffer
    over each rank's link).

    Args:
        size_bytes: per-rank buffer size, bytes.
        time_s: time of one all-reduce, seconds.
        n_ranks: number of ranks n.

    Returns:
        Bus bandwidth in bytes per second.
    """
    return size_bytes / time_s * 2 * (n_ranks - 1) / n_ranks


def profile_links(device: str | torch.device | None = None) -> list[LinkProfile]:
    """Measure the data links of this machine that matter to a plan.

    On CUDA: ``h2d_pinned`` and ``d2h_pinned`` (a 256 MiB pinned host buffer to/from ``device``) and, with at least
    two visible GPUs, ``allreduce_nccl_2gpu`` (NCCL all-reduce of 16 MiB between two processes on GPUs 0 and 1).
    On CPU: ``host_memcpy`` (copy of a 128 MiB tensor into another; bytes copied per second, not read + write) and
    ``allreduce_gloo_2proc`` (gloo all-reduce of 16 MiB between two processes over 127.0.0.1). Each all-reduce is
    also measured at 64 KiB (``*_small``), where latency dominates.
    Takes a few seconds, most of it starting the two processes.

    Args:
        device: as for :func:`resolve_device`.

    Returns:
        One :class:`LinkProfile` per link; ``bytes`` is the payload, ``time_s`` the median time of one transfer.

    Raises:
        ProfileError: a bad device, or an all-reduce that cannot start or does not finish (pass ``links=False`` to
            :func:`paraplan.profiler.profile_model` to skip link profiling).
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        links = [_profile_h2d_d2h(dev, to_device=True), _profile_h2d_d2h(dev, to_device=False)]
        if torch.cuda.device_count() >= 2:
            links += [profile_allreduce("nccl", n_ranks=2), profile_allreduce("nccl", 2, SMALL_ALLREDUCE_BYTES)]
        return links
    return [_profile_host_memcpy(), profile_allreduce("gloo", n_ranks=2),
            profile_allreduce("gloo", 2, SMALL_ALLREDUCE_BYTES)]


def _profile_h2d_d2h(dev: torch.device, to_device: bool) -> LinkProfile:
    host = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=True)
    gpu = torch.empty(COPY_BYTES, dtype=torch.uint8, device=dev)
    src, dst = (host, gpu) if to_device else (gpu, host)
    times = []
    with torch.cuda.device(dev):
        for i in range(_WARMUP + _REPEATS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(dev)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            if i >= _WARMUP:
                times.append(start.elapsed_time(end) / 1e3)
    t = statistics.median(times)
    name = "h2d_pinned" if to_device else "d2h_pinned"
    return LinkProfile(name=name, bytes=COPY_BYTES, time_s=t, bandwidth_bytes_per_s=COPY_BYTES / t)


def _profile_host_memcpy() -> LinkProfile:
    # Copy into a preallocated tensor: a clone would also time the allocator and first-touch page faults.
    src = torch.ones(HOST_COPY_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)
    times = []
    for i in range(_WARMUP + _REPEATS):
        t0 = time.perf_counter()
        dst.copy_(src)
        elapsed = time.perf_counter() - t0
        if i >= _WARMUP:
            times.append(elapsed)
    t = statistics.median(times)
    return LinkProfile(name="host_memcpy", bytes=HOST_COPY_BYTES, time_s=t, bandwidth_bytes_per_s=HOST_COPY_BYTES / t)


def profile_allreduce(backend: str = "gloo", n_ranks: int = 2, size_bytes: int = ALLREDUCE_BYTES) -> LinkProfile:
    """Time an all-reduce of ``size_bytes`` between ``n_ranks`` local processes (rendezvous on 127.0.0.1).

    This process is rank 0, in a private process group (the default ``torch.distributed`` group is not touched);
    ranks 1 .. n-1 are child processes started with ``python -c`` rather than ``multiprocessing`` spawn, so the
    caller's main module is not re-imported and needs no ``if __name__ == "__main__"`` guard. Starting a process
    that imports torch costs seconds, which is why rank 0 is not a child too.

    Args:
        backend: ``gloo`` (CPU tensors) or ``nccl`` (rank r on GPU r).
        n_ranks: number of ranks, at least 2; for nccl at most the number of visible GPUs.
        size_bytes: per-rank payload, bytes (fp32 elements, rounded down to a multiple of 4).

    Returns:
        ``allreduce_gloo_{n}proc`` or ``allreduce_nccl_{n}gpu``; ``time_s`` is rank 0's median over 5 repeats
        (each after a synchronising all-reduce of one element), ``bandwidth_bytes_per_s`` the bus bandwidth
        (:func:`allreduce_bus_bandwidth`).

    Raises:
        ProfileError: fewer than 2 ranks, an unknown backend, nccl without enough GPUs, or ranks that fail or do
            not finish within 120 s.
    """
    if n_ranks < 2:
        raise ProfileError(f"an all-reduce needs at least 2 ranks, got n_ranks={n_ranks}")
    if backend not in ("gloo", "nccl"):
        raise ProfileError(f"all-reduce backend '{backend}' is not supported; use 'gloo' or 'nccl'")
    if backend == "nccl" and torch.cuda.device_count() < n_ranks:
        raise ProfileError(
            f"an nccl all-reduce over {n_ranks} ranks needs {n_ranks} GPUs, {torch.cuda.device_count()} visible; "
            "use backend 'gloo' or fewer ranks"
        )
    numel = size_bytes // 4
    what = f"the {backend} all-reduce between {n_ranks} local processes"
    timeout = timedelta(seconds=_TIMEOUT_S)
    store = dist.TCPStore("127.0.0.1", 0, n_ranks, is_master=True, wait_for_workers=False, timeout=timeout)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The children import paraplan from wherever this process did (it may run from a checkout, not installed).
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    children: list[tuple[subprocess.Popen, IO[bytes]]] = []
    try:
        for rank in range(1, n_ranks):
            log = tempfile.TemporaryFile()
            cmd = [sys.executable, "-c", _CHILD, str(rank), str(n_ranks), str(store.port), backend, str(numel)]
            children.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + _TIMEOUT_S
        # Wait for the children to import torch before rank 0 blocks in the process-group rendezvous, so that a
        # child that dies early is reported instead of waited on.
        while store.add("ready", 0) < n_ranks - 1:
            _check_children(children, what, deadline)
            time.sleep(0.05)
        try:
            time_s = _run_allreduce(0, n_ranks, store, backend, numel)
        except (RuntimeError, dist.DistError) as exc:
            raise ProfileError(f"{what} failed on rank 0: {exc}; skip link profiling") from exc
        while any(proc.poll() is None for proc, _ in children):
            _check_children(children, what, deadline)
            time.sleep(0.05)
        _check_children(children, what, deadline)
    finally:
        for proc, log in children:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    name = f"allreduce_{backend}_{n_ranks}{'gpu' if backend == 'nccl' else 'proc'}"
    if size_bytes < ALLREDUCE_BYTES:
        name += "_small"  # a latency-bound size: with the large one it separates latency from bandwidth
    nbytes = numel * 4
    return LinkProfile(
        name=name, bytes=nbytes, time_s=time_s, bandwidth_bytes_per_s=allreduce_bus_bandwidth(nbytes, time_s, n_ranks)
    )


_CHILD = "import sys; from paraplan.profiler.links import _allreduce_child; _allreduce_child(sys.argv[1:])"


def _check_children(children: list[tuple[subprocess.Popen, IO[bytes]]], what: str, deadline: float) -> None:
    for proc, log in children:
        if proc.poll() not in (None, 0):
            log.seek(0)
            tail = log.read().decode(errors="replace").strip()[-600:]
            raise ProfileError(f"{what} failed (a child exited with {proc.returncode}): {tail}; skip link profiling")
    if time.monotonic() > deadline:
        raise ProfileError(
            f"{what} did not finish in {_TIMEOUT_S:.0f} s; check that 127.0.0.1 is reachable, or skip link profiling"
        )


def _allreduce_child(argv: list[str]) -> None:
    """Entry point of ranks 1 .. n-1: ``rank n_ranks port backend numel``."""
    rank, n_ranks, port, backend, numel = int(argv[0]), int(argv[1]), int(argv[2]), argv[3], int(argv[4])
    torch.set_num_threads(1)  # the ranks share the machine's cores with rank 0
    store = dist.TCPStore("127.0.0.1", port, n_ranks, is_master=False, timeout=timedelta(seconds=_TIMEOUT_S))
    store.add("ready", 1)
    _run_allreduce(rank, n_ranks, store, backend, numel)


def _run_allreduce(rank: int, n_ranks: int, store: dist.Store, backend: str, numel: int) -> float:
    """Rank ``rank``'s median time of one all-reduce of ``numel`` fp32 elements, seconds."""
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
        pg = dist.ProcessGroupNCCL(store, rank, n_ranks)
    else:
        device = torch.device("cpu")
        pg = dist.ProcessGroupGloo(store, rank, n_ranks, timedelta(seconds=_TIMEOUT_S))
    buf = torch.ones(numel, dtype=torch.float32, device=device)
    sync = torch.zeros(1, dtype=torch.float32, device=device)
    times = []
    try:
        for i in range(_WARMUP + _REPEATS):
            pg.allreduce([sync]).wait()  # all ranks start the timed all-reduce together
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            pg.allreduce([buf]).wait()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= _WARMUP:
                times.append(time.perf_counter() - t0)
    finally:
        if hasattr(pg, "shutdown"):
            pg.shutdown()
    return statistics.median(times)
