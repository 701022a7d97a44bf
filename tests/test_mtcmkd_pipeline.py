"""MTCM-KD end to end through the real commands: nnUNetv2_train, --c, --val, stock nnUNetv2_predict on T1ce alone."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DATASET_ID, bin_path, run

TRAINER = "nnUNetTrainerMTCMKD"


@pytest.fixture(scope="module")
def mtcmkd_model(brats_dataset):
    env = dict(brats_dataset["env"], nnUNet_kd_num_epochs="2")
    run([bin_path("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-tr", TRAINER, "-device", "cpu"], env)
    return brats_dataset["results"] / f"{TRAINER}__nnUNetPlans__3d_fullres"


def test_model_folder_describes_the_one_channel_student(mtcmkd_model, brats_dataset):
    dataset_json = json.loads((mtcmkd_model / "dataset.json").read_text())
    plans = json.loads((mtcmkd_model / "plans.json").read_text())
    assert dataset_json["channel_names"] == {"0": "T1ce"}
    assert dataset_json["labels"] == brats_dataset["dataset_json"]["labels"]
    source_plans = json.loads((brats_dataset["preprocessed"] / "nnUNetPlans.json").read_text())
    assert plans["foreground_intensity_properties_per_channel"] == {
        "0": source_plans["foreground_intensity_properties_per_channel"]["1"]}
    for name, config in plans["configurations"].items():
        for key in ("normalization_schemes", "use_mask_for_norm"):
            if key in config:
                assert config[key] == [source_plans["configurations"][name][key][1]]


def test_checkpoint_holds_student_teachers_and_kd_state(mtcmkd_model):
    checkpoint = torch.load(mtcmkd_model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    assert checkpoint["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"].shape[1] == 1
    state = checkpoint["kd_state"]
    assert len(state["teacher_weights"]) == 3 and state["cdsfl_weights"]
    assert state["teacher_optimizer_state"]["state"]
    assert [h["epoch"] for h in state["kd_history"]] == [0, 1]
    assert float(state["performance_weights"].sum()) == pytest.approx(0.15)
    assert (mtcmkd_model / "fold_all" / "validation" / "summary.json").is_file()


def test_resume_continues_with_saved_weights(mtcmkd_model, brats_dataset):
    before = torch.load(mtcmkd_model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    saved_weights = before["kd_state"]["performance_weights"].tolist()
    logs_before = set((mtcmkd_model / "fold_all").glob("training_log_*.txt"))
    env = dict(brats_dataset["env"], nnUNet_kd_num_epochs="3")
    run([bin_path("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-tr", TRAINER, "-device", "cpu", "--c"],
        env)
    new_logs = set((mtcmkd_model / "fold_all").glob("training_log_*.txt")) - logs_before
    log = "\n".join(p.read_text() for p in new_logs)
    assert "Epoch 2" in log and "Epoch 0" not in log and "Epoch 1\n" not in log
    used = json.loads(re.search(r"KD weights this epoch: (\[[^\]]*\])", log).group(1))
    assert used == pytest.approx(saved_weights, abs=1e-4)
    after = torch.load(mtcmkd_model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert after["current_epoch"] == 3
    assert [h["epoch"] for h in after["kd_state"]["kd_history"]] == [0, 1, 2]


def test_validation_only(mtcmkd_model, brats_dataset):
    validation = mtcmkd_model / "fold_all" / "validation"
    shutil.rmtree(validation)
    run([bin_path("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", "all", "-tr", TRAINER, "-device", "cpu", "--val"],
        brats_dataset["env"])
    summary = json.loads((validation / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 5


def test_stock_predict_from_t1ce_alone(mtcmkd_model, brats_dataset, tmp_path):
    inputs = tmp_path / "t1ce_only"
    inputs.mkdir()
    cases = sorted(p for p in brats_dataset["t1ce_images"].iterdir())[:2]
    for p in cases:
        shutil.copy(p, inputs / p.name)
    assert all(p.name.endswith("_0000.nii.gz") for p in inputs.iterdir())
    out = tmp_path / "pred"
    run([bin_path("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(DATASET_ID), "-c", "3d_fullres",
         "-tr", TRAINER, "-f", "all", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], brats_dataset["env"])
    for p in cases:
        case = p.name[: -len("_0000.nii.gz")]
        image, pred = sitk.ReadImage(str(p)), sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert pred.GetSize() == image.GetSize()
        assert np.allclose(pred.GetSpacing(), image.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2, 3}
