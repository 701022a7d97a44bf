"""Checkpoints under faults, on the real trainers: each is written whole through a temporary file and a
rename, and ``--c`` on a 0-byte, truncated or section-less checkpoint continues from the newest intact one
with a warning in the training log."""
from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch

from nnunet_kd.trainers.nnUNetTrainerMGSD import nnUNetTrainerMGSD
from nnunet_kd.trainers.nnUNetTrainerMTCMKD import nnUNetTrainerMTCMKD

SECTIONS = {nnUNetTrainerMTCMKD: "kd_state", nnUNetTrainerMGSD: "mgsd_state"}


def _zero(path):
    open(path, "wb").close()


def _truncate(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def _drop_section(section):
    def drop(path):
        checkpoint = torch.load(path, weights_only=False)
        del checkpoint[section]
        torch.save(checkpoint, path)  # what a kill between nnU-Net's write and the plugin's rewrite left
    return drop


@pytest.fixture(scope="module", params=list(SECTIONS), ids=lambda c: c.__name__)
def trainer_with_checkpoints(request, brats_dataset, load_trainer, tmp_path_factory):
    """A trainer with checkpoint_best.pth written at epoch 2 and checkpoint_latest.pth at epoch 4 (nnU-Net
    records the epoch to continue with: 3 and 5)."""
    trainer = load_trainer(brats_dataset, request.param)
    folder = tmp_path_factory.mktemp("checkpoints")
    for epoch, name in ((2, "checkpoint_best.pth"), (4, "checkpoint_latest.pth")):
        trainer.current_epoch = epoch
        trainer.save_checkpoint(str(folder / name))
    return trainer, folder, SECTIONS[request.param]


def _load(trainer, path):
    trainer.current_epoch = -1
    trainer.load_checkpoint(str(path))
    return trainer.current_epoch


def test_checkpoints_are_whole_with_the_section(trainer_with_checkpoints):
    trainer, folder, section = trainer_with_checkpoints
    assert sorted(os.listdir(folder)) == ["checkpoint_best.pth", "checkpoint_latest.pth"]  # no temporary files
    for name, epoch in (("checkpoint_best.pth", 3), ("checkpoint_latest.pth", 5)):
        checkpoint = torch.load(str(folder / name), weights_only=False)
        assert checkpoint["current_epoch"] == epoch and section in checkpoint and "network_weights" in checkpoint
    assert _load(trainer, folder / "checkpoint_latest.pth") == 5


@pytest.mark.parametrize("damage", ["zero", "truncate", "drop_section"])
def test_continue_falls_back_to_the_newest_intact_checkpoint(trainer_with_checkpoints, tmp_path, damage):
    trainer, folder, section = trainer_with_checkpoints
    work = tmp_path / "fold"
    work.mkdir()
    for name in ("checkpoint_best.pth", "checkpoint_latest.pth"):
        (work / name).write_bytes((folder / name).read_bytes())
    latest = work / "checkpoint_latest.pth"
    {"zero": _zero, "truncate": _truncate, "drop_section": _drop_section(section)}[damage](str(latest))
    assert _load(trainer, latest) == 3  # continued from checkpoint_best.pth
    with open(trainer.log_file) as f:
        log = f.read()
    assert "WARNING" in log and f"{latest}" in log and str(work / "checkpoint_best.pth") in log

    _zero(str(work / "checkpoint_best.pth"))
    with pytest.raises(RuntimeError, match="checkpoint_latest.pth.*no other checkpoint in its folder is intact"):
        _load(trainer, latest)


def test_a_failed_write_leaves_the_previous_checkpoint(trainer_with_checkpoints, tmp_path, monkeypatch):
    """A crash while the checkpoint is being written (here: an unpicklable state) leaves the previous file."""
    trainer, folder, section = trainer_with_checkpoints
    target = tmp_path / "checkpoint_latest.pth"
    target.write_bytes((folder / "checkpoint_latest.pth").read_bytes())
    state = trainer.checkpoint_state()
    monkeypatch.setattr(trainer, "checkpoint_state", lambda: {**state, "broken": lambda: None})
    trainer.current_epoch = 9
    # Python 3.11 raises AttributeError for a local object, later versions PicklingError
    with pytest.raises((AttributeError, pickle.PicklingError), match="Can't pickle local object"):
        trainer.save_checkpoint(str(target))
    assert os.listdir(tmp_path) == ["checkpoint_latest.pth"]
    assert torch.load(str(target), weights_only=False)["current_epoch"] == 5


def test_the_distillation_log_is_saved_and_restored(trainer_with_checkpoints):
    """``--c`` restores the per-epoch log; MTCM-KD checkpoints written before both trainers shared the log
    (distillation_log.py) kept it under "kd_history", which is still read."""
    trainer, _, section = trainer_with_checkpoints
    log = [{"epoch": 0, "gradient_share": {"supervised": 1.0}}, {"epoch": 1, "gradient_share": {"supervised": 0.9}}]
    saved = trainer.distillation_log
    try:
        trainer.distillation_log = copy.deepcopy(log)
        state = copy.deepcopy(trainer.checkpoint_state())
        assert state["distillation_log"] == log and "kd_history" not in state
        trainer.distillation_log = []
        trainer.load_checkpoint_state(copy.deepcopy(state))
        assert trainer.distillation_log == log
        if section == "kd_state":
            old = {("kd_history" if k == "distillation_log" else k): v for k, v in state.items()}
            trainer.distillation_log = []
            trainer.load_checkpoint_state(copy.deepcopy(old))
            assert trainer.distillation_log == log
            del old["kd_history"]
            with pytest.raises(RuntimeError, match="'kd_state' section has no distillation log"):
                trainer.load_checkpoint_state(old)
        else:
            del state["distillation_log"]
            with pytest.raises(RuntimeError, match=r"MGSD section lacks \['distillation_log'\]"):
                trainer.load_checkpoint_state(state)
    finally:
        trainer.distillation_log = saved
