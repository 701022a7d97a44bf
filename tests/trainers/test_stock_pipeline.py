"""The foundation pipeline through the real commands: converter, plan_and_preprocess, stock training, predict."""
from __future__ import annotations

import json

import numpy as np
import SimpleITK as sitk


def test_converted_dataset_was_planned_and_preprocessed(brats_dataset):
    plans = json.loads((brats_dataset["preprocessed"] / "nnUNetPlans.json").read_text())
    assert "3d_fullres" in plans["configurations"]
    assert len(plans["foreground_intensity_properties_per_channel"]) == 4
    dataset_json = json.loads((brats_dataset["preprocessed"] / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert dataset_json["regions_class_order"] == [1, 2, 3]


def test_stock_training_and_prediction(stock_model, brats_dataset, tmp_path, bin_path, dataset_id, run_cmd):
    assert (stock_model / "fold_all" / "checkpoint_final.pth").is_file()
    inputs = tmp_path / "in"
    inputs.mkdir()
    images = brats_dataset["raw"] / "imagesTr"
    case = sorted(p.name[: -len("_0000.nii.gz")] for p in images.glob("*_0000.nii.gz"))[0]
    for c in range(4):
        (inputs / f"{case}_{c:04d}.nii.gz").symlink_to(images / f"{case}_{c:04d}.nii.gz")
    out = tmp_path / "out"
    run_cmd([bin_path("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(dataset_id), "-c", "3d_fullres",
         "-tr", "nnUNetTrainerBudget", "-f", "all", "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_tta",
         "--save_probabilities"], brats_dataset["env"])
    pred = sitk.ReadImage(str(out / f"{case}.nii.gz"))
    image = sitk.ReadImage(str(images / f"{case}_0000.nii.gz"))
    assert pred.GetSize() == image.GetSize()
    assert np.allclose(pred.GetSpacing(), image.GetSpacing()) and np.allclose(pred.GetOrigin(), image.GetOrigin())
    assert np.allclose(pred.GetDirection(), image.GetDirection())
    seg = sitk.GetArrayFromImage(pred)
    assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
    # The 1-epoch model is poor (it over-segments), but it has learnt where tumour is: it predicts tumour on part of
    # the reference tumour, and its whole-tumour probability is higher there than elsewhere (in two trainings the
    # means were 0.6-0.8 inside and 0.2-0.3 outside). An all-zero or input-independent prediction fails this.
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(brats_dataset["raw"] / "labelsTr" / f"{case}.nii.gz")))
    tumour = reference > 0
    assert tumour.any() and (seg[tumour] > 0).any()
    probabilities = np.load(out / f"{case}.npz")["probabilities"]  # regions WT, TC, ET
    assert probabilities.shape == (3, *seg.shape) and 0 <= probabilities.min() and probabilities.max() <= 1
    assert probabilities[0][tumour].mean() > probabilities[0][~tumour].mean()
