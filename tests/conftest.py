"""Shared fixtures: a small synthetic BraTS dataset converted and planned once per session, models trained
on it through the real nnU-Net commands, and helpers handed to tests as fixtures."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from nnunet_kd.experiments.runner import CommandFailed, nnunet_environment, run_command
from nnunet_kd.training.budget import budget_environment

#: The development data beside the repository (``../shared/data``); tests that need it skip without it.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DATASET_ID = 501
DATASET_NAME = "Dataset501_BraTS2021"
T1CE_DATASET_ID = 502


def _nnunet_env(root: Path, **budget: int) -> Dict[str, str]:
    """Environment for nnU-Net subprocesses: folders under ``root``, our trainers, a small CPU budget."""
    env = nnunet_environment(
        root, nnUNet_n_proc_DA=1, nnUNet_def_n_proc=1, nnUNet_compile=0, OMP_NUM_THREADS=2, PYTHONUNBUFFERED=1)
    env.pop("nnUNet_kd_teachers", None)
    env.update(budget_environment(**{"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
                                     **budget}))
    return env


def _run(cmd: List[str], env: Dict[str, str], check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a command; on failure show its output in the assertion message."""
    try:
        return run_command(cmd, env, capture=True, check=check, timeout=timeout)
    except CommandFailed as e:
        raise AssertionError(str(e)) from None


def _bin_path(name: str) -> str:
    """A console script of this virtual environment."""
    return str(Path(sys.executable).parent / name)


def _shared_data(name: str) -> Path:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"real data {folder} is not present (development data beside the repository)")
    return folder


#: Fixtures that run nnU-Net's or this package's commands, or that hand a test the means to run them (a console
#: script's path, the command runner; test_benchmark.py's toy_run trains): every test using one, directly or
#: through another fixture, is slow.
SLOW_FIXTURES = frozenset({"brats_dataset", "stock_model", "mgsd_model", "missing_modality_model", "run_cmd",
                           "bin_path", "toy_run"})

