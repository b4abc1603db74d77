"""Per-phase times of a training step, measured with ``torch.profiler`` (``LaunchSpec.phase_times``).

When a launch asks for phase times, both trainers run :data:`PHASE_STEP` (the second step: the first warms the
allocator up and is left out of the measured mean too, ``render.WARMUP_STEPS``) under ``torch.profiler.profile``
and add to that step's ``metrics.jsonl`` row ``"phases"``, a dict of per-rank lists (one entry per rank, as
``peak_memory_bytes``):

- ``forward_s``, ``backward_s``, ``optimizer_s``: summed durations of the trainer's own ranges
  (``record_function("paraplan/forward")``, ``paraplan/backward``, ``paraplan/optimizer``) and, inside a pipeline
  schedule, of torch.distributed.pipelining's ``Forward i`` / ``Backward i`` / ``PP:<stage>F<mb>``/
  ``PP:<stage>B|I|W<mb>`` ranges (torch/distributed/pipelining/schedules.py ``record_function``) or of DeepSpeed's
  ``ForwardPass`` / ``BackwardPass`` / ``OptimizerStep`` pipe instructions (wrapped here, see
  :func:`wrap_deepspeed_pipe_instructions`). Backward includes recomputation (activation checkpointing re-runs the
  forward inside autograd's backward) and any communication the main thread waits for inside the range; the
  optimizer includes CPU Adam and offload swapping (DeepSpeed runs them inside ``step``).
- ``comm_s`` / ``comm_count``: ``{kind: seconds}`` / ``{kind: calls}`` of the collectives the process group ran,
  ``kind`` in :data:`COMM_KINDS`. On gloo (CPU) the durations are the ``gloo:<op>`` events of gloo's worker threads
  (from when the work starts to when it completes, so a collective that waits for a late peer counts the wait);
  their kinds come from the ``c10d::<op>`` calls that enqueued them (matched in order: gloo runs
  ``reduce_scatter_tensor`` as an ``all_reduce``). On CUDA, the NCCL kernels' device time.
- ``step_s``: wall time of the profiled step (its ``step_time_s``, which the profiler slows a little).

Sources: torch.profiler (``profile(activities=[CPU, CUDA])``, ``prof.events()``); event names as torch 2.13 and
DeepSpeed 0.19.8 emit them (checked on gloo, 2 processes).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import defaultdict
from collections.abc import Iterator

import torch

PHASE_STEP = 1
PHASE_KEYS = ("forward_s", "backward_s", "optimizer_s")
COMM_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "send_recv", "all_to_all", "broadcast", "barrier")

# c10d ops (what the Python API calls) -> kind; the gloo event a call enqueues follows in the same order.
_C10D_KIND = {
    "c10d::allreduce_": "all_reduce", "c10d::allreduce_coalesced_": "all_reduce",
    "c10d::allgather_": "all_gather", "c10d::_allgather_base_": "all_gather",
    "c10d::allgather_into_tensor_coalesced_": "all_gather", "c10d::allgather_coalesced_": "all_gather",
    "c10d::reduce_scatter_": "reduce_scatter", "c10d::_reduce_scatter_base_": "reduce_scatter",
    "c10d::reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "c10d::send": "send_recv", "c10d::recv_": "send_recv", "c10d::recv_any_source_": "send_recv",
    "c10d::alltoall_": "all_to_all", "c10d::alltoall_base_": "all_to_all",
    "c10d::broadcast_": "broadcast", "c10d::barrier": "barrier",
}
_GLOO_KIND = {"all_reduce": "all_reduce", "allreduce": "all_reduce", "all_gather": "all_gather",
              "allgather": "all_gather", "reduce_scatter": "reduce_scatter", "send": "send_recv",
              "recv": "send_recv", "all_to_all": "all_to_all", "alltoall": "all_to_all",
              "broadcast": "broadcast", "barrier": "barrier"}
_NCCL_KIND = (("AllReduce", "all_reduce"), ("AllGather", "all_gather"), ("ReduceScatter", "reduce_scatter"),
              ("SendRecv", "send_recv"), ("Send", "send_recv"), ("Recv", "send_recv"), ("AllToAll", "all_to_all"),
              ("Broadcast", "broadcast"))
_FORWARD = re.compile(r"^(paraplan/forward|Forward \d+|PP:\d+F\d)")
_BACKWARD = re.compile(r"^(paraplan/backward|Backward \d+|PP:\d+[BIW]\d)")
_OPTIMIZER = re.compile(r"^paraplan/optimizer")


def phase_range(name: str, active: bool) -> contextlib.AbstractContextManager:
    """``record_function("paraplan/<name>")`` while a phase step is profiled, else a no-op."""
    if not active:
        return contextlib.nullcontext()
    return torch.profiler.record_function(f"paraplan/{name}")


def _union_s(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by ``(start_us, end_us)`` intervals (nested ranges counted once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1e6


def summarize_events(events) -> dict:
    """This rank's phase dict (module docstring) from ``torch.profiler``'s ``prof.events()``.

    Args:
        events: FunctionEvent-like objects with ``name``, ``time_range.start``/``.end`` (us), ``device_type``.
    """
    ranges: dict[str, list[tuple[float, float]]] = defaultdict(list)
    c10d: list[tuple[float, str]] = []
    gloo: list[tuple[float, float, str]] = []
    comm_s: dict[str, float] = defaultdict(float)
    comm_n: dict[str, int] = defaultdict(int)
    for e in events:
        name, start, end = e.name, e.time_range.start, e.time_range.end
        for key, pattern in (("forward_s", _FORWARD), ("backward_s", _BACKWARD), ("optimizer_s", _OPTIMIZER)):
            if pattern.match(name):
                ranges[key].append((start, end))
        if name in _C10D_KIND:
            c10d.append((start, _C10D_KIND[name]))
        elif name.startswith("gloo:"):
            gloo.append((start, end, _GLOO_KIND.get(name[5:], name[5:])))
        elif "nccl" in name.lower() and "kernel" in name.lower():
            kind = next((k for tag, k in _NCCL_KIND if tag in name), "other")
            comm_s[kind] += (end - start) / 1e6
            comm_n[kind] += 1
    c10d.sort()
    gloo.sort()
    matched = len(c10d) == len(gloo)
    for i, (start, end, kind) in enumerate(gloo):
        kind = c10d[i][1] if matched else kind
        comm_s[kind] += (end - start) / 1e6
        comm_n[kind] += 1
    out: dict = {key: _union_s(ranges[key]) for key in PHASE_KEYS}
    out["comm_s"] = dict(comm_s)
    out["comm_count"] = dict(comm_n)
    return out


class PhaseRecorder:
    """Profiles step :data:`PHASE_STEP` (or step 0 of a one-step run) when enabled; see the module docstring.

    Usage: ``with recorder.step(k): ...`` around a step, ``recorder.range("forward")`` inside it, then
    ``recorder.take()`` for the phase dict of the step just profiled (None for the others).
    """

    def __init__(self, enabled: bool, steps: int, device: torch.device) -> None:
        self.enabled = enabled
        self.target = PHASE_STEP if steps > PHASE_STEP else 0
        self.device = device
        self.active = False
        self._result: dict | None = None

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        if not self.enabled or step != self.target:
            yield
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.active = True
        t0 = time.perf_counter()
        try:
            with profile(activities=activities) as prof:
                yield
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
        finally:
            self.active = False
        elapsed = time.perf_counter() - t0
        self._result = {**summarize_events(prof.events()), "step_s": elapsed}

    def range(self, name: str) -> contextlib.AbstractContextManager:
        return phase_range(name, self.active)

    def take(self) -> dict | None:
        out, self._result = self._result, None
        return out


def wrap_deepspeed_pipe_instructions(engine, recorder: PhaseRecorder) -> None:
    """Time DeepSpeed's pipeline instructions under the recorder: the engine looks each instruction's method up
    in ``engine._INSTRUCTION_MAP`` (deepspeed/runtime/pipe/engine.py ``_exec_schedule``), so an instance-level copy
    whose forward, backward and optimizer entries run inside ``paraplan/<phase>`` ranges changes nothing else."""
    from deepspeed.runtime.pipe import schedule

    wrapped = dict(engine._INSTRUCTION_MAP)
    for cls, phase in ((schedule.ForwardPass, "forward"), (schedule.BackwardPass, "backward"),
                       (schedule.OptimizerStep, "optimizer")):
        inner = wrapped[cls]

        def run(self, *args, _inner=inner, _phase=phase, **kwargs):
            with recorder.range(_phase):
                return _inner(self, *args, **kwargs)

        wrapped[cls] = run
    engine._INSTRUCTION_MAP = wrapped


def merge_rank_phases(per_rank: list[dict | None]) -> dict:
    """Per-rank phase dicts -> the row's ``phases``: ``{key: [per rank]}`` for the times, ``comm_s`` and
    ``comm_count`` as ``{kind: [per rank]}`` (0 where a rank ran none of that kind)."""
    ranks = [p or {} for p in per_rank]
    out: dict = {key: [float(p.get(key, 0.0)) for p in ranks] for key in PHASE_KEYS}
    for field in ("comm_s", "comm_count"):
        kinds = sorted({k for p in ranks for k in p.get(field, {})})
        out[field] = {k: [p.get(field, {}).get(k, 0) for p in ranks] for k in kinds}
    out["step_s"] = [float(p.get("step_s", 0.0)) for p in ranks]
    return out
