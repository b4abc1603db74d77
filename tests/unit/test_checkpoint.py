"""Checkpoint directories without a training job: atomic saves, the completion marker, damaged and partial
checkpoints, retention, what may resume from what, the warmup schedule and the append-only metrics file.

Single process (no process group): ``save_checkpoint``'s barriers are no-ops and rank 0 does everything.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import make_plan

from paraplan.backends.checkpoint import (
    CHECKPOINTS_DIR, KEEP_CHECKPOINTS, MARKER_FILE, check_checkpointing, check_resumable, checkpoint_dir,
    checkpoint_due, latest_checkpoint, read_checkpoint, save_checkpoint,
)
from paraplan.backends.train_common import METRICS_FILE, MetricsWriter, build_lr_scheduler
from paraplan.errors import CheckpointError, LaunchError


def _writer(payload: dict[str, bytes]):
    def write(directory):
        for rel, data in payload.items():
            (directory / rel).parent.mkdir(parents=True, exist_ok=True)
            (directory / rel).write_bytes(data)
    return write


FILES = {"model.bin": b"x" * 1000, "sub/optim.bin": b"y" * 10}


def _save(run_dir, step, plan=None, backend="torch", files=FILES):
    return save_checkpoint(run_dir, step, plan or make_plan(cluster="cpu:1"), backend, _writer(files))


def test_save_names_the_directory_after_the_marker_lists_every_file(tmp_path):
    plan = make_plan(cluster="cpu:1")
    path = _save(tmp_path, 2, plan)
    assert path == tmp_path / CHECKPOINTS_DIR / "step_00000002"
    assert os.listdir(tmp_path / CHECKPOINTS_DIR) == ["step_00000002"]  # nothing partial left behind
    marker = json.loads((path / MARKER_FILE).read_text())
    # Every file written, with its size, plus this rank's RNG state; the marker does not list itself.
    rng = (path / "rng_rank0.pt").stat().st_size
    assert marker["files"] == {"model.bin": 1000, "sub/optim.bin": 10, "rng_rank0.pt": rng}
    assert (marker["step"], marker["backend"], marker["world_size"]) == (2, "torch", 1)
    assert marker["layout"] == {"dp": 1, "tp": 1, "pp": 1, "cp": 1, "zero_stage": 0, "vpp": 1,
                                "offload_optimizer": "none", "offload_param": "none"}
    ckpt = latest_checkpoint(tmp_path)
    assert (ckpt.path, ckpt.step, ckpt.marker.model) == (path, 2, plan.model)


def test_rng_state_is_saved_and_restored(tmp_path):
    from paraplan.backends.checkpoint import load_rng_state

    plan = make_plan(cluster="cpu:1")
    torch.manual_seed(7)
    path = _save(tmp_path, 1, plan)
    expected = torch.rand(3)
    torch.manual_seed(8)
    assert load_rng_state(read_checkpoint(path), plan)
    assert torch.equal(torch.rand(3), expected)
    # Another layout: rank r of this plan is not the rank that saved, so the seeded stream stays.
    assert not load_rng_state(read_checkpoint(path), make_plan(cluster="cpu:2", dp=2))


def test_a_crash_mid_save_leaves_the_previous_checkpoint_latest_and_the_next_save_cleans_up(tmp_path):
    _save(tmp_path, 2)

    def crash(directory):
        (directory / "model.bin").write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path, 4, make_plan(cluster="cpu:1"), "torch", crash)
    assert (tmp_path / CHECKPOINTS_DIR / ".step_00000004.partial").is_dir()
    assert latest_checkpoint(tmp_path).step == 2
    _save(tmp_path, 4)
    assert sorted(os.listdir(tmp_path / CHECKPOINTS_DIR)) == ["step_00000002", "step_00000004"]
    assert latest_checkpoint(tmp_path).step == 4


def test_no_checkpoint(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    assert check_resumable(tmp_path, make_plan(cluster="cpu:1"), "torch") is None


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda p: (p / "model.bin").unlink(), "model.bin is missing"),
        (lambda p: (p / "sub/optim.bin").write_bytes(b"y" * 4), "sub/optim.bin has 4 bytes, the marker says 10"),
        (lambda p: (p / MARKER_FILE).unlink(), f"completion marker {MARKER_FILE} is missing"),
        (lambda p: (p / MARKER_FILE).write_text('{"step": 4, "fil'), f"completion marker {MARKER_FILE} is unreadable"),
        (lambda p: (p / MARKER_FILE).write_text('{"schema_version": 1, "step": 4}'), "its marker is invalid"),
    ],
    ids=["missing_file", "truncated_file", "no_marker", "garbled_marker", "incomplete_marker"],
)
def test_a_damaged_latest_checkpoint_is_refused_with_what_to_do(tmp_path, damage, fragment):
    _save(tmp_path, 2)
    newest = _save(tmp_path, 4)
    damage(newest)
    with pytest.raises(CheckpointError) as err:
        latest_checkpoint(tmp_path)
    message = str(err.value)
    assert str(newest) in message and fragment in message
    assert f"rm -r {newest}" in message and "resume from the previous one, step_00000002" in message
    assert isinstance(err.value, LaunchError)  # the CLI renders it as a user error
    # What the message says works: without the damaged one the previous checkpoint is the latest.
    import shutil

    shutil.rmtree(newest)
    assert latest_checkpoint(tmp_path).step == 2


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step)
    kept = sorted(os.listdir(tmp_path / CHECKPOINTS_DIR))
    assert kept == [f"step_{k:08d}" for k in range(6 - KEEP_CHECKPOINTS, 6)]


def test_saving_a_step_again_replaces_it(tmp_path):
    _save(tmp_path, 2, files={"a.bin": b"old"})
    path = _save(tmp_path, 2, files={"b.bin": b"new!"})
    assert read_checkpoint(path).marker.files.keys() == {"b.bin", "rng_rank0.pt"}
    assert not (path / "a.bin").exists()


def test_checkpoint_due_every_k_steps_and_after_the_last():
    assert [s for s in range(1, 8) if checkpoint_due(s, 7, 3)] == [3, 6, 7]
    assert not any(checkpoint_due(s, 7, 0) for s in range(1, 8))


def test_deepspeed_with_the_optimizer_on_nvme_cannot_be_checkpointed():
    plan = make_plan(cluster="cpu:2", dp=2, zero_stage=3, offload_optimizer="nvme")
    with pytest.raises(CheckpointError, match="silently returns the initial weights"):
        check_checkpointing(plan, "deepspeed")
    check_checkpointing(plan, "torch")  # the torch backend refuses NVMe states itself, in build_torch_config
    check_checkpointing(make_plan(cluster="cpu:2", dp=2, zero_stage=3, offload_optimizer="cpu"), "deepspeed")


def test_torch_resumes_under_other_degrees_deepspeed_only_under_the_same(tmp_path):
    _save(tmp_path, 2, make_plan(cluster="cpu:2", dp=2), "torch")
    assert check_resumable(tmp_path, make_plan(cluster="cpu:2", pp=2), "torch").step == 2

    ds_run = tmp_path / "ds"
    _save(ds_run, 2, make_plan(cluster="cpu:2", dp=2, zero_stage=1), "deepspeed")
    assert check_resumable(ds_run, make_plan(cluster="cpu:2", dp=2, zero_stage=1), "deepspeed").step == 2
    with pytest.raises(CheckpointError) as err:
        check_resumable(ds_run, make_plan(cluster="cpu:2", pp=2), "deepspeed")
    message = str(err.value)
    assert "dp: checkpoint 2, plan 1" in message and "pp: checkpoint 1, plan 2" in message
    assert "universal checkpoint" in message and "--strategy dp=2,tp=1,pp=1,zero=1," in message


def test_a_checkpoint_of_another_backend_model_or_training_setup_is_refused(tmp_path):
    plan = make_plan(cluster="cpu:1")
    _save(tmp_path, 2, plan, "torch")
    with pytest.raises(CheckpointError, match="written by the torch backend; the deepspeed backend cannot load"):
        check_resumable(tmp_path, plan, "deepspeed")
    with pytest.raises(CheckpointError, match="another model .*name: checkpoint 'llama-tiny', plan 'llama-small'"):
        check_resumable(tmp_path, make_plan(model="llama-small", cluster="cpu:1"), "torch")
    warm = plan.model_copy(update={"train": plan.train.model_copy(update={"warmup_steps": 5})})
    with pytest.raises(CheckpointError, match="warmup_steps: checkpoint 0, plan 5"):
        check_resumable(tmp_path, warm, "torch")


def test_warmup_is_linear_from_lr_over_warmup_steps_to_lr():
    # By hand, warmup_steps = 4: steps 0..3 at 1/4, 2/4, 3/4, 4/4 of lr, then lr.
    plan = make_plan(cluster="cpu:1", lr=1e-3)
    plan = plan.model_copy(update={"train": plan.train.model_copy(update={"warmup_steps": 4})})
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=plan.train.lr)
    scheduler = build_lr_scheduler(optimizer, plan)
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.25e-3, 0.5e-3, 0.75e-3, 1e-3, 1e-3, 1e-3], rel=1e-12)


def test_constant_lr_without_warmup():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build_lr_scheduler(optimizer, make_plan(cluster="cpu:1", lr=1e-3))
    for _ in range(3):
        assert optimizer.param_groups[0]["lr"] == 1e-3
        optimizer.step()
        scheduler.step()


def test_metrics_are_appended_with_the_restart_count(tmp_path, monkeypatch):
    plan = make_plan(cluster="cpu:1")
    (tmp_path / METRICS_FILE).write_text('{"step": 0, "loss": 5.0, "restart": 0}\n')
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    MetricsWriter(tmp_path, plan, torch.device("cpu")).log(0, 4.0, 0.5)
    rows = [json.loads(line) for line in (tmp_path / METRICS_FILE).read_text().splitlines()]
    assert [(r["step"], r["loss"], r["restart"]) for r in rows] == [(0, 5.0, 0), (0, 4.0, 1)]
    monkeypatch.delenv("TORCHELASTIC_RESTART_COUNT")
    MetricsWriter(tmp_path, plan, torch.device("cpu")).log(1, 3.0, 0.5)
    assert json.loads((tmp_path / METRICS_FILE).read_text().splitlines()[-1])["restart"] == 0


def test_checkpoint_dir_layout(tmp_path):
    assert checkpoint_dir(tmp_path, 12) == tmp_path / "checkpoints" / "step_00000012"