#: Slow tests without such a fixture (module -> test functions): they run a command of the package in a
#: subprocess, train (test_modality_collapse: 200 optimiser steps), start DDP processes or compile with inductor.
SLOW_TESTS: Dict[str, Tuple[str, ...]] = {
    "tests/conversion/test_convert_brats.py": ("test_cli_success", "test_cli_error_has_no_traceback",
                                               "test_cli_usage_errors"),
    "tests/conversion/test_convert_faults.py": ("test_killed_parent_stops_workers_and_next_run_cleans_up",),
    "tests/evaluation/test_evaluation.py": ("test_cli_end_to_end", "test_cli_errors",
                                            "test_truncated_file_is_a_clean_error"),
    "tests/evaluation/test_truncated_nifti.py": ("test_evaluate_rejects_a_prediction_cut_inside_gzip",),
    "tests/experiments/test_synthetic.py": ("test_cli",),
    "tests/losses/test_modality_collapse.py": ("test_heads_alone_drive_the_other_forms_to_zero",
                                               "test_fixed_target_stays_at_the_variance_of_its_teacher"),
    "tests/losses/test_mtcmkd_losses.py": ("test_tracker_all_reduce_two_processes",),
    "tests/losses/test_mtcmkd_region_kd.py": ("test_weights_identical_on_two_ranks_and_taken_from_the_summed_counts",),
    "tests/training/test_compiled_features.py": (
        "test_inductor_compiled_unet_matches_eager_outputs_features_and_gradients",),
    "tests/training/test_ddp_reductions.py": ("test_broadcast_average_gradients_and_ema_agree_across_ranks",),
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    """Mark as ``slow`` (pytest.ini) what ``-m "not slow"`` leaves out: SLOW_FIXTURES users and SLOW_TESTS."""
    root = Path(__file__).resolve().parents[1]
    for item in items:
        path = Path(str(item.fspath)).resolve()
        names = SLOW_TESTS.get(path.relative_to(root).as_posix(), ()) if path.is_relative_to(root) else ()
        for name in names:  # a renamed test would silently join the fast suite
            if not hasattr(item.module, name):
                raise pytest.UsageError(f"tests/conftest.py SLOW_TESTS names {path.name}::{name}, which that module "
                                        "does not define: update SLOW_TESTS")
        if SLOW_FIXTURES & set(item.fixturenames) or item.originalname in names:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def real_brats2018() -> Path:
    """``../shared/data/BraTS2018_2mm``: 33 real BraTS 2018 cases at 2 mm (skips when absent)."""
    return _shared_data("BraTS2018_2mm")


@pytest.fixture(scope="session")
def real_brats2021() -> Path:
    """``../shared/data/BraTS2021_sample``: 4 real BraTS 2021 cases at 1 mm (skips when absent)."""
    return _shared_data("BraTS2021_sample")


@pytest.fixture(scope="session")
def nnunet_env():
    """``nnunet_env(root, **budget)`` (budget: trainer attributes, e.g. num_epochs=2): environment for nnU-Net subprocesses with data folders under ``root``."""
    return _nnunet_env


@pytest.fixture(scope="session")
def run_cmd():
    """``run_cmd(cmd, env, check=True, timeout=900)``: run a command, AssertionError with its output on failure."""
    return _run


@pytest.fixture(scope="session")
def bin_path():
    """``bin_path(name)``: a console script of this virtual environment."""
    return _bin_path


@pytest.fixture(scope="session")
def dataset_id() -> int:
    return DATASET_ID


@pytest.fixture(scope="session")
def brats_dataset(tmp_path_factory) -> Dict[str, object]:
    """5 synthetic BraTS 2021 cases, converted (4-channel and T1ce-only) and planned + preprocessed (3d_fullres)."""
    from nnunet_kd.experiments.synthetic import generate_dataset

    root = tmp_path_factory.mktemp("nnunet")
    env = _nnunet_env(root)
    generate_dataset(str(root / "src"), 5, shape=(40, 40, 40), seed=0)
    _run([_bin_path("nnunet_kd_convert_brats"), "-i", str(root / "src"), "-d", str(DATASET_ID), "-np", "2"], env)
    _run([_bin_path("nnunet_kd_convert_brats"), "-i", str(root / "src"), "-d", str(T1CE_DATASET_ID),
         "--modalities", "T1ce", "-np", "2"], env)
    _run([_bin_path("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2"], env)
    raw = root / "raw" / DATASET_NAME
    return {"root": root, "env": env, "raw": raw, "t1ce_images": root / "raw" / "Dataset502_BraTS2021_T1ce" / "imagesTr",
            "preprocessed": root / "preprocessed" / DATASET_NAME, "results": root / "results" / DATASET_NAME,
            "dataset_json": json.loads((raw / "dataset.json").read_text())}


@pytest.fixture(scope="session")
def stock_model(brats_dataset) -> Path:
    """A stock nnU-Net model (nnUNetTrainer with a 1-epoch budget) trained on all four channels."""
    env = brats_dataset["env"]
    _run([_bin_path("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-tr", "nnUNetTrainerBudget",
         "-device", "cpu"], env)
    return brats_dataset["results"] / "nnUNetTrainerBudget__nnUNetPlans__3d_fullres"


def _load_trainer(brats_dataset, trainer_class, dataset_json: dict | None = None, plans: str = "nnUNetPlans"):
    """An initialised trainer of ``trainer_class`` on the session dataset, in this process, on the CPU."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    plans = load_json(str(brats_dataset["preprocessed"] / f"{plans}.json"))
    plans["continue_training"] = False  # nnUNetv2_train adds this key before building a trainer
    ds = dataset_json or load_json(str(brats_dataset["preprocessed"] / "dataset.json"))
    paths = {"nnUNet_preprocessed": str(brats_dataset["root"] / "preprocessed"),
             "nnUNet_results": str(brats_dataset["root"] / "in_process_results")}
    old = {k: os.environ.get(k) for k in paths}
    os.environ.update(paths)
    try:
        trainer = trainer_class(plans=plans, configuration="3d_fullres", fold="all", dataset_json=ds,
                                device=torch.device("cpu"))
        trainer.initialize()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return trainer


@pytest.fixture(scope="session")
def load_trainer():
    """``load_trainer(brats_dataset, trainer_class, dataset_json=None, plans="nnUNetPlans")``: an initialised
    trainer on the CPU."""
    return _load_trainer


def _synthetic_batch(trainer, batch_size: int = 2, seed: int = 0) -> dict:
    """A batch shaped like nnU-Net's training loader: data (B, C, *patch) and deep-supervision targets."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    patch = list(trainer.configuration_manager.patch_size)
    channels = len(trainer.dataset_json["channel_names"])
    data = torch.randn([batch_size, channels] + patch, generator=gen)
    seg = torch.zeros([batch_size, 1] + patch)
    centre = [p // 2 for p in patch]
    zz, yy, xx = torch.meshgrid(*[torch.arange(p) for p in patch], indexing="ij")
    dist = ((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2).float().sqrt()
    seg[:, 0][:, dist < patch[0] / 3] = 1
    seg[:, 0][:, dist < patch[0] / 5] = 3
    seg[:, 0][:, dist < patch[0] / 8] = 2
    data[:, :, dist < patch[0] / 3] += 2.0
    targets = []
    for scale in trainer._get_deep_supervision_scales():
        shape = [max(1, int(round(p * s))) for p, s in zip(patch, scale)]
        level = F.interpolate(seg, size=shape, mode="nearest")
        if trainer.label_manager.has_regions:
            regions = [torch.as_tensor(np.isin(level[:, 0].numpy(), np.atleast_1d(r))) for r in
                       trainer.label_manager.foreground_regions]
            level = torch.stack(regions, 1).float()
        targets.append(level)
    return {"data": data, "target": targets}


@pytest.fixture(scope="session")
def synthetic_batch():
    """``synthetic_batch(trainer, batch_size=2, seed=0)``: a batch shaped like nnU-Net's training loader."""
    return _synthetic_batch


@pytest.fixture(scope="session")
def mgsd_model(brats_dataset) -> Path:
    """An nnUNetTrainerMGSD model trained through nnUNetv2_train (1 epoch, 2 iterations)."""
    _run([_bin_path("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-tr", "nnUNetTrainerMGSD",
         "-device", "cpu"], brats_dataset["env"])
    return brats_dataset["results"] / "nnUNetTrainerMGSD__nnUNetPlans__3d_fullres"


@dataclass(frozen=True)
class TrainedModel:
    """Where the trained test model and its data live."""

    raw_dataset: str
    model_folder: str
    dataset_id: int
    dataset_name: str
    environment: Dict[str, str] = field(repr=False)
    configuration: str = "3d_fullres"
    trainer: str = "nnUNetTrainerMGSD"
    plans: str = "nnUNetPlans"
    fold: str = "all"

    @property
    def images_tr(self) -> str:
        return os.path.join(self.raw_dataset, "imagesTr")

    @property
    def labels_tr(self) -> str:
        return os.path.join(self.raw_dataset, "labelsTr")

    def env(self) -> Dict[str, str]:
        """Environment for nnU-Net commands: data folders, plugin trainers, tiny budget."""
        return dict(self.environment)

    def cases(self) -> List[str]:
        """Case identifiers in imagesTr (sorted)."""
        return sorted(f[: -len("_0000.nii.gz")] for f in os.listdir(self.images_tr) if f.endswith("_0000.nii.gz"))

    def channel_file(self, case: str, channel: int) -> str:
        return os.path.join(self.images_tr, f"{case}_{channel:04d}.nii.gz")


@pytest.fixture(scope="session")
def missing_modality_model(brats_dataset, mgsd_model):
    """The trained MGSD model with its raw dataset, for the prediction and evaluation tests."""
    return TrainedModel(raw_dataset=str(brats_dataset["raw"]), model_folder=str(mgsd_model), dataset_id=DATASET_ID,
                        dataset_name=DATASET_NAME, environment=brats_dataset["env"])


#: Plans name of the small network (``small_plans``): same data as nnUNetPlans, a smaller U-Net.
SMALL_PLANS = "nnUNetPlans_small"


@pytest.fixture(scope="session")
def small_plans(brats_dataset) -> Dict[str, object]:
    """The session dataset's plans with a three-stage, narrow U-Net on 16^3 patches, written beside
    nnUNetPlans.json as ``nnUNetPlans_small.json`` (same preprocessed data). Returns name, plans and file; for
    tests whose cost is compiling or starting processes, not the network."""
    plans = json.loads((brats_dataset["preprocessed"] / "nnUNetPlans.json").read_text())
    plans["plans_name"] = SMALL_PLANS
    config = plans["configurations"]["3d_fullres"]
    config["patch_size"], config["batch_size"] = [16, 16, 16], 2
    arch = config["architecture"]["arch_kwargs"]
    arch.update(n_stages=3, features_per_stage=[8, 16, 32], kernel_sizes=[[3, 3, 3]] * 3,
                strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], n_conv_per_stage=[1, 1, 1], n_conv_per_stage_decoder=[1, 1])
    config["pool_op_kernel_sizes"], config["conv_kernel_sizes"] = arch["strides"], arch["kernel_sizes"]
    path = brats_dataset["preprocessed"] / f"{SMALL_PLANS}.json"
    path.write_text(json.dumps(plans, indent=2))
    return {"name": SMALL_PLANS, "plans": plans, "file": path}


class StoppedHere(Exception):
    """Raised where ``stop_at`` replaced a call: the code under test got that far."""


@pytest.fixture
def stop_at(monkeypatch):
    """``stop_at(target, name)``: replace ``target.name`` by a function that raises StoppedHere, and return
    StoppedHere (for ``pytest.raises``), to test what a command does before that call."""
    def replace(target, name: str):
        def stop(*args, **kwargs):
            raise StoppedHere(name)

        monkeypatch.setattr(target, name, stop)
        return StoppedHere

    return replace


@pytest.fixture
def native_bf16(monkeypatch):
    """bf16 autocast allowed whatever this CPU is: trainers refuse it where bf16 would be emulated
    (training/precision.py), and the in-process tests of the bf16 steps are small enough to run emulated."""
    from nnunet_kd.training import precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
