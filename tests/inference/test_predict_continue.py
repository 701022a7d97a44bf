"""nnunet_kd_predict's output folder stays true to its record: --continue_prediction redoes cases predicted
from other modalities, and -i/-o may not be the same or nested folders."""
from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kd.inference.models import load_predictor
from nnunet_kd.inference.predict import predict_with_missing_modalities

RECORD_NAME = "missing_modalities_input.json"  # the record nnunet_kd_predict writes beside the segmentations


@pytest.mark.parametrize("relation", ["same", "output inside input", "input inside output", "same via symlink"])
def test_same_or_nested_input_and_output_are_refused(tmp_path, bin_path, relation):
    inp = tmp_path / "in"
    inp.mkdir()
    out = {"same": inp, "output inside input": inp / "seg", "input inside output": tmp_path,
           "same via symlink": tmp_path / "link"}[relation]
    if relation == "same via symlink":
        out.symlink_to(inp)
    # the model folder does not exist: the folders must be checked first, before anything is loaded
    proc = subprocess.run([bin_path("nnunet_kd_predict"), "-i", str(inp), "-o", str(out), "-m",
                           str(tmp_path / "no_model"), "-f", "all", "-device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and f"-i {inp}" in proc.stderr and f"-o {out}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in inp.iterdir()) == []


def _labels(path: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def test_continue_prediction_redoes_cases_with_other_modalities(missing_modality_model, tmp_path):
    model = missing_modality_model
    predictor = load_predictor(model.model_folder, ["all"], device="cpu", use_mirroring=False, allow_tqdm=False)
    case = model.cases()[0]
    t1ce_flair = {case: {1: model.channel_file(case, 1), 3: model.channel_file(case, 3)}}
    t1ce = {case: {1: model.channel_file(case, 1)}}

    def predict(cases, out, overwrite=False):
        return predict_with_missing_modalities(model.model_folder, cases, str(out), predictor=predictor,
                                               num_processes=1, num_processes_preprocessing=1,
                                               overwrite=overwrite, log=None)

    out = tmp_path / "out"
    [seg] = predict(t1ce_flair, out)
    # Mark the segmentation so that we can tell whether it was predicted again.
    image = sitk.ReadImage(seg)
    marked = sitk.GetImageFromArray(np.full(sitk.GetArrayFromImage(image).shape, 3, np.uint8))
    marked.CopyInformation(image)
    sitk.WriteImage(marked, seg)

    predict(t1ce_flair, out)  # same modalities: kept
    assert np.all(_labels(seg) == 3)

    predict(t1ce, out)  # T1ce alone: predicted again, and the record says so
    fresh_out = tmp_path / "fresh"
    [fresh] = predict(t1ce, fresh_out, overwrite=True)
    np.testing.assert_array_equal(_labels(seg), _labels(fresh))
    record = json.loads((out / RECORD_NAME).read_text())["cases"][case]
    assert record["available"] == "T1ce" and "FLAIR" in record["missing_zero_filled"]
    assert record == json.loads((fresh_out / RECORD_NAME).read_text())["cases"][case]

    # A segmentation without a record (e.g. written by another tool) is not trusted either.
    sitk.WriteImage(marked, seg)
    os.remove(out / RECORD_NAME)
    predict(t1ce, out)
    np.testing.assert_array_equal(_labels(seg), _labels(fresh))
