"""The adapter over the official BraTS evaluation package: the message naming the extra when it is
missing, known values, label checks, and the cross-check of our legacy Dice (and HD95 on 1 mm data)
against the official global Dice on the real cases in ../shared/data."""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kd.brats import RELEASE_TO_NNUNET, cohort_for, map_labels, to_original
from nnunet_kd.evaluation import lesionwise
from nnunet_kd.evaluation.lesionwise import INSTALL_HINT, OfficialPackageMissing, lesionwise_metrics
from nnunet_kd.evaluation.metrics import region_metrics

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
REAL_SETS = ("BraTS2021_sample", "BraTS2018_2mm")
requires_extra = pytest.mark.skipif(not lesionwise.is_available(),
                                    reason=f"official BraTS evaluation package not installed ({INSTALL_HINT})")
THREE = {"wt": "WT", "tc": "TC", "et": "ET"}


def test_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "brats_evaluation", None)  # import fails as if not installed
    lesionwise._evaluator.cache_clear()
    try:
        assert not lesionwise.is_available()
        with pytest.raises(OfficialPackageMissing, match=re.escape(INSTALL_HINT)):
            lesionwise.official_package()
        seg = np.zeros((4, 4, 4), np.uint8)
        with pytest.raises(ImportError, match=r"nnunet-kd\[brats-eval\]"):
            lesionwise_metrics({"c": (seg, seg, (1, 1, 1))}, "gli", THREE)
    finally:
        lesionwise._evaluator.cache_clear()


def _two_lesions():
    """Reference: an ET cube and a separate SNFH cube (labels of the 2023+ scheme); the prediction
    finds the first exactly and misses the second."""
    ref = np.zeros((40, 40, 40), np.uint8)
    ref[5:15, 5:15, 5:15] = 3
    ref[25:35, 25:35, 25:35] = 2
    pred = ref.copy()
    pred[25:35, 25:35, 25:35] = 0
    return pred, ref


@requires_extra
def test_known_values_of_a_missed_lesion():
    pred, ref = _two_lesions()
    gli = lesionwise_metrics({"c": (pred, ref, (1.0, 1.0, 1.0))}, "gli", {**THREE, "rc": "RC"})["c"]
    # whole tumour: 1000 of 2000 reference voxels found -> global Dice 2*1000/3000
    assert gli["WT"]["global_dice"] == pytest.approx(2 / 3)
    assert (gli["WT"]["lesion_tp"], gli["WT"]["lesion_fp"], gli["WT"]["lesion_fn"]) == (1, 0, 1)
    # the seg parser averages over matched lesions only: the found cube is perfect
    assert gli["WT"]["lesion_dice"] == 1.0 and gli["WT"]["lesion_hd95"] == 0.0
    assert gli["ET"]["global_dice"] == 1.0 and gli["TC"]["global_dice"] == 1.0
    rc = gli["RC"]  # no RC anywhere: no lesion, no score
    assert (rc["lesion_tp"], rc["lesion_fp"], rc["lesion_fn"]) == (0, 0, 0)
    assert all(math.isnan(rc[m]) for m in ("lesion_dice", "lesion_hd95", "global_dice", "global_hd95"))
    # the metastasis parser scores the missed lesion as Dice 0 / HD95 373
    mets = lesionwise_metrics({"c": (pred, ref, (1.0, 1.0, 1.0))}, "mets", THREE)["c"]
    assert mets["WT"]["lesion_dice"] == pytest.approx(0.5)
    assert mets["WT"]["lesion_hd95"] == pytest.approx(373 / 2)


@requires_extra
def test_lesionwise_hd95_uses_the_spacing():
    ref = np.zeros((30, 30, 30), np.uint8)
    ref[5:15, 5:15, 5:15] = 2
    pred = np.roll(ref, 3, axis=2)  # shifted by 3 voxels along the last axis
    iso = lesionwise_metrics({"c": (pred, ref, (1.0, 1.0, 1.0))}, "gli", {"wt": "WT"})["c"]["WT"]
    aniso = lesionwise_metrics({"c": (pred, ref, (1.0, 1.0, 4.0))}, "gli", {"wt": "WT"})["c"]["WT"]
    assert iso["lesion_hd95"] == pytest.approx(3.0)
    assert aniso["lesion_hd95"] == pytest.approx(12.0)
    # panoptica 2.1.7 computes the global HD95 in voxels (see the module docstring)
    assert aniso["global_hd95"] == pytest.approx(3.0)


