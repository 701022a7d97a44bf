"""MGSD's distillation terms cannot shrink the supervised step through nnU-Net's gradient clipping (issue 22)."""
from __future__ import annotations

import pytest
import torch

from nnunet_kd.trainers.nnUNetTrainerMGSD import nnUNetTrainerMGSD


def _one_step(trainer, batch, state, weight: float):
    """One train step from ``state`` with image and feature weights ``weight`` at full ramp: (clip ratio,
    supervised gradient norm, cap factor)."""
    trainer.network.load_state_dict(state)
    trainer.image_kd_weight = trainer.feature_kd_weight = weight
    trainer.on_train_epoch_start()
    torch.manual_seed(0)  # same masks
    trainer.train_step(batch)
    supervised_norm = float(trainer.gradient_shares._sums[0])  # measured on the epoch's first step
    return float(trainer.clip_stats.stats["ratio_sum"]), supervised_norm, trainer.distillation_scale


@pytest.mark.parametrize("weight", [1e3, 1e5])
def test_huge_distillation_weights_leave_the_supervised_step_unclipped(brats_dataset, load_trainer, synthetic_batch,
                                                                       monkeypatch, weight):
    monkeypatch.setattr(nnUNetTrainerMGSD, "distillation_rampup_epochs", 0)
    trainer = load_trainer(brats_dataset, nnUNetTrainerMGSD)
    state = {k: v.clone() for k, v in trainer.network.state_dict().items()}
    batch = synthetic_batch(trainer, seed=3)
    ratio_off, supervised_off, scale_off = _one_step(trainer, batch, state, 0.0)
    ratio_on, supervised_on, scale_on = _one_step(trainer, batch, state, weight)
    assert supervised_on == pytest.approx(supervised_off, rel=1e-4) and supervised_off < 12
    # distillation off: nnU-Net's clipping at 12 does not act (the supervised norm is below 12) ...
    assert scale_off == 1.0 and ratio_off == pytest.approx(supervised_off / 12, rel=1e-3) and ratio_off < 1
    # ... and with the distillation weighted a thousandfold or more it does not act either: the cap brings the
    # distillation gradient into the band, so the clip factor is 1 in both steps
    assert scale_on < 1 and ratio_on <= 1
    # the total norm is within the band's bound, supervised / (1 - 0.3)
    assert ratio_on * 12 / 0.7 <= supervised_on / 0.7 * (1 + 1e-4)
