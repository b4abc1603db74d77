"""The first step of a pipeline schedule as a timeline: which operation each rank runs when.

Operation orders per rank (what a schedule *is*):
    1f1b: PipeDream-Flush (Narayanan et al. SC'21 sec. 2.2.1, Fig. 4): rank ``r`` of ``p`` runs ``min(m, p - r)``
        forwards, then alternates one backward and one forward, then the remaining backwards. This is the order
        torch's ``Schedule1F1B._step_microbatches`` runs (warm-up ``min(m, num_stages - stage_index)``); its
        ``pipeline_order`` IR is not used because torch 2.13 lists micro-batches 1..m instead of 0..m-1 for the
        last rank there.
    interleaved_1f1b, zero_bubble, zbv: the ``pipeline_order`` that torch.distributed.pipelining's
        ``ScheduleInterleaved1F1B``, ``ScheduleInterleavedZeroBubble`` and ``ScheduleZBVZeroBubble`` compute in
        their constructors (Narayanan et al. SC'21 sec. 2.2.2; Qi et al. 2024, arXiv 2401.10241, ZB-H1 and ZB-V),
        built here with stand-in stage objects that carry only the indices the order depends on, so no process
        group is needed.

Times: a list schedule. Each rank runs its operations in order; an operation starts when its rank is free and
its inputs exist: the forward of virtual stage ``k`` on micro-batch ``i`` after the forward of ``k - 1`` on ``i``;
the (input-)backward of ``k`` after that of ``k + 1`` (the last virtual stage after its own forward); a
weight-gradient ``W`` after the input-gradient ``I`` of the same stage and micro-batch. With equal stages taking
``t_f`` forward and ``t_b`` backward this gives the textbook 1F1B step ``(m + p - 1)(t_f + t_b)`` and a bubble of
``(p - 1)(t_f + t_b)`` per rank (Narayanan et al. SC'21 sec. 2.2.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from paraplan.errors import ParaplanError
from paraplan.types import virtual_stage_ranks


class ScheduleError(ParaplanError):
    """A schedule whose operation order cannot be built or run to the end."""


@dataclass(frozen=True)
class Op:
    """One operation of a rank: ``kind`` "F" (forward), "B" (full backward), "I" (input-gradient backward) or
    "W" (weight-gradient backward) of virtual stage ``stage`` on micro-batch ``micro_batch``."""

    kind: str
    stage: int
    micro_batch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.micro_batch}"


@dataclass(frozen=True)
class Segment:
    """A coloured piece of an operation on the timeline: ``what`` ("forward", "backward", "recompute",
    "communication", "offload transfer", ...) from ``start_s`` for ``duration_s`` seconds on ``rank``."""

    rank: int
    stage: int
    micro_batch: int
    op: str
    what: str
    start_s: float
    duration_s: float


@dataclass(frozen=True)
class Timeline:
    """Every segment of the first step; per rank, when its work (tail included) ends (``end_s``) and its idle time
    in the pipeline part of the step (``bubble_s``: from 0 to the end of the last operation of any rank, minus the
    rank's busy time); ``pipeline_s`` is that end."""

    segments: list[Segment]
    end_s: list[float]
    bubble_s: list[float]
    pipeline_s: float

    @property
    def step_s(self) -> float:
        return max(self.end_s, default=0.0)


def order_1f1b(pp: int, m: int) -> dict[int, list[Op]]:
    """Operations per rank of 1F1B (PipeDream-Flush) with ``pp`` ranks and ``m`` micro-batches (module docstring).

    Raises:
        ScheduleError: pp or m < 1.
    """
    if pp < 1 or m < 1:
        raise ScheduleError(f"1F1B needs pp >= 1 and m >= 1 micro-batches, got pp={pp}, m={m}")
    out: dict[int, list[Op]] = {}
    for r in range(pp):
        warmup = min(m, pp - r)
        ops = [Op("F", r, i) for i in range(warmup)]
        f = warmup
        for b in range(m):
            ops.append(Op("B", r, b))
            if f < m:
                ops.append(Op("F", r, f))
                f += 1
        out[r] = ops
    return out


_TORCH_CLASSES = {"interleaved_1f1b": "ScheduleInterleaved1F1B", "zero_bubble": "ScheduleInterleavedZeroBubble",
                  "zbv": "ScheduleZBVZeroBubble"}


def order_torch(schedule: str, pp: int, vpp: int, m: int) -> dict[int, list[Op]]:
    """Operations per rank of a multi-chunk schedule, from torch.distributed.pipelining's own ``pipeline_order``.

    Args:
        schedule: "interleaved_1f1b", "zero_bubble" or "zbv".
        pp: pipeline ranks; vpp: chunks per rank (2 for zbv); m: micro-batches per step.

    Raises:
        ScheduleError: an unknown schedule, or torch refuses (pp, vpp, m) (its message is kept).
    """
    import torch
    from torch.distributed.pipelining import schedules as torch_schedules

    if schedule not in _TORCH_CLASSES:
        raise ScheduleError(f"schedule '{schedule}': use one of 1f1b, {', '.join(_TORCH_CLASSES)}")
    ranks = virtual_stage_ranks(pp, vpp, schedule)
    n_stages = pp * vpp
    # The constructors read only the stage indices, counts and a module (for a torch.compile check).
    stub = torch.nn.Module()
    stages = [SimpleNamespace(stage_index=k, num_stages=n_stages, group_size=pp, group_rank=0, is_first=k == 0,
                              is_last=k == n_stages - 1, stage_index_to_group_rank=None, submod=stub)
              for k in range(n_stages) if ranks[k] == 0]
    cls = getattr(torch_schedules, _TORCH_CLASSES[schedule])
    try:
        sched = cls(stages, m)
    except (AssertionError, ValueError, RuntimeError) as exc:
        raise ScheduleError(f"torch's {cls.__name__} refuses pp={pp}, vpp={vpp}, m={m}: {exc}") from None
    out: dict[int, list[Op]] = {}
    for rank, actions in sched.pipeline_order.items():
        ops = []
        for a in actions:
            if a is None:
                continue
            kind = a.computation_type.value
            if kind in ("F", "B", "I", "W"):
                ops.append(Op(kind, a.stage_index, a.microbatch_index))
        out[rank] = ops
    return out


def schedule_order(schedule: str, pp: int, vpp: int, m: int) -> dict[int, list[Op]]:
    """Operations per rank of ``schedule`` (pp = 1: forward then backward of each micro-batch)."""
    if schedule == "1f1b" or pp == 1:
        return order_1f1b(pp, m)
    return order_torch(schedule, pp, vpp, m)


@dataclass(frozen=True)
class OpTimes:
    """Durations of one virtual stage's operations per micro-batch, as (what, seconds) pieces in running order:
    ``forward`` for F, ``backward`` for B (the full backward, recomputation first), ``input_grad`` and
    ``weight_grad`` for the zero-bubble split of it (I then W)."""

    forward: tuple[tuple[str, float], ...]
    backward: tuple[tuple[str, float], ...]
    input_grad: tuple[tuple[str, float], ...] = ()
    weight_grad: tuple[tuple[str, float], ...] = ()

    def pieces(self, kind: str) -> tuple[tuple[str, float], ...]:
        return {"F": self.forward, "B": self.backward, "I": self.input_grad or self.backward,
                "W": self.weight_grad}[kind]


def simulate(order: dict[int, list[Op]], times: dict[int, OpTimes],
             tail: dict[int, tuple[tuple[str, float], ...]] | None = None) -> Timeline:
    """Run ``order`` as a list schedule (module docstring) with each virtual stage's ``times``.

    Args:
        order: operations per rank, from :func:`schedule_order`.
        times: virtual stage -> its operation pieces (seconds).
        tail: rank -> pieces run after its last operation (exposed data-parallel communication, optimizer step).

    Raises:
        ScheduleError: the order deadlocks (an operation waits for one that never runs), or a stage lacks times.
    """
    missing = {op.stage for ops in order.values() for op in ops} - set(times)
    if missing:
        raise ScheduleError(f"no operation times for virtual stages {sorted(missing)}")
    n_stages = max(times) + 1
    done: dict[tuple[str, int, int], float] = {}
    free = {r: 0.0 for r in order}
    busy = {r: 0.0 for r in order}
    nxt = {r: 0 for r in order}
    segments: list[Segment] = []

    def ready(op: Op) -> float | None:
        if op.kind == "F":
            dep = ("F", op.stage - 1, op.micro_batch) if op.stage > 0 else None
        elif op.kind in ("B", "I"):
            dep = ("B", op.stage + 1, op.micro_batch) if op.stage < n_stages - 1 else ("F", op.stage, op.micro_batch)
        else:
            dep = ("I", op.stage, op.micro_batch)
        if dep is None:
            return 0.0
        return done.get(dep)

    remaining = sum(len(ops) for ops in order.values())
    while remaining:
        progressed = False
        for r, ops in order.items():
            while nxt[r] < len(ops):
                op = ops[nxt[r]]
                t_dep = ready(op)
                if t_dep is None:
                    break
                t = max(free[r], t_dep)
                for what, dur in times[op.stage].pieces(op.kind):
                    if dur > 0:
                        segments.append(Segment(r, op.stage, op.micro_batch, op.kind, what, t, dur))
                    t += dur
                    busy[r] += dur
                free[r] = t
                done[(op.kind, op.stage, op.micro_batch)] = t
                if op.kind == "I":  # downstream backwards wait for the input gradient only
                    done[("B", op.stage, op.micro_batch)] = t
                nxt[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(ops[nxt[r]]) for r, ops in order.items() if nxt[r] < len(ops)}
            raise ScheduleError(f"the schedule deadlocks: next operations {stuck} wait for ones that never run")
    end = dict(free)
    for r, pieces in (tail or {}).items():
        t = end[r]
        for what, dur in pieces:
            if dur > 0:
                segments.append(Segment(r, -1, -1, "step", what, t, dur))
            t += dur
        end[r] = t
    ranks = sorted(order)
    pipe = max(free.values(), default=0.0)
    return Timeline(segments, [end[r] for r in ranks], [pipe - busy[r] for r in ranks], pipe)