@requires_extra
def test_labels_outside_the_config_and_bad_input_are_refused():
    seg = np.zeros((8, 8, 8), np.uint8)
    seg[2:4, 2:4, 2:4] = 4
    with pytest.raises(ValueError, match="case c7: .*MenPre.*label 4"):
        lesionwise_metrics({"c7": (seg, seg, (1, 1, 1))}, "MenPre", THREE)
    with pytest.raises(ValueError, match="case c8: prediction shape"):
        lesionwise_metrics({"c8": (seg[:4], seg, (1, 1, 1))}, "gli", THREE)
    with pytest.raises(ValueError, match="unknown BraTS evaluation config 'glioma'"):
        lesionwise_metrics({"c9": (seg, seg, (1, 1, 1))}, "glioma", THREE)
    with pytest.raises(ValueError, match=r"no region\(s\) \['rc'\]"):
        lesionwise_metrics({"c10": (seg * 0, seg * 0, (1, 1, 1))}, "MenPre", {"rc": "RC"})


def _real_cases():
    cases = []
    for name in REAL_SETS:
        folder = SHARED / name
        if folder.is_dir():
            cases += sorted(p for p in folder.glob("*/*_seg.nii.gz"))
    return cases


def _crop(pred: np.ndarray, ref: np.ndarray, margin: int = 3):
    """Both arrays cut to the bounding box of their foreground plus a margin: Dice and HD95 are the
    same on the crop, and the metrics run several times faster."""
    nonzero = np.argwhere((pred > 0) | (ref > 0))
    lo = np.maximum(nonzero.min(0) - margin, 0)
    hi = nonzero.max(0) + margin + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    return pred[box], ref[box]


def _perturbed(ref_nnunet: np.ndarray) -> np.ndarray:
    """A deterministic, imperfect prediction: shifted by two voxels, with necrosis turned into edema on
    every third axial slice (so WT, TC and ET all differ from the reference)."""
    pred = np.roll(ref_nnunet, 2, axis=2)
    slab = np.zeros(pred.shape, bool)
    slab[::3] = True
    pred[slab & (pred == 2)] = 1
    return pred


@requires_extra
def test_legacy_dice_equals_the_official_global_dice_on_real_cases():
    cases = _real_cases()
    if not cases:
        pytest.skip(f"no real BraTS cases under {SHARED}")
    gli = cohort_for("GLI", 2023)  # 2018-2021 labels in nnU-Net form are the GLI-2023 ones
    inputs, legacy, one_mm = {}, {}, set()
    for path in cases:
        image = sitk.ReadImage(str(path))
        ref = map_labels(sitk.GetArrayFromImage(image).astype(np.int64), RELEASE_TO_NNUNET["brats2021"])
        pred, ref = _crop(_perturbed(ref), ref)
        spacing = image.GetSpacing()[::-1]
        case = path.name[: -len("_seg.nii.gz")]
        legacy[case] = region_metrics(pred, ref, spacing)
        inputs[case] = (to_original(pred, gli), to_original(ref, gli), spacing)
        if np.allclose(spacing, 1.0):
            one_mm.add(case)
    official = lesionwise_metrics(inputs, gli.eval_config, gli.eval_regions)
    compared = 0
    for case, regions in legacy.items():
        for region, ours in regions.items():
            theirs = official[case][region]
            if math.isnan(theirs["global_dice"]):  # both empty: official NaN, legacy 1 / 0
                assert (ours["dice"], ours["hd95"]) == (1.0, 0.0), (case, region)
                continue
            assert theirs["global_dice"] == pytest.approx(ours["dice"], abs=1e-12), (case, region)
            assert 0.0 < ours["dice"] < 1.0, (case, region)  # the prediction really differs
            if case in one_mm:
                assert theirs["global_hd95"] == pytest.approx(ours["hd95"], abs=1e-9), (case, region)
            compared += 1
    assert compared >= 3 * len(cases) - 10  # nearly every region is non-empty in real data
    assert one_mm, "no 1 mm case to compare HD95 on"
