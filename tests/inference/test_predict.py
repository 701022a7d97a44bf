"""nnunet_kd_predict: prediction with missing modalities, end to end on a freshly trained 4-channel MGSD model."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

import SimpleITK as sitk
import torch

from nnunet_kd.inference.inputs import PredictionError, resolve_available
from nnunet_kd.inference.models import load_predictor
from nnunet_kd.inference.predict import predict_with_missing_modalities
from nnunet_kd.inference.preprocessing import (preprocess_case_with_missing, read_case_with_placeholders,
                                               zero_fill_missing)

CHANNELS = {"T1": 0, "T1ce": 1, "T2": 2, "FLAIR": 3}
COMMON = ["-f", "all", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]


@pytest.fixture(scope="module")
def two_cases(missing_modality_model):
    return missing_modality_model.cases()[:2]


def _input_folder(model, cases, channels_per_case, folder) -> str:
    """Copy the given channels of the cases (``{case: [channel, ...]}`` or one list for all) into ``folder``."""
    os.makedirs(folder, exist_ok=True)
    for case in cases:
        channels = channels_per_case[case] if isinstance(channels_per_case, dict) else channels_per_case
        for c in channels:
            shutil.copy(model.channel_file(case, c), folder)
    return str(folder)


def _run(cmd, model, timeout=600):
    return subprocess.run(cmd, env=model.env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def predict_cli(bin_path):
    """``predict_cli(model, args)``: run nnunet_kd_predict in the model's environment."""
    def predict(model, args, timeout=600):
        return _run([bin_path("nnunet_kd_predict"), *args], model, timeout)

    return predict


def _model_args(model):
    return ["-d", str(model.dataset_id), "-c", model.configuration, "-tr", model.trainer]


def _check_outputs(model, cases, out_dir):
    for case in cases:
        pred_file = os.path.join(out_dir, case + ".nii.gz")
        assert os.path.isfile(pred_file), f"missing prediction {pred_file}"
        pred = sitk.ReadImage(pred_file)
        ref = sitk.ReadImage(model.channel_file(case, 1))
        arr = sitk.GetArrayFromImage(pred)
        assert arr.shape == sitk.GetArrayFromImage(ref).shape
        assert np.allclose(pred.GetSpacing(), ref.GetSpacing())
        assert np.allclose(pred.GetOrigin(), ref.GetOrigin())
        assert set(np.unique(arr).tolist()) <= {0, 1, 2, 3}


# --------------------------------------------------------------------------------------
# units (no model needed)
# --------------------------------------------------------------------------------------
def test_zero_fill_missing_numpy_and_torch():
    rng = np.random.default_rng(0)
    data = rng.normal(size=(4, 3, 4, 5)).astype(np.float32)
    data[1, 0, 0, 0] = -0.0
    out = zero_fill_missing(data, [0, 2])
    assert isinstance(out, np.ndarray) and out.dtype == data.dtype and out.shape == data.shape
    assert np.all(out[[0, 2]] == 0) and not np.signbit(out[[0, 2]]).any()
    assert np.array_equal(out[[1, 3]].view(np.uint32), data[[1, 3]].view(np.uint32))  # bit-identical
    assert not np.all(data[0] == 0)  # input untouched
    t = torch.from_numpy(data)
    out_t = zero_fill_missing(t, (2, 0))
    assert isinstance(out_t, torch.Tensor) and torch.equal(out_t, torch.from_numpy(out))
    assert not torch.all(t[0] == 0)
    assert np.array_equal(zero_fill_missing(data, []), data)
    with pytest.raises(PredictionError):
        zero_fill_missing(data, [4])


def test_resolve_available_names_aliases_and_errors():
    names = {0: "T1", 1: "T1ce", 2: "T2", 3: "FLAIR"}
    assert resolve_available(["flair", "T1CE"], names) == [1, 3]
    assert resolve_available(["t1c", "t2f"], names) == [1, 3]
    assert resolve_available(["T2,FLAIR"], names) == [2, 3]
    assert resolve_available(None, names) is None
    with pytest.raises(PredictionError, match="PD.*T1.*T1ce.*T2.*FLAIR"):
        resolve_available(["T1ce", "PD"], names)
    with pytest.raises(PredictionError, match="at least one"):
        resolve_available([], names)


