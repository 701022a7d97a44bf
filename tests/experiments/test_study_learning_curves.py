"""The study's learning curves: read from nnU-Net's checkpoints in the fold folders (finished or not), the
flattening rule, their table in study.json and study.md, and study_learning_curves.png. No training."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
import torch

from nnunet_kd.experiments.study.collect import flattening, read_learning_curve, scores_file
from nnunet_kd.experiments.study.design import BASELINE, DATASET_IDS, MODELS, StudyModel, StudySettings
from nnunet_kd.experiments.study.report import collect_report

PLANS = "nnUNetPlans_4x4x4mm"
DROPOUT = "modality dropout fed T1ce alone"
MTCMKD = "MTCM-KD student (T1ce)"
# 10 epochs: the rule compares epoch 9 with epoch 7 (ceil(0.8 * 10) - 1). Epochs 6 and 8 are set so that
# comparing with either of them would give the other verdict.
RISING_THEN_FLAT = [0.1, 0.3, 0.5, 0.55, 0.58, 0.59, 0.60, 0.70, 0.65, 0.719]  # gain 0.019: flattened
STILL_RISING = [0.1, 0.3, 0.5, 0.55, 0.58, 0.59, 0.715, 0.70, 0.71, 0.721]  # gain 0.021: not flattened


def _fold_folder(root: Path, model: StudyModel) -> Path:
    folder = (root / "results" / f"Dataset{DATASET_IDS[model.dataset]}_BraTS"
              / f"{model.trainer}__{PLANS}__3d_fullres" / "fold_all")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _logging(ema: Sequence[float]) -> Dict[str, List]:
    """nnU-Net's logger lists as its checkpoints hold them (numpy floats, per-region lists WT, TC, ET)."""
    mean = [np.float64(v - 0.05) for v in ema]
    return {"mean_fg_dice": mean, "ema_fg_dice": [np.float64(v) for v in ema],
            "dice_per_class_or_region": [[m + 0.1, m, m - 0.1] for m in mean],
            "train_losses": [-v for v in ema], "val_losses": [-v for v in ema], "lrs": [0.01] * len(ema),
            "epoch_start_timestamps": list(range(len(ema))), "epoch_end_timestamps": list(range(len(ema)))}


def _write_checkpoint(folder: Path, name: str, ema: Sequence[float]) -> None:
    torch.save({"network_weights": {"w": torch.zeros(2)}, "logging": _logging(ema), "current_epoch": len(ema),
                "_best_ema": max(ema)}, folder / name)


