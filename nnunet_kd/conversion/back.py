"""Predictions back to a release's labels (``--to-brats``): nnU-Net's 1 ED, 2 NCR, 3 ET become the labels
of the chosen release, or of the 2023+ cohort (given, named by the predictions' dataset.json, or by the
case names BraTS-<COHORT>-... when the year's cohorts label differently), with file names and geometry kept."""
from __future__ import annotations

import json
import os
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_kd.atomic import make_temp_dir
from nnunet_kd.brats import (COHORTS, Cohort, cohort_for, cohorts_of_year, label_conventions, nnunet_to_release,
                             parse_case_id, to_original)
from nnunet_kd.conversion.cases import label_image, read_case_image, write_image
from nnunet_kd.conversion.releases import (GLI_RELEASES, RELEASES, ConversionError, check_input_dir, is_hidden,
                                           nifti_stem, normalize_release)


def _prediction_names(pred_dir: str) -> List[str]:
    """The NIfTI files of a prediction folder, sorted (json files nnU-Net writes beside them are skipped)."""
    return sorted(n for n in os.listdir(pred_dir)
                  if nifti_stem(n) is not None and not is_hidden(n) and os.path.isfile(os.path.join(pred_dir, n)))


def _cohort_choices(year: int) -> str:
    return ", ".join(sorted({c.prefix for c in cohorts_of_year(year)}))


def _cohort_from_names(pred_dir: str, year: int, case_ids: Sequence[str]) -> Cohort:
    """The cohort every case id names (BraTS-<COHORT>-...); ConversionError naming --cohort otherwise."""
    choices = _cohort_choices(year)
    named: Dict[Optional[str], List[str]] = {}
    for case_id in case_ids:
        parsed = parse_case_id(case_id)
        named.setdefault(None if parsed is None else parsed[0], []).append(case_id)
    if not named or list(named) == [None]:
        raise ConversionError(
            f"BraTS {year} cohorts use different label values, and nothing tells which cohort the predictions in "
            f"{pred_dir} are of (no --cohort, no dataset.json with brats_cohort beside them, file names not "
            f"BraTS-<COHORT>-...): pass --cohort, one of {choices}")
    if len(named) > 1:
        found = "; ".join(f"{prefix or 'no cohort'}: {ids[0]}" + (f" and {len(ids) - 1} more" if len(ids) > 1 else "")
                          for prefix, ids in sorted(named.items(), key=lambda kv: kv[0] or ""))
        raise ConversionError(
            f"the file names in {pred_dir} do not agree on one cohort ({found}) and BraTS {year} cohorts use "
            f"different label values: convert one cohort's predictions at a time, or pass --cohort, one of {choices}")
    prefix, ids = next(iter(named.items()))
    try:
        return cohort_for(prefix, year)
    except ValueError as e:
        raise ConversionError(f"the file names in {pred_dir} name cohort {prefix} (e.g. {ids[0]}), but {e}; pass the "
                              f"--year of the model's data, or --cohort, one of {choices}") from None


def choose_prediction_cohort(pred_dir: str, year: str, cohort: Optional[str] = None,
                             case_ids: Optional[Sequence[str]] = None) -> Tuple[Optional[Cohort], str]:
    """(cohort whose labels the predictions get, how it was chosen); (None, "") means the release's own labels.

    In order: ``cohort`` (GLI, MEN, PED, ...) in ``year``; for a 2023+ ``year`` the ``brats_cohort`` of the
    dataset.json nnUNetv2_predict copies beside the predictions; where the year's cohorts label differently
    (2024+), the cohort all ``case_ids`` (default: the prediction file names) name, else ConversionError
    asking for --cohort. Never a guess."""
    release = normalize_release(year)
    if cohort is not None:
        if release not in GLI_RELEASES:
            raise ConversionError(f"--cohort needs a 2023+ release (--year 2023, 2024 or 2025), got {year}")
        try:
            return cohort_for(cohort, int(release[len("brats"):])), "chosen by --cohort"
        except ValueError as e:
            raise ConversionError(str(e)) from None
    if release not in GLI_RELEASES:  # 2018-2021 / msd labels were asked for
        return None, ""
    meta = os.path.join(pred_dir, "dataset.json")
    if os.path.isfile(meta):
        try:
            with open(meta, encoding="utf-8") as f:
                key = json.load(f).get("brats_cohort")
        except (OSError, ValueError, AttributeError) as e:
            raise ConversionError(f"cannot read {meta}: {e}") from None
        if key is not None and key not in COHORTS:
            raise ConversionError(f"{meta} names an unknown BraTS cohort {key!r}")
        if key is not None:
            return COHORTS[key], f"from brats_cohort in {meta}"
    year_number = int(release[len("brats"):])
    if label_conventions(year_number) <= 1:  # 2023: every cohort has the same labels
        return None, ""
    if case_ids is None:
        case_ids = [nifti_stem(n) for n in _prediction_names(pred_dir)]
    return _cohort_from_names(pred_dir, year_number, case_ids), "from the file names"


def prediction_cohort(pred_dir: str, year: str, cohort: Optional[str] = None,
                      case_ids: Optional[Sequence[str]] = None) -> Optional[Cohort]:
    """The 2023+ cohort whose labels the predictions get, or None (the release's own labels); see
    choose_prediction_cohort."""
    return choose_prediction_cohort(pred_dir, year, cohort, case_ids)[0]


def _label_hint(release: str, chosen: Optional[Cohort], how: str) -> str:
    """What to do when a prediction holds labels outside the set used."""
    if chosen is not None:
        year = int(release[len("brats"):])
        return (f"these are the nnU-Net labels of cohort {chosen.key} ({how}); if the model was trained on another "
                f"cohort, pass --cohort, one of {_cohort_choices(year)}")
    return ("a model trained on 2024+ labels with more compartments (RC, CC) needs --year 2024 or 2025 and its "
            "--cohort")


def convert_to_brats(pred_dir: str, out_dir: str, year: str, cohort: Optional[str] = None) -> List[str]:
    """Map nnU-Net predictions (1 ED, 2 NCR, 3 ET) in ``pred_dir`` back to the labels of ``year``
    (ET = 4 up to 2021, 3 for 2023/2024, Decathlon convention for msd), keeping file names and
    geometry; 2023+ cohorts get their own labels (see choose_prediction_cohort). Files are written to a
    temporary folder first and moved into ``out_dir`` only when
    every prediction converted. Returns the written files."""
    release = normalize_release(year)
    convention = RELEASES[release][0]
    pred_dir = check_input_dir(pred_dir)
    names = _prediction_names(pred_dir)
    if not names:
        raise ConversionError(f"no NIfTI predictions (.nii.gz/.nii) in {pred_dir}")
    chosen, how = choose_prediction_cohort(pred_dir, year, cohort, [nifti_stem(n) for n in names])
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
                raise ConversionError(f"case {nifti_stem(n)}: prediction {path}: {e}; "
                                      f"{_label_hint(release, chosen, how)}") from None
            write_image(label_image(mapped, img), os.path.join(tmp, n))
        for n in names:
            os.replace(os.path.join(tmp, n), os.path.join(out_dir, n))
            written.append(os.path.join(out_dir, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
