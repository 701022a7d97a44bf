"""A NIfTI cut short inside a valid gzip stream (what a kill or a full disk leaves) is rejected with an error
naming the file by nnunet_kd_evaluate and nnunet_kd_predict; ITK alone would zero-fill the missing voxels."""
from __future__ import annotations

import gzip
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kd.evaluation.evaluate import EvaluationError, evaluate_case
from nnunet_kd.inference.inputs import PredictionError
from nnunet_kd.inference.preprocessing import read_case_with_placeholders

REPO = str(Path(__file__).resolve().parents[2])


def _write(path: Path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), True)


def _cut_inside_gzip(path: Path, keep: float = 1 / 3) -> None:
    """Keep the header and ``keep`` of the voxel bytes, re-compressed as a complete gzip stream."""
    data = gzip.open(path).read()
    with gzip.open(path, "wb") as f:
        f.write(data[: 352 + int(len(data[352:]) * keep)])


@pytest.fixture
def folders(tmp_path):
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[5:15, 5:15, 5:15] = 1
    labels[8:12, 8:12, 8:12] = 3
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    ref.mkdir()
    pred.mkdir()
    for case in ("BraTS_001", "BraTS_002"):
        _write(ref / f"{case}.nii.gz", labels)
        _write(pred / f"{case}.nii.gz", labels)
    return ref, pred


def test_evaluate_rejects_a_prediction_cut_inside_gzip(folders, tmp_path):
    ref, pred = folders
    cut = pred / "BraTS_002.nii.gz"
    _cut_inside_gzip(cut)
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(cut))).shape == (20, 20, 20)  # ITK reads it
    with pytest.raises(EvaluationError, match="BraTS_002.nii.gz.*truncated"):
        evaluate_case(str(cut), str(ref / "BraTS_002.nii.gz"))
    out = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, "-m", "nnunet_kd.evaluation.evaluate", "-r", str(ref), "-p", str(pred),
                           "-o", str(out), "-np", "1"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(cut) in proc.stderr and not out.exists()


def test_predict_rejects_a_scan_cut_inside_gzip(tmp_path):
    scan = np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32)
    path = tmp_path / "CASE_0001.nii.gz"
    _write(path, scan)
    _cut_inside_gzip(path, keep=1 / 2)
    predictor = SimpleNamespace(dataset_json={"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}})
    with pytest.raises(PredictionError, match="CASE_0001.nii.gz.*truncated"):
        read_case_with_placeholders(predictor, {1: str(path)}, "CASE")
