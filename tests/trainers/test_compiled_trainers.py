"""The KD trainers with compilation on, as nnU-Net would have it on CUDA: every U-Net is compiled, the
tapped features of the compiled networks equal the eager ones, and a training step runs.

nnU-Net never compiles on CPU, so its decision (``_do_i_compile``) is forced here, and torch.compile
uses the aot_eager backend (Dynamo and AOTAutograd, no C++ build) to keep the test short; the inductor
path is checked on a small U-Net in tests/training/test_compiled_features.py.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch._dynamo import OptimizedModule

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kd.trainers.nnUNetTrainerMGSD import nnUNetTrainerMGSD
from nnunet_kd.trainers.nnUNetTrainerMTCMKD import nnUNetTrainerMTCMKD
from nnunet_kd.training.features import unwrap_network


@pytest.fixture
def compile_forced(monkeypatch):
    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: True)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    yield
    torch._dynamo.reset()


def _assert_features_equal(compiled, eager) -> None:
    assert set(compiled["decoder"]) == set(eager["decoder"]) and compiled["decoder"]
    for level, feature in eager["decoder"].items():
        torch.testing.assert_close(compiled["decoder"][level], feature, atol=1e-4, rtol=1e-4)
        assert compiled["decoder"][level].grad_fn is not None
    if "bottleneck" in eager:
        torch.testing.assert_close(compiled["bottleneck"], eager["bottleneck"], atol=1e-4, rtol=1e-4)


def test_mgsd_compiles_network_and_ema(compile_forced, brats_dataset, load_trainer, synthetic_batch):
    trainer = load_trainer(brats_dataset, nnUNetTrainerMGSD)
    assert isinstance(trainer.network, OptimizedModule)  # nnU-Net's own compile, no longer vetoed
    # the EMA network runs as encoder + decoder: both compile in place, so its state_dict keys are unchanged
    assert all(m._compiled_call_impl is not None for m in (trainer.ema_network.encoder, trainer.ema_network.decoder))
    assert not any(k.startswith("_orig_mod") for k in trainer.ema_network.state_dict())
    data = synthetic_batch(trainer, seed=3)["data"]
    compiled_out = trainer.network(data)
    compiled_features = trainer.tap.take()
    eager_out = unwrap_network(trainer.network)(data)  # the same weights and hooks, run eagerly
    _assert_features_equal(compiled_features, trainer.tap.take())
    torch.testing.assert_close(compiled_out[0], eager_out[0], atol=1e-4, rtol=1e-4)
    trainer.on_train_epoch_start()
    assert math.isfinite(float(trainer.train_step(synthetic_batch(trainer))["loss"]))


def test_mtcmkd_compiles_student_and_teachers(compile_forced, brats_dataset, load_trainer, synthetic_batch):
    trainer = load_trainer(brats_dataset, nnUNetTrainerMTCMKD)
    assert isinstance(trainer.network, OptimizedModule)
    assert trainer.teachers and all(t._compiled_call_impl is not None for t in trainer.teachers)
    data = synthetic_batch(trainer, seed=3)["data"]
    for teacher, tap, channels in zip(trainer.teachers, trainer.teacher_taps, trainer.teacher_channels):
        compiled_out = teacher(data[:, channels])
        compiled_features = tap.take()
        eager_out = teacher._call_impl(data[:, channels])  # the module's eager call, bypassing the compiled one
        _assert_features_equal(compiled_features, tap.take())
        torch.testing.assert_close(compiled_out[0], eager_out[0], atol=1e-4, rtol=1e-4)
    trainer.on_train_epoch_start()
    trainer.current_epoch = trainer.kd_start_epoch  # with the distillation terms on:
    trainer.kd_region_weights.fill_(0.1)  # every teacher and region, as after a validation they lead
    trainer.cdsfl_region_weights.fill_(0.03)
    assert math.isfinite(float(trainer.train_step(synthetic_batch(trainer))["loss"]))
