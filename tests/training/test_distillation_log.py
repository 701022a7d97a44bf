"""The distillation log both KD trainers share: entries per epoch, written by rank 0 at the end of each epoch,
and kept in the checkpoint section (older MTCM-KD checkpoints: under "kd_history")."""
from __future__ import annotations

import json
import math

import pytest
import torch

from nnunet_kd.training.distillation_log import DISTILLATION_LOG, DistillationLogMixin, rounded


class _Base:
    """What the mixin needs of nnUNetTrainer."""

    def __init__(self, output_folder: str, local_rank: int = 0):
        self.output_folder, self.local_rank, self.current_epoch = output_folder, local_rank, 0
        self.calls = []

    def on_train_epoch_start(self):
        self.calls.append("train_start")

    def on_epoch_end(self):
        self.calls.append("epoch_end")


class _Trainer(DistillationLogMixin, _Base):
    loss_term_names = ("supervised", "kd")
    checkpoint_section = "test_state"


def test_entries_file_and_checkpoint(tmp_path):
    trainer = _Trainer(str(tmp_path))
    for epoch, norms in ((0, {"supervised": 3.0}), (1, {"supervised": 1.0, "kd": 3.0})):
        trainer.current_epoch = epoch
        trainer.on_train_epoch_start()
        trainer.gradient_shares.add(norms)
        shares = trainer.log_distillation_epoch(ramp=0.5 * epoch)
        trainer.update_distillation_epoch(val_dice=[0.8])
        trainer.on_epoch_end()
    # one entry per epoch; the meter was reset when each epoch started (epoch 1 does not average epoch 0)
    assert shares == {"norm": {"supervised": 1.0, "kd": 3.0}, "share": {"supervised": 0.25, "kd": 0.75}}
    assert trainer.distillation_log == [
        {"epoch": 0, "gradient_share": {"supervised": 1.0, "kd": 0.0}, "gradient_norm": {"supervised": 3.0, "kd": 0.0},
         "ramp": 0.0, "val_dice": [0.8]},
        {"epoch": 1, "gradient_share": {"supervised": 0.25, "kd": 0.75},
         "gradient_norm": {"supervised": 1.0, "kd": 3.0}, "ramp": 0.5, "val_dice": [0.8]}]
    assert trainer.calls == ["train_start", "epoch_end"] * 2  # the base class's hooks still run
    assert json.loads((tmp_path / DISTILLATION_LOG).read_text()) == trainer.distillation_log
    assert sorted(p.name for p in tmp_path.iterdir()) == [DISTILLATION_LOG]  # written whole, no temporary file
    # an epoch without an entry (validation only) is not touched
    trainer.current_epoch = 5
    trainer.update_distillation_epoch(val_dice=[0.1])
    assert [e["val_dice"] for e in trainer.distillation_log] == [[0.8], [0.8]]

    state = trainer.checkpoint_state()
    fresh = _Trainer(str(tmp_path))
    fresh.load_checkpoint_state({"distillation_log": state["distillation_log"]})
    assert fresh.distillation_log == trainer.distillation_log
    fresh.load_checkpoint_state({"kd_history": [{"epoch": 0}]})  # MTCM-KD checkpoints before the shared log
    assert fresh.distillation_log == [{"epoch": 0}]
    with pytest.raises(RuntimeError, match="'test_state' section has no distillation log"):
        fresh.load_checkpoint_state({})


def test_only_rank_0_writes(tmp_path):
    trainer = _Trainer(str(tmp_path), local_rank=1)
    trainer.on_train_epoch_start()
    trainer.log_distillation_epoch()
    trainer.on_epoch_end()
    assert len(trainer.distillation_log) == 1 and not (tmp_path / DISTILLATION_LOG).exists()


def test_rounded_makes_json_numbers():
    value = {"a": torch.tensor([0.123456, float("nan")]), "b": [1, 2.00004], "c": math.pi}
    assert rounded(value) == {"a": [0.1235, None], "b": [1.0, 2.0], "c": 3.1416}
    assert json.dumps(rounded(value))  # JSON-able