def test_truncated_input_is_a_clean_error(tmp_path):
    """A cut-off scan is a PredictionError naming the file before nnU-Net's reader zero-fills it."""
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(16, 16, 16)).astype(np.float32))
    path = str(tmp_path / "CASE_0001.nii.gz")
    sitk.WriteImage(image, path)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    predictor = SimpleNamespace(dataset_json={"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}})
    with pytest.raises(PredictionError, match="CASE_0001.nii.gz"):
        read_case_with_placeholders(predictor, {1: path}, "CASE")


# --------------------------------------------------------------------------------------
# command line on the trained model
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("available", [["t1c"], ["T1ce", "flair"]], ids=["T1ce", "T1ce+FLAIR"])
def test_cli_missing_modalities(missing_modality_model, two_cases, tmp_path, available, predict_cli):
    channels = sorted(CHANNELS[{"t1c": "T1ce", "flair": "FLAIR"}.get(a, a)] for a in available)
    in_dir = _input_folder(missing_modality_model, two_cases, channels, tmp_path / "in")
    out_dir = str(tmp_path / "out")
    proc = predict_cli(missing_modality_model, ["-i", in_dir, "-o", out_dir, *_model_args(missing_modality_model), *COMMON,
                                 "--available", *available])
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_outputs(missing_modality_model, two_cases, out_dir)
    with open(os.path.join(out_dir, "missing_modalities_input.json")) as f:
        info = json.load(f)
    for case in two_cases:
        assert info["cases"][case]["available"] == "+".join(n for n, c in CHANNELS.items() if c in channels)


def test_cli_infers_available_per_case(missing_modality_model, two_cases, tmp_path, predict_cli):
    a, b = two_cases
    in_dir = _input_folder(missing_modality_model, two_cases, {a: [1], b: [1, 3]}, tmp_path / "in")
    out_dir = str(tmp_path / "out")
    proc = predict_cli(missing_modality_model, ["-i", in_dir, "-o", out_dir, "-m", missing_modality_model.model_folder, *COMMON])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    line_a = next(line for line in lines if line.startswith(f"case {a}:"))
    line_b = next(line for line in lines if line.startswith(f"case {b}:"))
    assert "inferred" in line_a and "T1ce" in line_a and "FLAIR" not in line_a.split("(")[0]
    assert "T1, T2, FLAIR" in line_a  # zero-filled
    assert "T1ce, FLAIR" in line_b and "T1, T2" in line_b
    _check_outputs(missing_modality_model, two_cases, out_dir)


def test_cli_all_four_equals_stock_nnunet_predict(missing_modality_model, two_cases, tmp_path, predict_cli, bin_path):
    in_dir = _input_folder(missing_modality_model, two_cases, [0, 1, 2, 3], tmp_path / "in")
    ours, stock = str(tmp_path / "ours"), str(tmp_path / "stock")
    proc = predict_cli(missing_modality_model, ["-i", in_dir, "-o", ours, *_model_args(missing_modality_model), *COMMON,
                                 "--available", "T1", "T1ce", "T2", "FLAIR"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run([bin_path("nnUNetv2_predict"), "-i", in_dir, "-o", stock, *_model_args(missing_modality_model),
                 *COMMON], missing_modality_model)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _check_outputs(missing_modality_model, two_cases, ours)
    for case in two_cases:
        a = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(ours, case + ".nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(stock, case + ".nii.gz")))
        assert a.dtype == b.dtype and np.array_equal(a, b), f"{case}: differs from nnUNetv2_predict"


def _assert_clean_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "error:" in proc.stderr
    for n in needles:
        assert n in proc.stderr, f"{n!r} not in {proc.stderr!r}"


def test_cli_unknown_modality(missing_modality_model, two_cases, tmp_path, predict_cli):
    in_dir = _input_folder(missing_modality_model, two_cases[:1], [1], tmp_path / "in")
    proc = predict_cli(missing_modality_model, ["-i", in_dir, "-o", str(tmp_path / "out"), *_model_args(missing_modality_model), *COMMON,
                                 "--available", "T1ce", "PD"])
    _assert_clean_error(proc, "'PD'", "T1", "T1ce", "T2", "FLAIR")


def test_cli_missing_file_for_available_modality(missing_modality_model, two_cases, tmp_path, predict_cli):
    case = two_cases[0]
    in_dir = _input_folder(missing_modality_model, [case], [1], tmp_path / "in")
    proc = predict_cli(missing_modality_model, ["-i", in_dir, "-o", str(tmp_path / "out"), *_model_args(missing_modality_model), *COMMON,
                                 "--available", "T1ce", "FLAIR"])
    _assert_clean_error(proc, case, f"{case}_0003.nii.gz", "FLAIR")
    assert not os.path.exists(os.path.join(tmp_path, "out", case + ".nii.gz"))


def test_cli_available_without_names(missing_modality_model, two_cases, tmp_path, predict_cli):
    in_dir = _input_folder(missing_modality_model, two_cases[:1], [1], tmp_path / "in")
    proc = predict_cli(missing_modality_model, ["-i", in_dir, "-o", str(tmp_path / "out"), *_model_args(missing_modality_model), *COMMON,
                                 "--available"])
    _assert_clean_error(proc, "--available")


def test_cli_missing_model_or_checkpoint(missing_modality_model, two_cases, tmp_path, predict_cli):
    in_dir = _input_folder(missing_modality_model, two_cases[:1], [1], tmp_path / "in")
    missing = str(tmp_path / "no_such_model")
    proc = predict_cli(missing_modality_model, ["-i", in_dir, "-o", str(tmp_path / "out"), "-m", missing, *COMMON])
    _assert_clean_error(proc, missing)
    proc = predict_cli(missing_modality_model, ["-i", in_dir, "-o", str(tmp_path / "out"), *_model_args(missing_modality_model), *COMMON,
                                 "-chk", "checkpoint_nope.pth"])
    _assert_clean_error(proc, "checkpoint_nope.pth")


# --------------------------------------------------------------------------------------
# Python API on the trained model
# --------------------------------------------------------------------------------------
def test_api_case_without_files(missing_modality_model, tmp_path):
    with pytest.raises(PredictionError, match="no modality file"):
        predict_with_missing_modalities(missing_modality_model.model_folder, {"CASE": {}}, str(tmp_path), folds=["all"],
                                        device="cpu")
    assert not os.listdir(tmp_path)


def test_zero_filling_equals_network_fed_explicit_zeros(missing_modality_model, two_cases):
    """Preprocessing only T1ce + FLAIR gives exactly the full case with T1, T2 zeroed; so do the logits."""
    from nnunet_kd.training.modality_mask import apply_modality_mask

    predictor = load_predictor(missing_modality_model.model_folder, ["all"], device="cpu", use_mirroring=False,
                               allow_tqdm=False)
    case = two_cases[0]
    files = {c: missing_modality_model.channel_file(case, c) for c in range(4)}
    full, full_props = preprocess_case_with_missing(predictor, files)
    part, part_props = preprocess_case_with_missing(predictor, {1: files[1], 3: files[3]})
    assert part_props["bbox_used_for_cropping"] == full_props["bbox_used_for_cropping"]
    assert part.dtype == np.float32 and part.shape == full.shape

    manual = full.copy()
    manual[[0, 2]] = 0
    assert np.array_equal(part, manual)
    assert np.array_equal(part[[1, 3]], full[[1, 3]]) and not np.any(part[[0, 2]])
    # the same as the trainer's masking of a (batch of one) full case
    trained_way = apply_modality_mask(torch.from_numpy(full)[None], torch.tensor([[False, True, False, True]]),
                                      [0, 1, 2, 3])[0]
    assert torch.equal(trained_way, torch.from_numpy(part))
    assert torch.equal(zero_fill_missing(torch.from_numpy(full), [0, 2]), torch.from_numpy(part))

    logits_ours = predictor.predict_sliding_window_return_logits(torch.from_numpy(part))
    logits_zeros = predictor.predict_sliding_window_return_logits(torch.from_numpy(manual))
    assert torch.equal(logits_ours, logits_zeros)
    logits_full = predictor.predict_sliding_window_return_logits(torch.from_numpy(full))
    assert not torch.equal(logits_ours, logits_full)  # the zeroed channels do matter
