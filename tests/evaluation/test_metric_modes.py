"""``--metrics legacy|lesionwise|both`` of nnunet_kd_evaluate and evaluation.modes.evaluate_with_metrics:
the official package's numbers next to the legacy ones, the cohort read from the dataset.json, its labels,
and the message naming the extra when the package is missing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kd.evaluation import lesionwise
from nnunet_kd.evaluation.evaluate_cli import main as evaluate_main
from nnunet_kd.evaluation.metrics import EvaluationError
from nnunet_kd.evaluation.modes import evaluate_with_metrics

requires_extra = pytest.mark.skipif(not lesionwise.is_available(),
                                    reason=f"official BraTS evaluation package not installed "
                                           f"({lesionwise.INSTALL_HINT})")


def _write(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(arr.astype(np.uint8)), str(path))


def _pair(with_rc: bool = False):
    """nnU-Net labels (1 ED, 2 NCR, 3 ET, 4 RC): an edema shell around a core; the prediction shifts it."""
    ref = np.zeros((24, 24, 24), np.uint8)
    ref[4:16, 4:16, 4:16] = 1
    ref[7:13, 7:13, 7:13] = 3
    ref[9:11, 9:11, 9:11] = 2
    if with_rc:
        ref[18:22, 18:22, 18:22] = 4
    return np.roll(ref, 1, axis=2), ref


def _folders(tmp_path: Path, with_rc: bool = False, cohort: str = ""):
    ref_dir, pred_dir = tmp_path / "Dataset" / "labelsTr", tmp_path / "pred"
    for case in ("a", "b"):
        pred, ref = _pair(with_rc)
        _write(ref_dir / f"{case}.nii.gz", ref)
        _write(pred_dir / f"{case}.nii.gz", pred)
    if cohort:
        (tmp_path / "Dataset" / "dataset.json").write_text(json.dumps({"brats_cohort": cohort}))
    return str(ref_dir), str(pred_dir)


@requires_extra
def test_both_reports_legacy_and_official_metrics_that_agree(tmp_path):
    ref_dir, pred_dir = _folders(tmp_path)
    out = tmp_path / "m.json"
    results = evaluate_with_metrics(ref_dir, pred_dir, str(out), metrics="both", num_processes=1, plots=False,
                                    progress=False)
    lesion = results["lesionwise"]
    assert (lesion["cohort"], lesion["config"]) == ("GLI-2023", "gli")
    for region in ("WT", "TC", "ET"):
        legacy = results["mean"][region]["dice"]
        assert 0 < legacy < 1
        assert lesion["mean"][region]["global_dice"] == pytest.approx(legacy, abs=1e-12)
        assert lesion["cases"]["a"][region]["lesion_tp"] == 1
    assert json.loads(out.read_text())["lesionwise"]["mean"]["WT"]["global_dice"] == pytest.approx(
        results["mean"]["WT"]["dice"])
    rows = (tmp_path / "m_lesionwise.csv").read_text().splitlines()
    assert rows[0].startswith("case,region,lesion_dice") and len(rows) == 1 + 2 * 3
    assert (tmp_path / "m.csv").exists()  # the legacy table too


@requires_extra
def test_post_treatment_cohort_from_dataset_json_scores_rc(tmp_path, capsys):
    ref_dir, pred_dir = _folders(tmp_path, with_rc=True, cohort="GLI-2024")
    out = tmp_path / "m.json"
    assert evaluate_main(["-r", ref_dir, "-p", pred_dir, "-o", str(out), "--metrics", "lesionwise", "-np", "1"]) == 0
    results = json.loads(out.read_text())
    assert "mean" not in results and results["lesionwise"]["cohort"] == "GLI-2024"
    rc = results["lesionwise"]["cases"]["a"]["RC"]
    assert rc["global_dice"] == pytest.approx(2 * 48 / 128)  # 4x4x4 cube shifted by one voxel: 48 of 64 overlap
    assert "lesion-wise Dice" in capsys.readouterr().out
    with pytest.raises(EvaluationError, match=r"label values \[4\] outside the nnunet labels of BraTS GLI-2023"):
        evaluate_with_metrics(ref_dir, pred_dir, metrics="lesionwise", cohort="GLI-2023", num_processes=1)


def test_missing_package_names_the_extra(tmp_path, monkeypatch, capsys):
    ref_dir, pred_dir = _folders(tmp_path)
    monkeypatch.setitem(sys.modules, "brats_evaluation", None)  # import fails as if not installed
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["-r", ref_dir, "-p", pred_dir, "-o", str(tmp_path / "m.json"), "--metrics", "both"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and 'pip install "nnunet-kd[brats-eval]"' in err
    assert not (tmp_path / "m.json").exists()
    legacy = evaluate_with_metrics(ref_dir, pred_dir, metrics="legacy", num_processes=1, progress=False)
    assert list(legacy) == ["mean", "cases"]  # legacy needs no extra and keeps its format
    with pytest.raises(EvaluationError, match="unknown --metrics 'lesion'"):
        evaluate_with_metrics(ref_dir, pred_dir, metrics="lesion")
