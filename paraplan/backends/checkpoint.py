"""Checkpoints of a run: where they live, how a save is made atomic, and which plan may resume from one.

Layout: ``RUN_DIR/checkpoints/step_<k:08d>/`` holds the state after ``k`` completed steps; training resumes at step
``k`` (the data order is a function of the step, ``data.sample_start``, so the step is the data position). Inside:
the backend's files (torch: DCP's ``.metadata`` and ``__<rank>_0.distcp`` plus ``trainer.json``; deepspeed: the
``deepspeed/`` directory of ``engine.save_checkpoint``), one ``rng_rank<r>.pt`` per rank, and the completion marker
``checkpoint.json`` (:class:`CheckpointMarker`: step, backend, layout, world size, the plan's model and training
setup, and every other file's relative path and size).

Atomic save (:func:`save_checkpoint`; every rank calls it): rank 0 creates ``checkpoints/.step_<k:08d>.partial``,
every rank writes its files into it, and after a barrier rank 0 flushes them to disk, writes the marker and renames
the directory to ``step_<k:08d>`` (``os.replace``: atomic within one file system). A crash before the rename leaves
only the ``.partial`` directory, which nothing reads and the next save removes. A ``step_*`` directory got its name
after its marker was written, so one whose marker is missing, unreadable or disagrees with its files (a file missing
or of another size) was damaged afterwards: it is refused with :class:`CheckpointError`, not skipped, since resuming
from an older checkpoint without a word would re-run steps the user believes done. Rank 0 lists (and flushes)
every rank's files, so the run directory must be one file system all ranks see (as multi-node launches require).

Retention: the newest :data:`KEEP_CHECKPOINTS` complete checkpoints stay; after each save rank 0 removes older
ones (each renamed to ``.step_<k:08d>.deleting`` first, so a crash mid-removal leaves no half-deleted ``step_*``).
Three rather than one: when the newest turns out damaged, deleting it resumes from the one before.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from pydantic import Field, ValidationError

from paraplan.errors import CheckpointError
from paraplan.files import write_atomic
from paraplan.types import Backend, ModelSpec, Plan, StrategyOverride, Tier, TrainSpec, _Frozen

CHECKPOINTS_DIR = "checkpoints"
MARKER_FILE = "checkpoint.json"
KEEP_CHECKPOINTS = 3
CHECKPOINT_SCHEMA_VERSION = 1
_COMPLETE = re.compile(r"^step_(\d{8,})$")
_STALE = re.compile(r"^\.step_\d+\.(partial|deleting)$")


class CheckpointLayout(_Frozen):
    """How a plan splits the training state over ranks: what a checkpoint's files depend on."""

    dp: int = Field(gt=0)
    tp: int = Field(gt=0)
    pp: int = Field(gt=0)
    cp: int = Field(gt=0)
    zero_stage: int = Field(ge=0, le=3)
    vpp: int = Field(gt=0)
    offload_optimizer: Tier
    offload_param: Tier


class CheckpointMarker(_Frozen):
    """``checkpoint.json``: written last, so a checkpoint with a valid marker whose files match it is complete."""

    schema_version: int = CHECKPOINT_SCHEMA_VERSION
    step: int = Field(gt=0, description="Steps completed; training resumes at this step.")
    backend: Backend
    world_size: int = Field(gt=0)
    layout: CheckpointLayout
    model: ModelSpec = Field(description="The plan's model: another model's states do not load.")
    train: TrainSpec = Field(description="The plan's training setup: global batch, lr, warmup, seed of the run.")
    files: dict[str, int] = Field(description="Every file of the checkpoint but the marker: path relative to the "
                                              "checkpoint ('/'-separated) -> size in bytes.")


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint directory and its marker."""

    path: Path
    marker: CheckpointMarker

    @property
    def step(self) -> int:
        return self.marker.step


def layout_of(plan: Plan) -> CheckpointLayout:
    s = plan.strategy
    return CheckpointLayout(dp=s.dp, tp=s.tp, pp=s.pp, cp=s.cp, zero_stage=s.zero_stage, vpp=s.vpp,
                            offload_optimizer=s.offload_optimizer, offload_param=s.offload_param)


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """``RUN_DIR/checkpoints/step_<step:08d>``: where the state after ``step`` completed steps goes."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every ``step_*`` directory under ``RUN_DIR/checkpoints``, oldest first (not
    validated; partial and half-deleted directories are not listed)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _COMPLETE.match(p.name)) and p.is_dir()]
    return sorted(found)