def _write_scores(path: Path, dice: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    case = {r: {"dice": dice, "hd95": 1.0} for r in ("WT", "TC", "ET")}
    path.write_text(json.dumps({"mean": {}, "cases": {f"{path.parent.name}_a": case}}))


@pytest.mark.parametrize("epochs,from_epoch", [(1, 0), (4, 3), (5, 3), (8, 6), (10, 7), (15, 11), (16, 12)])
def test_flattening_compares_the_last_epoch_with_epoch_ceil_of_80_percent_minus_one(epochs, from_epoch):
    ema = [0.01 * e for e in range(epochs)]  # one point per epoch
    result = flattening(ema)
    assert result["from_epoch"] == from_epoch  # 15: not 12, as 0.8 * 15 in floats would give
    assert result["gain"] == pytest.approx(0.01 * (epochs - 1 - from_epoch))
    assert result["last_ema"] == pytest.approx(0.01 * (epochs - 1))


@pytest.mark.parametrize("ema,gain,flattened", [(RISING_THEN_FLAT, 0.019, True), (STILL_RISING, 0.021, False)])
def test_flattened_is_a_gain_under_two_points(ema, gain, flattened):
    result = flattening(ema)
    assert result["gain"] == pytest.approx(gain)
    assert result["flattened"] is flattened


def test_curve_is_read_from_the_final_checkpoint_else_from_the_latest(tmp_path):
    assert read_learning_curve(tmp_path) is None  # no checkpoint yet
    _write_checkpoint(tmp_path, "checkpoint_latest.pth", RISING_THEN_FLAT[:3])
    curve = read_learning_curve(tmp_path)
    assert curve["checkpoint"] == "checkpoint_latest.pth" and curve["finished"] is False
    assert curve["epochs"] == 3 and curve["ema_fg_dice"] == pytest.approx([0.1, 0.3, 0.5])
    assert curve["mean_fg_dice"] == pytest.approx([0.05, 0.25, 0.45])
    expected = {"WT": [0.15, 0.35, 0.55], "TC": [0.05, 0.25, 0.45], "ET": [-0.05, 0.15, 0.35]}
    assert list(curve["dice_per_region"]) == list(expected)
    for region, values in expected.items():
        assert curve["dice_per_region"][region] == pytest.approx(values)
    (tmp_path / "checkpoint_final.pth").write_bytes(b"")  # a kill while writing: the latest still counts
    assert read_learning_curve(tmp_path)["checkpoint"] == "checkpoint_latest.pth"
    _write_checkpoint(tmp_path, "checkpoint_final.pth", RISING_THEN_FLAT)
    curve = read_learning_curve(tmp_path)
    assert curve["checkpoint"] == "checkpoint_final.pth" and curve["finished"] is True and curve["epochs"] == 10


def test_report_has_each_models_curves_flattening_and_plot(tmp_path):
    work = tmp_path / "study"
    for fold, (base, dropout) in {"fold0": (RISING_THEN_FLAT, RISING_THEN_FLAT),
                                  "fold1": (STILL_RISING, RISING_THEN_FLAT)}.items():
        root = work / fold
        for name, ema in ((BASELINE, base), (DROPOUT, dropout)):
            _write_scores(scores_file(root, MODELS[name]), 0.5)
            _write_checkpoint(_fold_folder(root, MODELS[name]), "checkpoint_final.pth", ema)
    # MTCM-KD: still training on fold0 (3 epochs so far, no scores), not started on fold1
    _write_checkpoint(_fold_folder(work / "fold0", MODELS[MTCMKD]), "checkpoint_latest.pth", RISING_THEN_FLAT[:3])
    settings = StudySettings(real_brats="cases", folds=2, target_spacing=(4.0, 4.0, 4.0))
    report = tmp_path / "r"
    result = collect_report([str(work)], str(report), settings)

    curves = result["summary"]["learning_curves"]
    assert list(curves) == [BASELINE, DROPOUT, MTCMKD]
    base = curves[BASELINE]["splits"]
    assert base["fold0"]["ema_fg_dice"] == pytest.approx(RISING_THEN_FLAT)
    assert base["fold1"]["mean_fg_dice"] == pytest.approx([v - 0.05 for v in STILL_RISING])
    assert base["fold1"]["dice_per_region"]["ET"][-1] == pytest.approx(0.721 - 0.15)
    assert (base["fold0"]["from_epoch"], base["fold0"]["flattened"], base["fold1"]["flattened"]) == (7, True, False)
    assert curves[BASELINE]["flattened_in_every_split"] is False
    assert curves[DROPOUT]["flattened_in_every_split"] is True
    unfinished = curves[MTCMKD]
    assert list(unfinished["splits"]) == ["fold0"] and unfinished["flattened_in_every_split"] is None
    assert unfinished["splits"]["fold0"]["finished"] is False and unfinished["splits"]["fold0"]["epochs"] == 3
    saved = json.loads((report / "study.json").read_text())
    assert saved["summary"]["learning_curves"][BASELINE]["splits"]["fold1"]["ema_fg_dice"] == \
        pytest.approx(STILL_RISING)

    md = (report / "study.md").read_text()
    assert "from epoch index ceil(0.8 E) - 1 to E - 1" in md and "under 2 points" in md
    assert f"| {BASELINE} | 71.9 (+1.9, flattened) | 72.1 (+2.1, not flattened) | no |" in md
    assert f"| {DROPOUT} | 71.9 (+1.9, flattened) | 71.9 (+1.9, flattened) | yes |" in md
    assert (f"| {MTCMKD} | 50.0 (+0.0, flattened: under 5 epochs, no gain to measure; unfinished, 3 epochs) |  "
            "| - (1 of 2 splits) |") in md
    assert (report / "study_learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
