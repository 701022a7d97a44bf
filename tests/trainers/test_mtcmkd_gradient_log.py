"""MTCM-KD logs each student term's share of the gradient at the student's logits, per epoch."""
from __future__ import annotations

import json
import os

import pytest
import torch

from nnunet_kd.losses import STUDENT_TERMS
from nnunet_kd.trainers.nnUNetTrainerMTCMKD import nnUNetTrainerMTCMKD
from nnunet_kd.training.distillation_log import DISTILLATION_LOG


@pytest.fixture(scope="module")
def trainer(brats_dataset, load_trainer):
    return load_trainer(brats_dataset, nnUNetTrainerMTCMKD)


def _run_epoch(trainer, epoch, batches):
    trainer.current_epoch = epoch
    trainer.on_train_epoch_start()
    trainer.on_train_epoch_end([trainer.train_step(b) for b in batches])
    return trainer.distillation_log[-1]


def test_before_kd_starts_the_whole_gradient_is_supervised(trainer, synthetic_batch):
    batch = synthetic_batch(trainer, seed=5)
    # Known case: the logged norm is the norm of d(seg loss)/d(student logits) on this batch before the step.
    out = [o.float() for o in trainer.network(batch["data"][:, trainer.student_channels])]
    # (the lowest deep-supervision level may have weight 0 and get no gradient)
    expected = torch.autograd.grad(trainer.loss(out, batch["target"]), out, allow_unused=True)
    expected_norm = float(sum(g.pow(2).sum() for g in expected if g is not None)) ** 0.5
    record = _run_epoch(trainer, 0, [batch])
    assert record["gradient_share"] == {"supervised": 1.0, "response_kd": 0.0, "cdsfl_kd": 0.0}
    assert record["gradient_norm"]["supervised"] == pytest.approx(expected_norm, rel=1e-4)
    assert record["kd_weights"] is None


def test_shares_and_region_weights_logged_to_the_training_log_and_json(trainer, synthetic_batch):
    # weights as a validation would have set them: per teacher (T1, T2, FLAIR) and region (WT, TC, ET)
    trainer.kd_region_weights = torch.tensor([[0.1, 0.0, 0.05], [0.0, 0.0, 0.0], [0.15, 0.02, 0.0]], dtype=torch.float64)
    trainer.cdsfl_region_weights = torch.tensor([[1.0, 0.5, 0.0]], dtype=torch.float64)
    record = _run_epoch(trainer, 1, [synthetic_batch(trainer, seed=s) for s in (6, 7)])
    shares = record["gradient_share"]
    assert list(shares) == list(STUDENT_TERMS)
    assert all(0 < s < 1 for s in shares.values()) and sum(shares.values()) == pytest.approx(1.0)
    ramp = 0.1  # first KD epoch of a 10-epoch ramp
    assert record["kd_ramp"] == pytest.approx(ramp) and record["regions"] == ["whole tumor", "tumor core", "enhancing tumor"]
    used = record["kd_weights"]
    assert used["T1"] == pytest.approx([0.1 * ramp, 0.0, 0.05 * ramp]) and used["T2"] == [0.0, 0.0, 0.0]
    assert used["FLAIR"] == pytest.approx([0.15 * ramp, 0.02 * ramp, 0.0])
    assert used["cdsfl1"] == pytest.approx([0.03 * ramp, 0.015 * ramp, 0.0])  # 0.10 x 0.3 x factor x ramp
    trainer.write_distillation_log()
    path = os.path.join(trainer.output_folder, DISTILLATION_LOG)
    with open(path) as f:
        logged = json.load(f)
    assert logged[-1]["epoch"] == 1 and logged[-1]["gradient_share"] == pytest.approx(shares)
    assert logged[-1]["kd_weights"]["FLAIR"] == pytest.approx(used["FLAIR"])
    assert not [n for n in os.listdir(trainer.output_folder) if n.startswith(".") or n.endswith(".tmp")]
    with open(trainer.log_file) as f:
        log = f.read()
    assert "student gradient at its logits, share" in log and f"response_kd {shares['response_kd']:.3f}" in log
    assert 'KD weights this epoch (ramp 0.100): {"T1": [0.01, 0.0, 0.005]' in log
