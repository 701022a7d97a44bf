"""nnunet_kd_evaluate_missing: every modality combination predicted and scored, on a trained 4-channel model."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess

import numpy as np
import pytest

import SimpleITK as sitk

from nnunet_kd.brats import modality_combinations
from nnunet_kd.evaluation.missing_modalities import write_combinations_csv
from nnunet_kd.evaluation.plots import plot_heatmap

EXPECTED_COMBINATIONS = [
    "T1", "T1ce", "T2", "FLAIR",
    "T1+T1ce", "T1+T2", "T1+FLAIR", "T1ce+T2", "T1ce+FLAIR", "T2+FLAIR",
    "T1+T1ce+T2", "T1+T1ce+FLAIR", "T1+T2+FLAIR", "T1ce+T2+FLAIR",
    "T1+T1ce+T2+FLAIR",
]
REGIONS = ["WT", "TC", "ET"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COMMON = ["-f", "all", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1", "-np", "1"]


@pytest.fixture(scope="module")
def eval_inputs(missing_modality_model, tmp_path_factory):
    """IMAGES (all four channels) and LABELS folders with two cases."""
    root = tmp_path_factory.mktemp("evaluate_missing_inputs")
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    cases = missing_modality_model.cases()[:2]
    for case in cases:
        for c in range(4):
            shutil.copy(missing_modality_model.channel_file(case, c), images)
        shutil.copy(os.path.join(missing_modality_model.labels_tr, case + ".nii.gz"), labels)
    return str(images), str(labels), cases


@pytest.fixture(scope="session")
def evaluate_cli(bin_path):
    """``evaluate_cli(model, args)``: run nnunet_kd_evaluate_missing in the model's environment."""
    def evaluate(model, args):
        cmd = [bin_path("nnunet_kd_evaluate_missing"), *args]
        return subprocess.run(cmd, env=model.env(), capture_output=True, text=True, timeout=600)

    return evaluate


@pytest.fixture(scope="module")
def evaluated(missing_modality_model, eval_inputs, tmp_path_factory, evaluate_cli):
    images, labels, cases = eval_inputs
    out = str(tmp_path_factory.mktemp("evaluate_missing_out"))
    proc = evaluate_cli(missing_modality_model, ["-d", str(missing_modality_model.dataset_id), "-c", missing_modality_model.configuration,
                                  "-tr", missing_modality_model.trainer, "-i", images, "-r", labels, "-o", out, *COMMON])
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc, cases


def test_combinations_order_and_channel_mapping():
    standard = {0: "T1", 1: "T1ce", 2: "T2", 3: "FLAIR"}
    combos = modality_combinations(standard)
    assert [n for n, _ in combos] == EXPECTED_COMBINATIONS
    assert dict(combos)["T1ce+FLAIR"] == [1, 3]
    # another channel order (the Decathlon's FLAIR, T1w, T1gd, T2w): same names and order, right channels
    msd = {0: "FLAIR", 1: "T1w", 2: "t1gd", 3: "T2w"}
    combos = modality_combinations(msd)
    assert [n for n, _ in combos] == EXPECTED_COMBINATIONS
    assert dict(combos)["T1ce+FLAIR"] == [0, 2]
    assert dict(combos)["T1"] == [1]


def test_json_has_all_combinations(evaluated):
    out, proc, cases = evaluated
    with open(os.path.join(out, "missing_modalities.json")) as f:
        results = json.load(f)
    assert list(results["combinations"]) == EXPECTED_COMBINATIONS
    for name, entry in results["combinations"].items():
        assert "+".join(entry["modalities"]) == name
        assert sorted(entry["cases"]) == sorted(cases)
        for region in REGIONS:
            assert 0.0 <= entry["mean"][region]["dice"] <= 1.0
            assert entry["mean"][region]["hd95"] >= 0.0
            for case in cases:
                assert 0.0 <= entry["cases"][case][region]["dice"] <= 1.0
            assert entry["mean"][region]["dice"] == pytest.approx(
                np.mean([entry["cases"][c][region]["dice"] for c in cases]))
    for region in REGIONS:
        for metric in ("dice", "hd95"):
            assert results["mean_over_combinations"][region][metric] == pytest.approx(
                np.mean([e["mean"][region][metric] for e in results["combinations"].values()]))
        assert 0.0 <= results["mean_over_combinations"][region]["dice"] <= 1.0
    assert "T1ce+FLAIR" in proc.stdout and "mean" in proc.stdout


def test_predictions_per_combination(evaluated, eval_inputs):
    out, _, cases = evaluated
    images = eval_inputs[0]
    assert sorted(os.listdir(os.path.join(out, "predictions"))) == sorted(EXPECTED_COMBINATIONS)
    for name in EXPECTED_COMBINATIONS:
        for case in cases:
            pred = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(out, "predictions", name, case + ".nii.gz")))
            ref = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(images, f"{case}_0000.nii.gz")))
            assert pred.shape == ref.shape
            assert set(np.unique(pred).tolist()) <= {0, 1, 2, 3}
    # the inputs were not copied anywhere
    assert sorted(os.listdir(images)) == sorted(f"{c}_{i:04d}.nii.gz" for c in cases for i in range(4))
    copied = [f for _, _, files in os.walk(out) for f in files if f.endswith(("_0000.nii.gz", "_0003.nii.gz"))]
    assert not copied


