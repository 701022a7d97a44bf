"""MTCM-KD end to end through the real commands: nnUNetv2_train, --c, --val, stock nnUNetv2_predict on T1ce
alone, nnUNetv2_find_best_configuration with its postprocessing, and nnUNetv2_ensemble with a stock model."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_kd.trainers.nnUNetTrainerMTCMKD import nnUNetTrainerMTCMKD
from nnunet_kd.training.budget import budget_environment

TRAINER = "nnUNetTrainerMTCMKD"
#: A cross-validation fold (4 training cases, 1 validation case), so find_best_configuration can use it.
FOLD = "0"


@pytest.fixture(scope="module")
def mtcmkd_model(brats_dataset, bin_path, dataset_id, run_cmd):
    env = {**brats_dataset["env"], **budget_environment(num_epochs=2)}
    run_cmd([bin_path("nnUNetv2_train"), str(dataset_id), "3d_fullres", FOLD, "-tr", TRAINER, "-device", "cpu", "--npz"],
        env)
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
    checkpoint = torch.load(mtcmkd_model / f"fold_{FOLD}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    assert checkpoint["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"].shape[1] == 1
    state = checkpoint["kd_state"]
    assert len(state["teacher_weights"]) == 3 and state["cdsfl_weights"]
    assert state["teacher_optimizer_state"]["state"]
    assert [h["epoch"] for h in state["distillation_log"]] == [0, 1]
    # per teacher and region, within [0, kd_total_weight / teachers]; CDSFL factors within [0, 1]
    weights = state["kd_region_weights"]
    assert weights.shape == (3, 3) and (weights >= 0).all()
    assert (weights <= nnUNetTrainerMTCMKD.kd_total_weight / 3 + 1e-12).all()
    assert state["cdsfl_region_weights"].shape == (1, 3) and (state["cdsfl_region_weights"] <= 1).all()
    ema = state["region_performance"]["ema"]
    assert set(ema) == {"student", "teacher0", "teacher1", "teacher2", "cdsfl1"}
    assert all(h["ema_val_dice"] and h["next_kd_weights"] for h in state["distillation_log"])
    assert state["distillation_log"][0]["kd_weights"] is None  # epoch 0: KD not started
    assert (mtcmkd_model / f"fold_{FOLD}" / "validation" / "summary.json").is_file()


def test_resume_continues_with_saved_weights(mtcmkd_model, brats_dataset, bin_path, dataset_id, run_cmd):
    before = torch.load(mtcmkd_model / f"fold_{FOLD}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    saved_weights = before["kd_state"]["kd_region_weights"]
    saved_ema = before["kd_state"]["region_performance"]["ema"]
    logs_before = set((mtcmkd_model / f"fold_{FOLD}").glob("training_log_*.txt"))
    env = {**brats_dataset["env"], **budget_environment(num_epochs=3)}
    run_cmd([bin_path("nnUNetv2_train"), str(dataset_id), "3d_fullres", FOLD, "-tr", TRAINER, "-device", "cpu", "--c",
         "--npz"], env)
    new_logs = set((mtcmkd_model / f"fold_{FOLD}").glob("training_log_*.txt")) - logs_before
    log = "\n".join(p.read_text() for p in new_logs)
    assert "Epoch 2" in log and "Epoch 0" not in log and "Epoch 1\n" not in log
    # epoch 2 uses the weights saved after epoch 1's validation, times the ramp (2 - 1 + 1) / 10
    used = json.loads(re.search(r"KD weights this epoch \(ramp 0\.200\): (\{.*\})", log).group(1))
    for i, name in enumerate(["T1", "T2", "FLAIR"]):
        assert used[name] == pytest.approx((0.2 * saved_weights[i]).tolist(), abs=1e-4)
    after = torch.load(mtcmkd_model / f"fold_{FOLD}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert after["current_epoch"] == 3
    assert [h["epoch"] for h in after["kd_state"]["distillation_log"]] == [0, 1, 2]
    # the moving averages went on from the saved ones: EMA = 0.9 x saved + 0.1 x epoch 2's Dice
    epoch2 = after["kd_state"]["distillation_log"][-1]["val_pseudo_dice"]["student"]
    for r, (old, new) in enumerate(zip(saved_ema["student"].tolist(), after["kd_state"]["region_performance"]["ema"]
                                       ["student"].tolist())):
        if epoch2[r] is not None and not np.isnan(old):
            assert new == pytest.approx(0.9 * old + 0.1 * epoch2[r], abs=1e-3)


def test_validation_only(mtcmkd_model, brats_dataset, bin_path, dataset_id, run_cmd):
    validation = mtcmkd_model / f"fold_{FOLD}" / "validation"
    shutil.rmtree(validation)
    run_cmd([bin_path("nnUNetv2_train"), str(dataset_id), "3d_fullres", FOLD, "-tr", TRAINER, "-device", "cpu", "--val",
         "--npz"], brats_dataset["env"])
    summary = json.loads((validation / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == 1  # fold 0 of 5 cases
    assert len(list(validation.glob("*.npz"))) == 1


def test_stock_predict_from_t1ce_alone(mtcmkd_model, brats_dataset, tmp_path, bin_path, dataset_id, run_cmd):
    inputs = tmp_path / "t1ce_only"
    inputs.mkdir()
    cases = sorted(p for p in brats_dataset["t1ce_images"].iterdir())[:2]
    for p in cases:
        shutil.copy(p, inputs / p.name)
    assert all(p.name.endswith("_0000.nii.gz") for p in inputs.iterdir())
    out = tmp_path / "pred"
    run_cmd([bin_path("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(dataset_id), "-c", "3d_fullres",
         "-tr", TRAINER, "-f", FOLD, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"], brats_dataset["env"])
    for p in cases:
        case = p.name[: -len("_0000.nii.gz")]
        image, pred = sitk.ReadImage(str(p)), sitk.ReadImage(str(out / f"{case}.nii.gz"))
        assert pred.GetSize() == image.GetSize()
        assert np.allclose(pred.GetSpacing(), image.GetSpacing())
        assert set(np.unique(sitk.GetArrayFromImage(pred)).tolist()) <= {0, 1, 2, 3}


def test_find_best_configuration_then_postprocessing(mtcmkd_model, brats_dataset, tmp_path, bin_path, dataset_id, run_cmd):
    env = brats_dataset["env"]
    run_cmd([bin_path("nnUNetv2_find_best_configuration"), str(dataset_id), "-c", "3d_fullres", "-tr", TRAINER,
         "-f", FOLD, "-np", "1"], env)
    crossval = mtcmkd_model / f"crossval_results_folds_{FOLD}"
    assert json.loads((crossval / "dataset.json").read_text())["channel_names"] == {"0": "T1ce"}
    instructions = (brats_dataset["results"] / "inference_instructions.txt").read_text()
    assert f"-tr {TRAINER}" in instructions
    # The instructions' commands, run on T1ce-only inputs.
    inputs = tmp_path / "t1ce_only"
    inputs.mkdir()
    shutil.copy(sorted(brats_dataset["t1ce_images"].iterdir())[0], inputs)
    run_cmd([bin_path("nnUNetv2_predict"), "-i", str(inputs), "-o", str(tmp_path / "pred"), "-d", str(dataset_id),
         "-c", "3d_fullres", "-tr", TRAINER, "-f", FOLD, "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta"],
        env)
    run_cmd([bin_path("nnUNetv2_apply_postprocessing"), "-i", str(tmp_path / "pred"), "-o", str(tmp_path / "pp"),
         "-pp_pkl_file", str(crossval / "postprocessing.pkl"), "-np", "1", "-plans_json", str(crossval / "plans.json"),
         "-dataset_json", str(crossval / "dataset.json")], env)
    assert [p.name for p in (tmp_path / "pp").glob("*.nii.gz")] == [p.name for p in (tmp_path / "pred").glob("*.nii.gz")]


def test_ensemble_with_a_four_channel_stock_model(mtcmkd_model, stock_model, brats_dataset, tmp_path, bin_path, dataset_id, run_cmd):
    """The T1ce student's probabilities ensemble with a 4-channel model's, case by case, like any nnU-Net model."""
    env = brats_dataset["env"]
    case = sorted(p.name for p in brats_dataset["t1ce_images"].iterdir())[0][:-len("_0000.nii.gz")]
    t1ce_inputs, full_inputs = tmp_path / "t1ce", tmp_path / "full"
    t1ce_inputs.mkdir()
    full_inputs.mkdir()
    shutil.copy(brats_dataset["t1ce_images"] / f"{case}_0000.nii.gz", t1ce_inputs)
    for p in (brats_dataset["raw"] / "imagesTr").glob(f"{case}_000?.nii.gz"):
        shutil.copy(p, full_inputs)
    common = ["-d", str(dataset_id), "-c", "3d_fullres", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta",
              "--save_probabilities"]
    run_cmd([bin_path("nnUNetv2_predict"), "-i", str(t1ce_inputs), "-o", str(tmp_path / "student"), "-tr", TRAINER,
         "-f", FOLD] + common, env)
    run_cmd([bin_path("nnUNetv2_predict"), "-i", str(full_inputs), "-o", str(tmp_path / "stock"), "-tr",
         "nnUNetTrainerBudget", "-f", "all"] + common, env)
    run_cmd([bin_path("nnUNetv2_ensemble"), "-i", str(tmp_path / "student"), str(tmp_path / "stock"), "-o",
         str(tmp_path / "ensemble"), "-np", "1", "--save_npz"], env)
    probabilities = [np.load(tmp_path / d / f"{case}.npz")["probabilities"] for d in ("student", "stock", "ensemble")]
    assert np.allclose(probabilities[2], (probabilities[0] + probabilities[1]) / 2, atol=1e-3)
    assert (tmp_path / "ensemble" / f"{case}.nii.gz").is_file()
