"""Predictions back to a release's labels (``--to-brats``): nnU-Net's 1 ED, 2 NCR, 3 ET become the labels
of the chosen release, or of the 2023+ cohort (given, or named by the predictions' dataset.json), with
file names and geometry kept."""
from __future__ import annotations

import json
import os
import shutil
from typing import List, Optional

import numpy as np

from nnunet_kd.atomic import make_temp_dir
from nnunet_kd.brats import nnunet_to_release
from nnunet_kd.conversion.cohorts import COHORTS, Cohort, cohort_for, to_original
from nnunet_kd.conversion.cases import label_image, read_case_image, write_image
from nnunet_kd.conversion.releases import (GLI_RELEASES, RELEASES, ConversionError, check_input_dir, is_hidden,
                                           nifti_stem,
                                           normalize_release)


def prediction_cohort(pred_dir: str, year: str, cohort: Optional[str] = None) -> Optional[Cohort]:
    """The 2023+ cohort whose labels the predictions get: ``cohort`` (GLI, MEN, PED, ...) in ``year``, else for
    a 2023+ ``year`` the ``brats_cohort`` that the converter wrote into the dataset.json nnUNetv2_predict
    copies beside the predictions, else None (the release's own labels)."""
    release = normalize_release(year)
    if cohort is not None:
        if release not in GLI_RELEASES:
            raise ConversionError(f"--cohort needs a 2023+ release (--year 2023, 2024 or 2025), got {year}")
        try:
            return cohort_for(cohort, int(release[len("brats"):]))
        except ValueError as e:
            raise ConversionError(str(e)) from None
    meta = os.path.join(pred_dir, "dataset.json")
    if release not in GLI_RELEASES or not os.path.isfile(meta):  # 2018-2021 / msd labels were asked for
        return None
    try:
        with open(meta, encoding="utf-8") as f:
            key = json.load(f).get("brats_cohort")
    except (OSError, ValueError, AttributeError) as e:
        raise ConversionError(f"cannot read {meta}: {e}") from None
    if key is not None and key not in COHORTS:
        raise ConversionError(f"{meta} names an unknown BraTS cohort {key!r}")
    return COHORTS.get(key) if key is not None else None


def convert_to_brats(pred_dir: str, out_dir: str, year: str, cohort: Optional[str] = None) -> List[str]:
    """Map nnU-Net predictions (1 ED, 2 NCR, 3 ET) in ``pred_dir`` back to the labels of ``year``
    (ET = 4 up to 2021, 3 for 2023/2024, Decathlon convention for msd), keeping file names and
    geometry; 2023+ cohorts get their own labels (see prediction_cohort). Files are written to a
    temporary folder first and moved into ``out_dir`` only when
    every prediction converted. Returns the written files."""
    convention = RELEASES[normalize_release(year)][0]
    pred_dir = check_input_dir(pred_dir)
    chosen = prediction_cohort(pred_dir, year, cohort)
    names = sorted(n for n in os.listdir(pred_dir)
                   if nifti_stem(n) is not None and not is_hidden(n) and os.path.isfile(os.path.join(pred_dir, n)))
    if not names:
        raise ConversionError(f"no NIfTI predictions (.nii.gz/.nii) in {pred_dir}")
    out_dir = os.path.abspath(out_dir)
    if out_dir == pred_dir:
        raise ConversionError("the output folder must differ from the prediction folder")
    os.makedirs(out_dir, exist_ok=True)
    tmp = make_temp_dir(out_dir, ".to_brats.partial-")
    written = []
    try:
        for n in names:
            path = os.path.join(pred_dir, n)
            img, arr = read_case_image(path, nifti_stem(n), "prediction")
            try:
                arr = arr.astype(np.int64)
                mapped = nnunet_to_release(arr, convention) if chosen is None else to_original(arr, chosen)
            except ValueError as e:
                raise ConversionError(f"case {nifti_stem(n)}: prediction {path}: {e}") from None
            write_image(label_image(mapped, img), os.path.join(tmp, n))
        for n in names:
            os.replace(os.path.join(tmp, n), os.path.join(out_dir, n))
            written.append(os.path.join(out_dir, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
