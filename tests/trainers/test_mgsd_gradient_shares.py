"""MGSD's per-term gradient shares: measured on a subset of steps, logged, written per epoch, side-effect free."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from nnunet_kd.trainers.nnUNetTrainerMGSD import nnUNetTrainerMGSD
from nnunet_kd.trainers.nnUNetTrainerMGSD_variants import nnUNetTrainerMGSD_adv
from nnunet_kd.training.distillation_log import DISTILLATION_LOG


@pytest.mark.parametrize("cls, share_at", [(nnUNetTrainerMGSD, "parameters"), (nnUNetTrainerMGSD_adv, "bottleneck")])
def test_shares_measured_logged_and_written(brats_dataset, load_trainer, synthetic_batch, cls, share_at,
                                            monkeypatch):
    monkeypatch.setattr(cls, "gradient_share_interval", 2)
    monkeypatch.setattr(cls, "gradient_share_at", share_at)
    monkeypatch.setattr(cls, "distillation_rampup_epochs", 0)  # full weights from epoch 0
    trainer = load_trainer(brats_dataset, cls)
    log_path = os.path.join(trainer.output_folder, DISTILLATION_LOG)
    if os.path.exists(log_path):
        os.remove(log_path)
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(synthetic_batch(trainer, seed=s)) for s in range(3)]
    assert trainer.gradient_shares._count == 2  # steps 0 and 2 of the epoch
    trainer.on_train_epoch_end(outputs)
    trainer.write_distillation_log()  # what on_epoch_end does first
    history = json.loads(open(log_path).read())
    assert [entry["epoch"] for entry in history] == [trainer.current_epoch]
    entry = history[0]
    assert set(entry["gradient_share"]) == set(entry["gradient_norm"]) == set(cls.loss_term_names)
    assert sum(entry["gradient_share"].values()) == pytest.approx(1.0)
    # every term the network learns from has a gradient; the modality-level probe (weight 0) has none
    assert all(entry["gradient_norm"][name] > 0 for name in cls.loss_term_names if name != "modality")
    assert entry["gradient_norm"]["modality"] == 0
    # the cap holds the distillation terms to at most 0.3 of the gradient norms
    assert 1 - entry["gradient_share"]["supervised"] <= 0.3 + 1e-6
    clip = entry["clip"]
    assert entry["distillation_ramp"] == 1.0 and clip["max_norm"] == pytest.approx(12 / 0.7)
    assert 0 < clip["ratio_mean"] <= clip["ratio_max"] and 0 <= clip["clipped_fraction"] <= 1
    assert 0 < clip["distillation_scale_min"] <= clip["distillation_scale_mean"] <= 1
    assert entry["gradient_measured_at"] == share_at and entry["ema_updates"] == 3
    assert entry["ema_momentum"] == pytest.approx(2 / 3)  # the third update (s = 2): 1 - 1/3
    assert entry["loss_weights"]["modality"] == cls.modality_kd_weight
    with open(trainer.log_file) as f:
        text = f.read()
    assert f"MGSD gradient shares at the network's {share_at}: supervised" in text
    assert f"clip ratio (grad norm / {12 / 0.7:.3g}) mean {clip['ratio_mean']:.3g}, max {clip['ratio_max']:.3g}" in text
    assert trainer.distillation_log == history


def _state(trainer):
    return copy.deepcopy({"network": trainer.network.state_dict(), "aux": trainer.aux_modules.state_dict(),
                          "ema": trainer.ema_network.state_dict(), "opt": trainer.optimizer.state_dict(),
                          "aux_opt": trainer.aux_optimizer.state_dict()})


def _restore(trainer, state):
    state = copy.deepcopy(state)  # optimizer.load_state_dict keeps the given tensors, and steps change them in place
    trainer.network.load_state_dict(state["network"])
    trainer.aux_modules.load_state_dict(state["aux"])
    trainer.ema_network.load_state_dict(state["ema"])
    trainer.optimizer.load_state_dict(state["opt"])
    trainer.aux_optimizer.load_state_dict(state["aux_opt"])


def test_measuring_does_not_change_the_step(brats_dataset, load_trainer, synthetic_batch):
    trainer = load_trainer(brats_dataset, nnUNetTrainerMGSD)
    trainer.on_train_epoch_start()
    trainer.train_step(synthetic_batch(trainer, seed=0))  # optimiser state exists from here on
    before, batch = _state(trainer), synthetic_batch(trainer, seed=1)
    results = []
    for measured in (True, False):
        _restore(trainer, before)
        trainer.ema_step, trainer._epoch_step = 1, 0 if measured else 1
        trainer.gradient_shares.reset()
        torch.manual_seed(123)  # same modality masks
        loss = trainer.train_step(batch)["loss"]
        assert trainer.gradient_shares._count == int(measured)
        results.append((loss, _state(trainer)))
    (loss_a, a), (loss_b, b) = results
    assert loss_a == loss_b
    for part in ("network", "aux", "ema"):
        for name, value in a[part].items():
            assert torch.equal(value, b[part][name]), (part, name)
