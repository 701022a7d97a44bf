"""nnU-Net's recommended presets end to end at toy size (1 epoch, 2 iterations, fold 0 so the final
validation predicts one case): the residual-encoder plans (``-pl nnUNetPlannerResEncM``, trained with
``-p nnUNetResEncUNetMPlans``) and the ``2d`` configuration, for MTCM-KD and MGSD, and stock
``nnUNetv2_predict`` of the ResEnc T1ce student."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

RESENC_PLANS = "nnUNetResEncUNetMPlans"
TRAINERS = ("nnUNetTrainerMTCMKD", "nnUNetTrainerMGSD")
FOLD = "0"


@pytest.fixture(scope="module")
def resenc_planned(brats_dataset, bin_path, dataset_id, run_cmd):
    """The session dataset planned with nnUNetPlannerResEncM, preprocessed for 3d_fullres (fingerprint reused)."""
    run_cmd([bin_path("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-pl", "nnUNetPlannerResEncM",
             "-c", "3d_fullres", "-np", "1"], brats_dataset["env"])
    path = brats_dataset["preprocessed"] / f"{RESENC_PLANS}.json"
    plans = json.loads(path.read_text())
    # Toy size: batch 2 as in the default plans (the planner picks 4 here), so that MTCM-KD's four
    # ResEnc networks stay within ~2 GB on a CPU; the architecture is the planner's.
    plans["configurations"]["3d_fullres"]["batch_size"] = 2
    path.write_text(json.dumps(plans, indent=2))
    return plans


@pytest.fixture(scope="module")
def preprocessed_2d(brats_dataset, bin_path, dataset_id, run_cmd):
    """The 2d configuration of the session's default plans, preprocessed."""
    run_cmd([bin_path("nnUNetv2_preprocess"), "-d", str(dataset_id), "-c", "2d", "-np", "1"], brats_dataset["env"])
    return brats_dataset["preprocessed"] / "nnUNetPlans_2d"


def _train(brats_dataset, bin_path, dataset_id, run_cmd, trainer, configuration, plans="nnUNetPlans"):
    run_cmd([bin_path("nnUNetv2_train"), str(dataset_id), configuration, FOLD, "-tr", trainer, "-p", plans,
             "-device", "cpu"], brats_dataset["env"])
    folder = brats_dataset["results"] / f"{trainer}__{plans}__{configuration}"
    checkpoint = torch.load(folder / f"fold_{FOLD}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == trainer and checkpoint["current_epoch"] == 1
    assert (folder / f"fold_{FOLD}" / "validation" / "summary.json").is_file()
    return folder, checkpoint


def _first_conv(weights):
    return next(w for k, w in weights.items() if k.startswith("encoder.stem") or k.startswith("encoder.stages.0"))


@pytest.mark.parametrize("trainer", TRAINERS)
def test_residual_encoder_plans(resenc_planned, brats_dataset, bin_path, dataset_id, run_cmd, trainer, tmp_path):
    assert "ResidualEncoderUNet" in resenc_planned["configurations"]["3d_fullres"]["architecture"]["network_class_name"]
    folder, checkpoint = _train(brats_dataset, bin_path, dataset_id, run_cmd, trainer, "3d_fullres", RESENC_PLANS)
    weights = checkpoint["network_weights"]
    assert any(".blocks." in k for k in weights)  # residual blocks: the ResEnc encoder really was built
    student_channels = 1 if trainer == "nnUNetTrainerMTCMKD" else 4
    assert _first_conv(weights).shape[1] == student_channels
    if trainer != "nnUNetTrainerMTCMKD":
        return
    # stock nnUNetv2_predict of the ResEnc T1ce student, from T1ce files alone
    inputs = tmp_path / "t1ce_only"
    inputs.mkdir()
    case_file = sorted(brats_dataset["t1ce_images"].iterdir())[0]
    shutil.copy(case_file, inputs / case_file.name)
    out = tmp_path / "pred"
    run_cmd([bin_path("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(dataset_id), "-c", "3d_fullres",
             "-tr", trainer, "-p", RESENC_PLANS, "-f", FOLD, "-device", "cpu", "-npp", "1", "-nps", "1",
             "--disable_tta"], brats_dataset["env"])
    pred = sitk.ReadImage(str(out / case_file.name.replace("_0000.nii.gz", ".nii.gz")))
    assert pred.GetSize() == sitk.ReadImage(str(case_file)).GetSize()
    assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2, 3}


@pytest.mark.parametrize("trainer", TRAINERS)
def test_2d_configuration(preprocessed_2d, brats_dataset, bin_path, dataset_id, run_cmd, trainer):
    assert any(preprocessed_2d.iterdir())
    _, checkpoint = _train(brats_dataset, bin_path, dataset_id, run_cmd, trainer, "2d")
    assert _first_conv(checkpoint["network_weights"]).ndim == 4  # Conv2d weights (out, in, y, x)
