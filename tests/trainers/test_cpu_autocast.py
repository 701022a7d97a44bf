"""nnUNet_kd_autocast=bf16 on the CPU, for every trainer family of the package: the networks' convolutions run
in bfloat16 under autocast, the losses read float32 logits, the steps stay finite; unset, nothing changes.
nnUNetv2_train refuses an unknown value before writing anything and logs the precision of a bf16 run."""
from __future__ import annotations

import functools
import math
from typing import Dict, List

import pytest
import torch
from torch import nn

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kd.trainers.nnUNetTrainerBudget import nnUNetTrainerBudget
from nnunet_kd.trainers.nnUNetTrainerMGSD import nnUNetTrainerMGSD, nnUNetTrainerModalityDropout
from nnunet_kd.trainers.nnUNetTrainerMTCMKD import nnUNetTrainerMTCMKD
from nnunet_kd.trainers.nnUNetTrainerMTCMKD_variants import nnUNetTrainerMTCMKD_MultimodalTeacher
from nnunet_kd.training.features import unwrap_network
from nnunet_kd.training.precision import AUTOCAST_ENV, cpu_has_native_bf16

pytestmark = pytest.mark.slow
#: Where bf16 would be emulated (x86 without AVX512-BF16 or AMX) the trainers refuse it: the bf16 steps are tested
#: where they run (the refusal everywhere, in tests/training/test_precision.py and below). Emulated, these steps
#: took minutes each.
needs_native_bf16 = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bfloat16: "
                                       "nnUNet_kd_autocast=bf16 is refused here")

TRAINERS = [nnUNetTrainerBudget, nnUNetTrainerMTCMKD, nnUNetTrainerMTCMKD_MultimodalTeacher, nnUNetTrainerMGSD,
            nnUNetTrainerModalityDropout]


def _spy(trainer) -> Dict[str, List]:
    """Record, per call, the first convolution's output dtype and CPU autocast state, and the dtype of the logits
    each segmentation loss call reads (nnU-Net's per-level loss inside its deep-supervision wrapper)."""
    seen: Dict[str, List] = {"conv": [], "loss": []}
    conv = next(m for m in unwrap_network(trainer.network).modules() if isinstance(m, nn.Conv3d))
    conv.register_forward_hook(lambda m, a, out: seen["conv"].append((out.dtype, torch.is_autocast_enabled("cpu"))))
    trainer.loss.loss.register_forward_pre_hook(lambda m, args: seen["loss"].append(args[0].dtype))
    return seen


def _train_step(trainer, batch) -> float:
    trainer.on_train_epoch_start()
    if isinstance(trainer, nnUNetTrainerMTCMKD):
        trainer.current_epoch = trainer.kd_start_epoch  # with the KL terms on:
        trainer.kd_region_weights.fill_(0.1)  # every teacher and region, as after a validation they lead
        trainer.cdsfl_region_weights.fill_(0.03)
    return float(trainer.train_step(batch)["loss"])


@needs_native_bf16
@pytest.mark.parametrize("trainer_class", TRAINERS, ids=lambda c: c.__name__)
def test_bf16_steps_run_under_cpu_autocast_with_float32_losses(monkeypatch, brats_dataset, load_trainer,
                                                               synthetic_batch, trainer_class):
    monkeypatch.setenv(AUTOCAST_ENV, "bf16")
    trainer = load_trainer(brats_dataset, trainer_class)
    seen = _spy(trainer)
    batch = synthetic_batch(trainer)
    assert math.isfinite(_train_step(trainer, batch))
    assert seen["conv"] and all(s == (torch.bfloat16, True) for s in seen["conv"])
    assert seen["loss"] and all(d == torch.float32 for d in seen["loss"])  # student and teacher/CDSFL logits
    assert all(p.dtype == torch.float32 for p in trainer.network.parameters())  # master weights stay fp32

    seen["conv"].clear(), seen["loss"].clear()
    trainer.on_validation_epoch_start()
    result = trainer.validation_step(batch)
    assert math.isfinite(float(result["loss"]))
    assert seen["conv"] and all(s == (torch.bfloat16, True) for s in seen["conv"])
    assert seen["loss"] and all(d == torch.float32 for d in seen["loss"])