def read_checkpoint(path: Path) -> Checkpoint:
    """The checkpoint at ``path`` after checking it against its marker.

    Raises:
        CheckpointError: no marker, a marker that is not valid JSON or not this version's, a marker of another step
            than the directory's name, or a file the marker lists that is missing or of another size.
    """
    path = Path(path)
    marker_path = path / MARKER_FILE
    try:
        data = json.loads(marker_path.read_text())
    except FileNotFoundError:
        raise _damaged(path, f"its completion marker {MARKER_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, f"its completion marker {MARKER_FILE} is unreadable ({exc})") from None
    if not isinstance(data, dict) or data.get("schema_version") != CHECKPOINT_SCHEMA_VERSION:
        version = data.get("schema_version") if isinstance(data, dict) else None
        raise _damaged(path, f"its marker has schema_version {version!r}; this paraplan reads "
                             f"{CHECKPOINT_SCHEMA_VERSION}")
    try:
        marker = CheckpointMarker.model_validate(data)
    except ValidationError as exc:
        raise _damaged(path, f"its marker is invalid ({exc.error_count()} errors, first: "
                             f"{exc.errors()[0]['msg']} at {'.'.join(map(str, exc.errors()[0]['loc']))})") from None
    m = _COMPLETE.match(path.name)
    if m is None or int(m.group(1)) != marker.step:
        raise _damaged(path, f"its marker is for step {marker.step}, not the step in the directory's name")
    for rel, size in sorted(marker.files.items()):
        file = path / rel
        if not file.is_file():
            raise _damaged(path, f"{rel} is missing")
        have = file.stat().st_size
        if have != size:
            raise _damaged(path, f"{rel} has {have} bytes, the marker says {size} (truncated or overwritten)")
    return Checkpoint(path, marker)


def _damaged(path: Path, what: str) -> CheckpointError:
    earlier = [p for k, p in complete_checkpoints(path.parent.parent) if p != path and p.name < path.name]
    then = f"resume from the previous one, {earlier[-1].name}" if earlier else "start over from step 0"
    return CheckpointError(
        f"checkpoint {path} is damaged: {what}. Delete it (rm -r {path}) to {then}, or launch into a fresh run "
        "directory"
    )


def latest_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint of the run (checked by :func:`read_checkpoint`); None when there is none.

    Raises:
        CheckpointError: the newest ``step_*`` directory is damaged (older ones are not looked at: the message
            says to delete it).
    """
    found = complete_checkpoints(run_dir)
    return read_checkpoint(found[-1][1]) if found else None


def check_checkpointing(plan: Plan, backend: Backend) -> None:
    """Refuse, before any process starts, a plan whose checkpoints would not restore its state.

    Raises:
        CheckpointError: deepspeed with the optimizer states on NVMe: ``engine.load_checkpoint`` then returns the
            initial weights without an error (measured, PLATFORM.md), so a resumed run would silently restart
            from scratch.
    """
    if backend == "deepspeed" and plan.strategy.offload_optimizer == "nvme":
        raise CheckpointError(
            "DeepSpeed cannot checkpoint this plan: with the optimizer states on NVMe, engine.load_checkpoint silently "
            "returns the initial weights (measured with deepspeed 0.19.8), so checkpoints of this plan would not "
            "restore its training. Re-plan with --strategy offload_optimizer=cpu (or none), use --backend torch, "
            "or launch without checkpoints or restarts"
        )


def check_resumable(run_dir: Path, plan: Plan, backend: Backend) -> Checkpoint | None:
    """The checkpoint a launch of ``plan`` in ``run_dir`` would resume from, checked before any process starts.

    The torch backend reshards (its DCP checkpoints are keyed by whole-model parameter names, so any strategy loads
    any other's); DeepSpeed loads only into the layout and world size that saved.

    Returns:
        The newest checkpoint, or None when the run has none (the job starts at step 0).

    Raises:
        CheckpointError: the newest checkpoint is damaged (:func:`read_checkpoint`), was written by the other
            backend, for another model or training setup, by deepspeed under another layout or world size, or the
            plan cannot be checkpointed (:func:`check_checkpointing`).
    """
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        return None
    check_checkpointing(plan, backend)
    m, where = ckpt.marker, f"checkpoint {ckpt.path}"
    if m.backend != backend:
        raise CheckpointError(f"{where} was written by the {m.backend} backend; the {backend} backend cannot load "
                              f"it. Resume with --backend {m.backend}, or launch into a fresh run directory")
    if m.model != plan.model:
        diff = _differences(m.model, plan.model)
        raise CheckpointError(f"{where} is of another model ({diff}); resume with the plan of model "
                              f"{m.model.name}, or launch into a fresh run directory")
    if m.train != plan.train:
        raise CheckpointError(f"{where} was trained with another setup ({_differences(m.train, plan.train)}); a "
                              "resumed run continues the same training: re-plan with the checkpoint's values, or "
                              "launch into a fresh run directory")
    layout = layout_of(plan)
    if backend == "deepspeed" and (m.layout != layout or m.world_size != plan.strategy.world_size):
        diff = _differences(m.layout, layout) or f"world size {m.world_size} vs {plan.strategy.world_size}"
        raise CheckpointError(
            f"{where} was saved under another layout ({diff}); DeepSpeed loads its checkpoints only into the layout "
            "that saved them (another one needs DeepSpeed's universal checkpoint conversion, ds_to_universal.py, "
            "which paraplan does not run). Resume with the checkpoint's strategy (--strategy "
            f"{_strategy_arg(m.layout)}), or use the torch backend, which reshards"
        )
    return ckpt


def _differences(saved: _Frozen, now: _Frozen) -> str:
    a, b = saved.model_dump(), now.model_dump()
    return "; ".join(f"{k}: checkpoint {a[k]!r}, plan {b[k]!r}" for k in a if a[k] != b.get(k))


def _strategy_arg(layout: CheckpointLayout) -> str:
    """The layout as ``--strategy`` text (``dp=2,tp=1,...,zero=1,offload=none,...``)."""
    return StrategyOverride(**layout.model_dump()).to_cli()


def checkpoint_due(steps_done: int, total_steps: int, every: int) -> bool:
    """Whether to save after ``steps_done`` steps: every ``every`` steps and after the last (never when 0)."""
    return every > 0 and steps_done > 0 and (steps_done % every == 0 or steps_done == total_steps)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_checkpoint(run_dir: Path, step: int, plan: Plan, backend: Backend, write: Callable[[Path], None]) -> Path:
    """Save the state after ``step`` completed steps atomically (see the module docstring). Every rank calls it.

    Args:
        run_dir: the run directory.
        step: steps completed (> 0).
        plan: the running plan (its layout, model and training setup go into the marker).
        backend: ``torch`` or ``deepspeed``.
        write: called on every rank with the temporary directory; writes that rank's files into it (collectives
            allowed: every rank calls it at the same point). This rank's RNG state is added after it.

    Returns:
        The checkpoint directory, ``checkpoint_dir(run_dir, step)``.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    tmp = root / f".step_{step:08d}.partial"
    if _rank() == 0:
        _remove_stale(root)
        tmp.mkdir(parents=True)
    _barrier()
    write(tmp)
    save_rng_state(tmp)
    _barrier()  # every rank's files are written
    final = checkpoint_dir(run_dir, step)
    if _rank() == 0:
        files = _flushed_files(tmp)
        marker = CheckpointMarker(step=step, backend=backend, world_size=plan.strategy.world_size,
                                  layout=layout_of(plan), model=plan.model, train=plan.train, files=files)
        write_atomic(tmp / MARKER_FILE, marker.model_dump_json(indent=2) + "\n", "checkpoint marker")
        if final.exists():  # the same step saved again (a re-run after its newer checkpoints were deleted)
            _remove(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _prune(run_dir)
    _barrier()  # nobody goes on (or ends the job) before the checkpoint has its name
    return final


def _flushed_files(directory: Path) -> dict[str, int]:
    """Every file under ``directory`` -> its size, each flushed to disk first (so a marker never names data still
    in the page cache when the machine goes down)."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        files[path.relative_to(directory).as_posix()] = path.stat().st_size
    for sub in [directory, *(p for p in directory.rglob("*") if p.is_dir())]:
        _fsync_dir(sub)
    return files


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Rename ``path`` (a checkpoint directory) to its ``.deleting`` name, then delete it."""
    doomed = path.with_name(f".{path.name}.deleting")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.replace(path, doomed)
    shutil.rmtree(doomed)


def _remove_stale(root: Path) -> None:
    """Delete what crashed saves and removals left: ``.step_*.partial`` and ``.step_*.deleting``."""
    if root.is_dir():
        for path in root.iterdir():
            if _STALE.match(path.name):
                shutil.rmtree(path)


def _prune(run_dir: Path) -> None:
    """Keep the newest KEEP_CHECKPOINTS checkpoints."""
    for _, path in complete_checkpoints(run_dir)[:-KEEP_CHECKPOINTS]:
        _remove(path)


RNG_FILE = "rng_rank{rank}.pt"


def save_rng_state(directory: Path) -> None:
    """Write this rank's torch RNG states (CPU, and CUDA when present) to ``directory/rng_rank<rank>.pt``."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, Path(directory) / RNG_FILE.format(rank=_rank()))


def load_rng_state(ckpt: Checkpoint, plan: Plan) -> bool:
    """Restore this rank's RNG states when ``plan`` has the checkpoint's layout and world size (rank r then plays
    the same part as the rank that saved); otherwise leave them as seeded. Returns whether they were restored."""
    if ckpt.marker.layout != layout_of(plan) or ckpt.marker.world_size != plan.strategy.world_size:
        return False
    state = torch.load(ckpt.path / RNG_FILE.format(rank=_rank()), weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    return True


def resume_run(run_dir: Path, plan: Plan, backend: Backend, checkpoint_every: int,
               load: Callable[[Checkpoint], None]) -> int:
    """At a trainer's start, on every rank: the step to start at, 0 or the newest checkpoint's after ``load`` has
    loaded it into this rank (rank 0 then prints "resumed from <dir> at step <k>"; ``launch`` echoes lines starting
    with ``resumed ``). A torchrun restart resumes the same way.

    Raises:
        CheckpointError: ``checkpoint_every`` > 0 for a plan :func:`check_checkpointing` refuses, or a checkpoint
            :func:`check_resumable` refuses.
    """
    if checkpoint_every > 0:
        check_checkpointing(plan, backend)
    ckpt = check_resumable(run_dir, plan, backend)
    if ckpt is None:
        return 0
    load(ckpt)
    if _rank() == 0:
        saved = ckpt.marker.layout
        how = "" if saved == layout_of(plan) else f" (saved under {_strategy_arg(saved)}, resharded)"
        print(f"resumed from {ckpt.path} at step {ckpt.step}{how}", flush=True)
    return ckpt.step
