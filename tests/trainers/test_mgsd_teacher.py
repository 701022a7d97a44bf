"""MGSD's EMA teacher: hook-free by construction (issue 10, item 3) and warmed up from a copy."""
from __future__ import annotations

import torch

from nnunet_kd.training.features import unwrap_network
from nnunet_kd.trainers.nnUNetTrainerMGSD import nnUNetTrainerMGSD


def _hooks(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def test_ema_network_has_no_hooks_and_leaves_the_students_features_alone(brats_dataset, load_trainer,
                                                                         synthetic_batch):
    trainer = load_trainer(brats_dataset, nnUNetTrainerMGSD)
    assert _hooks(unwrap_network(trainer.network)) > 0  # the student's FeatureTap
    assert _hooks(trainer.ema_network) == 0
    data = synthetic_batch(trainer, seed=0)["data"]
    student = unwrap_network(trainer.network)
    with torch.no_grad():
        student(data)
        trainer.ema_network(torch.flip(data, dims=(2,)))  # another input, through the EMA's own forward
        ema_out, ema_bottleneck = trainer._ema_forward(torch.flip(data, dims=(2,)))
        features = trainer.tap.take()
        expected_bottleneck = student.encoder(data)[-1]
    assert torch.allclose(features["bottleneck"], expected_bottleneck, atol=1e-6)
    assert not torch.allclose(ema_bottleneck, expected_bottleneck, atol=1e-3)
    assert len(ema_out) == len(trainer._get_deep_supervision_scales())


def test_first_update_makes_the_ema_the_network(brats_dataset, load_trainer, synthetic_batch):
    trainer = load_trainer(brats_dataset, nnUNetTrainerMGSD)
    trainer.on_train_epoch_start()
    assert trainer.ema_step == 0
    with torch.no_grad():  # make the EMA differ from the network, as it would after a --c
        for p in trainer.ema_network.parameters():
            p.add_(1.0)
    trainer.train_step(synthetic_batch(trainer, seed=1))
    assert trainer.ema_step == 1
    network = unwrap_network(trainer.network).state_dict()
    for name, value in trainer.ema_network.state_dict().items():
        assert torch.equal(value, network[name]), name