@pytest.mark.parametrize("trainer_class", [nnUNetTrainerBudget, nnUNetTrainerMTCMKD], ids=lambda c: c.__name__)
@pytest.mark.parametrize("value", [None, ""])
def test_unset_or_empty_keeps_fp32(monkeypatch, brats_dataset, load_trainer, synthetic_batch, trainer_class, value):
    if value is None:
        monkeypatch.delenv(AUTOCAST_ENV, raising=False)
    else:
        monkeypatch.setenv(AUTOCAST_ENV, value)
    trainer = load_trainer(brats_dataset, trainer_class)
    seen = _spy(trainer)
    assert math.isfinite(_train_step(trainer, synthetic_batch(trainer)))
    assert seen["conv"] and all(s == (torch.float32, False) for s in seen["conv"])
    assert all(d == torch.float32 for d in seen["loss"])


@needs_native_bf16
def test_bf16_with_the_network_compiled(monkeypatch, brats_dataset, load_trainer, synthetic_batch):
    """nnU-Net compiles its network (never on the CPU, so forced here, with the aot_eager backend as in
    test_compiled_trainers.py): the float32 cast of the outputs is traced with the network."""
    monkeypatch.setenv(AUTOCAST_ENV, "bf16")
    monkeypatch.setattr(nnUNetTrainer, "_do_i_compile", lambda self: True)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    try:
        trainer = load_trainer(brats_dataset, nnUNetTrainerBudget)
        assert isinstance(trainer.network, torch._dynamo.OptimizedModule)
        seen = _spy(trainer)
        batch = synthetic_batch(trainer)
        assert math.isfinite(_train_step(trainer, batch))
        assert seen["conv"] and all(s == (torch.bfloat16, True) for s in seen["conv"])  # hooks traced by Dynamo
        assert seen["loss"] and all(d == torch.float32 for d in seen["loss"])
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the compiled network's outputs leave autocast float32
            outputs = trainer.network(batch["data"])
        assert all(o.dtype == torch.float32 for o in outputs)
    finally:
        torch._dynamo.reset()


def _results_env(brats_dataset, tmp_path, value: str) -> Dict[str, str]:
    """The session's data, results in a fresh folder (so the test sees exactly what its command wrote)."""
    return dict(brats_dataset["env"], nnUNet_results=str(tmp_path / "results"), **{AUTOCAST_ENV: value})


@pytest.mark.parametrize("value", ["fp16", "abc"])
def test_nnunetv2_train_refuses_an_unknown_value_before_writing(brats_dataset, tmp_path, run_cmd, bin_path,
                                                                dataset_id, value):
    proc = run_cmd([bin_path("nnUNetv2_train"), str(dataset_id), "3d_fullres", "all", "-tr", "nnUNetTrainerBudget",
                    "-device", "cpu"], _results_env(brats_dataset, tmp_path, value), check=False, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{AUTOCAST_ENV}={value!r}" in errors[0] and "'bf16'" in errors[0], proc.stderr
    results = tmp_path / "results"
    assert not results.exists() or not any(p.is_file() for p in results.rglob("*"))


def test_nnunetv2_train_bf16_logs_its_precision(brats_dataset, tmp_path, run_cmd, bin_path, dataset_id):
    proc = run_cmd([bin_path("nnUNetv2_train"), str(dataset_id), "3d_fullres", "all", "-tr", "nnUNetTrainerBudget",
                    "-device", "cpu"], _results_env(brats_dataset, tmp_path, "bf16"), check=False, timeout=600)
    if not cpu_has_native_bf16():  # refused before nnU-Net writes anything
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: {AUTOCAST_ENV}=bf16: this CPU has no native "
                                                         "bfloat16") and f"Unset {AUTOCAST_ENV}" in errors[0]
        results = tmp_path / "results"
        assert not results.exists() or not any(p.is_file() for p in results.rglob("*"))
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = list((tmp_path / "results").rglob("fold_all/training_log_*.txt"))
    assert len(logs) == 1
    text = logs[0].read_text()
    assert text.count("precision: bf16 autocast on the CPU (nnUNet_kd_autocast=bf16)") == 1, text[-3000:]
    assert (logs[0].parent / "checkpoint_final.pth").is_file()
