"""MTCM-KD logs each student term's share of the gradient at the student's logits, per epoch."""
from __future__ import annotations

import json
import os

import pytest
import torch

from nnunet_kd.losses.mtcmkd_student import STUDENT_TERMS
from nnunet_kd.trainers.nnUNetTrainerMTCMKD import DISTILLATION_LOG, nnUNetTrainerMTCMKD


@pytest.fixture(scope="module")
def trainer(brats_dataset, load_trainer):
    return load_trainer(brats_dataset, nnUNetTrainerMTCMKD)


def _run_epoch(trainer, epoch, batches):
    trainer.current_epoch = epoch
    trainer.on_train_epoch_start()
    trainer.on_train_epoch_end([trainer.train_step(b) for b in batches])
    return trainer.kd_history[-1]


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


def test_shares_logged_to_the_training_log_and_json(trainer, synthetic_batch):
    weights = trainer.performance_weights.tolist()
    record = _run_epoch(trainer, 1, [synthetic_batch(trainer, seed=s) for s in (6, 7)])
    shares = record["gradient_share"]
    assert list(shares) == list(STUDENT_TERMS)
    assert all(0 < s < 1 for s in shares.values()) and sum(shares.values()) == pytest.approx(1.0)
    assert record["kd_weights"] == pytest.approx(weights) and sum(weights) == pytest.approx(trainer.kd_total_weight)
    trainer.write_distillation_log()
    path = os.path.join(trainer.output_folder, DISTILLATION_LOG)
    with open(path) as f:
        logged = json.load(f)
    assert logged[-1]["epoch"] == 1 and logged[-1]["gradient_share"] == pytest.approx(shares)
    assert not [n for n in os.listdir(trainer.output_folder) if n.startswith(".") or n.endswith(".tmp")]
    with open(trainer.log_file) as f:
        log = f.read()
    assert "student gradient at its logits, share" in log and f"response_kd {shares['response_kd']:.3f}" in log
