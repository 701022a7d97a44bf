"""Every trainer the package ships, trained through the real ``nnUNetv2_train`` with compilation on, as
nnU-Net has it on CUDA: two epochs of several iterations, validation, the final validation, and no
recompilation after the first epoch.

nnU-Net never compiles on the CPU, so a ``sitecustomize`` module (loaded by every Python process through
PYTHONPATH) forces ``_do_i_compile`` to True and gives torch.compile a CPU backend: aot_eager (Dynamo and
AOTAutograd) for every trainer, inductor as well for the two methods' defaults when a C++ compiler exists.
The small plans of tests/conftest.py (16^3 patches, three stages) keep this affordable.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
from pathlib import Path

import pytest

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

pytestmark = pytest.mark.slow

EPOCHS, ITERATIONS = 2, 3

FORCE_COMPILE = '''
import functools, os
_backend = os.environ.get("NNUNET_KD_TEST_COMPILE_BACKEND")
if _backend:
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    nnUNetTrainer._do_i_compile = lambda self: True
    torch.compile = functools.partial(torch.compile, backend=_backend)
'''


def shipped_trainers() -> list[str]:
    """Every nnU-Net trainer class defined in nnunet_kd/trainers/ (new variants are picked up here)."""
    import nnunet_kd.trainers

    names = []
    for module_info in pkgutil.iter_modules(nnunet_kd.trainers.__path__):
        module = importlib.import_module(f"nnunet_kd.trainers.{module_info.name}")
        names += [name for name, cls in inspect.getmembers(module, inspect.isclass)
                  if issubclass(cls, nnUNetTrainer) and cls.__module__ == module.__name__]
    return sorted(names)


def _cxx_compiler() -> str | None:
    return next(filter(None, (shutil.which(c) for c in ("g++", "c++", "clang++"))), None)


@pytest.fixture(scope="module")
def compile_setup(brats_dataset, small_plans, nnunet_env, tmp_path_factory) -> dict:
    from nnunet_kd.experiments.benchmark.measure import make_frozen_teachers

    root = tmp_path_factory.mktemp("compiled")
    teachers, _ = make_frozen_teachers(str(root), small_plans["plans"], brats_dataset["dataset_json"], "3d_fullres",
                                       "multimodal", (0, 1, 2))
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FORCE_COMPILE)
    env = nnunet_env(brats_dataset["root"], num_epochs=EPOCHS, num_iterations_per_epoch=ITERATIONS,
                     num_val_iterations_per_epoch=2)
    env.update(nnUNet_results=str(root / "results"), nnUNet_kd_teachers=os.pathsep.join(teachers),
               PYTHONPATH=os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH", "")])))
    return {"env": env, "results": root / "results", "plans": small_plans["name"]}


def _train_compiled(compile_setup, run_cmd, bin_path, dataset_id, trainer: str, backend: str) -> Path:
    env = dict(compile_setup["env"], NNUNET_KD_TEST_COMPILE_BACKEND=backend,
               nnUNet_results=str(compile_setup["results"] / backend))
    run_cmd([bin_path("nnUNetv2_train"), str(dataset_id), "3d_fullres", "0", "-tr", trainer, "-p", compile_setup["plans"],
             "-device", "cpu"], env, timeout=1800)
    return next((compile_setup["results"] / backend).glob(f"Dataset*/{trainer}__{compile_setup['plans']}__3d_fullres/fold_0"))


def _assert_trained_compiled_without_recompiling(fold: Path, trainer: str) -> None:
    log = "\n".join(p.read_text() for p in sorted(fold.glob("training_log_*.txt")))
    assert "Using torch.compile" in log
    counts = re.findall(r"torch\.compile: (\d+) graphs compiled by the end of epoch 0", log)
    assert len(counts) == 1 and int(counts[0]) > 0, log[-3000:]
    assert "recompiled" not in log, log[-3000:]
    assert (fold / "checkpoint_final.pth").is_file()
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert summary["metric_per_case"], "the final validation predicted no case"
    if trainer.startswith(("nnUNetTrainerMTCMKD", "nnUNetTrainerMGSD")):
        epochs = [e["epoch"] for e in json.loads((fold / "distillation_log.json").read_text())]
        assert epochs == list(range(EPOCHS))


@pytest.mark.parametrize("trainer", shipped_trainers())
def test_every_trainer_trains_two_epochs_compiled_aot_eager(compile_setup, run_cmd, bin_path, dataset_id, trainer):
    fold = _train_compiled(compile_setup, run_cmd, bin_path, dataset_id, trainer, "aot_eager")
    _assert_trained_compiled_without_recompiling(fold, trainer)


@pytest.mark.skipif(_cxx_compiler() is None, reason="inductor on CPU needs a C++ compiler (none found)")
@pytest.mark.parametrize("trainer", ["nnUNetTrainerMTCMKD", "nnUNetTrainerMGSD"])
def test_method_defaults_train_two_epochs_compiled_inductor(compile_setup, run_cmd, bin_path, dataset_id, trainer):
    fold = _train_compiled(compile_setup, run_cmd, bin_path, dataset_id, trainer, "inductor")
    _assert_trained_compiled_without_recompiling(fold, trainer)