def test_csv_rows(evaluated):
    out, _, _ = evaluated
    with open(os.path.join(out, "missing_modalities.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 15 * 3 + 3
    assert [r["combination"] for r in rows[::3]] == EXPECTED_COMBINATIONS + ["mean"]
    assert all(r["region"] == REGIONS[i % 3] for i, r in enumerate(rows))
    with open(os.path.join(out, "missing_modalities.json")) as f:
        results = json.load(f)
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0
        source = (results["mean_over_combinations"] if r["combination"] == "mean"
                  else results["combinations"][r["combination"]]["mean"])
        assert float(r["dice"]) == pytest.approx(source[r["region"]]["dice"])
        assert float(r["hd95"]) == pytest.approx(source[r["region"]]["hd95"])


def test_heatmaps_are_pngs(evaluated):
    from matplotlib.image import imread

    out, _, _ = evaluated
    for metric in ("dice", "hd95"):
        path = os.path.join(out, f"missing_modalities_{metric}.png")
        with open(path, "rb") as f:
            assert f.read(8) == PNG_SIGNATURE
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 200


def test_brats_labels_and_single_combination(missing_modality_model, eval_inputs, evaluated, tmp_path, evaluate_cli):
    """References in BraTS 2021 labels give the same scores; --combinations restricts the run."""
    images, labels, cases = eval_inputs
    brats_labels = tmp_path / "labels_brats2021"
    brats_labels.mkdir()
    to_brats = {0: 0, 1: 2, 2: 1, 3: 4}
    for case in cases:
        img = sitk.ReadImage(os.path.join(labels, case + ".nii.gz"))
        arr = sitk.GetArrayFromImage(img)
        new = sitk.GetImageFromArray(np.vectorize(to_brats.get)(arr).astype(np.uint8))
        new.CopyInformation(img)
        sitk.WriteImage(new, str(brats_labels / (case + ".nii.gz")))
    out = str(tmp_path / "out")
    proc = evaluate_cli(missing_modality_model, ["-m", missing_modality_model.model_folder, "-i", images, "-r", str(brats_labels), "-o", out,
                                  "--labels", "brats2021", "--combinations", "T1ce+FLAIR", "--no-plots", *COMMON])
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(out, "missing_modalities.json")) as f:
        single = json.load(f)
    with open(os.path.join(evaluated[0], "missing_modalities.json")) as f:
        full = json.load(f)
    assert list(single["combinations"]) == ["T1ce+FLAIR"]
    # same network, same inputs: the same predictions and so the same scores in the other label convention
    assert single["combinations"]["T1ce+FLAIR"]["cases"] == full["combinations"]["T1ce+FLAIR"]["cases"]
    assert not os.path.exists(os.path.join(out, "missing_modalities_dice.png"))


def test_incomplete_case_is_a_clean_error(missing_modality_model, eval_inputs, tmp_path, evaluate_cli):
    images, labels, cases = eval_inputs
    partial = tmp_path / "images"
    partial.mkdir()
    for f in os.listdir(images):
        if not f.endswith("_0002.nii.gz") or not f.startswith(cases[0]):
            shutil.copy(os.path.join(images, f), partial)
    proc = evaluate_cli(missing_modality_model, ["-m", missing_modality_model.model_folder, "-i", str(partial), "-r", labels,
                                  "-o", str(tmp_path / "out"), *COMMON])
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "error:" in proc.stderr and cases[0] in proc.stderr and f"{cases[0]}_0002.nii.gz" in proc.stderr


def test_write_csv_and_heatmap_without_model(tmp_path):
    combos = {name: {"mean": {r: {"dice": 0.5 + 0.01 * i, "hd95": 3.0 + i} for r in REGIONS}}
              for i, name in enumerate(EXPECTED_COMBINATIONS)}
    results = {"combinations": combos,
               "mean_over_combinations": {r: {"dice": 0.57, "hd95": 10.0} for r in REGIONS}}
    path = write_combinations_csv(results, str(tmp_path / "t.csv"))
    with open(path) as f:
        assert len(f.read().strip().splitlines()) == 1 + 48
    png = plot_heatmap(results, "dice", str(tmp_path / "t.png"))
    with open(png, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE


def test_lesionwise_metrics_per_combination(missing_modality_model, eval_inputs, evaluated, tmp_path, evaluate_cli):
    """--metrics both: the official package's global Dice equals the legacy Dice of the same predictions."""
    from nnunet_kd.evaluation import lesionwise

    if not lesionwise.is_available():
        pytest.skip(f"official BraTS evaluation package not installed ({lesionwise.INSTALL_HINT})")
    images, labels, cases = eval_inputs
    out = str(tmp_path / "out")
    args = ["-m", missing_modality_model.model_folder, "-i", images, "-r", labels, "-o", out,
            "--combinations", "T1ce", "T1ce+FLAIR", "--no-plots", "--metrics", "both", *COMMON]
    proc = evaluate_cli(missing_modality_model, args)
    assert proc.returncode == 0, proc.stderr[-4000:]
    with open(os.path.join(out, "missing_modalities.json")) as f:
        results = json.load(f)
    assert results["metrics"] == "both"
    for combo, entry in results["combinations"].items():
        assert entry["lesionwise"]["cohort"] == "GLI-2023"
        for case in cases:
            for region in REGIONS:
                official = entry["lesionwise"]["cases"][case][region]["global_dice"]
                legacy = entry["cases"][case][region]["dice"]
                if not np.isnan(official):  # NaN: empty in both (legacy Dice 1)
                    assert official == pytest.approx(legacy, abs=1e-12), (combo, case, region)
    with open(os.path.join(out, "missing_modalities_lesionwise.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["combination"], r["region"]) for r in rows] == [(c, r) for c in ("T1ce", "T1ce+FLAIR") for r in REGIONS]
