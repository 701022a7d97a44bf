"""BraTS-style scoring of segmentation folders: Dice and HD95 for WT, TC and ET (the legacy metrics).

Predictions and references are NIfTI files (``*.nii.gz``) matched by file name; other
files are ignored. Every file is read whole (:func:`nnunet_kd.nifti.read_image`: a truncated
file is an error, not a zero-filled read); prediction and reference must lie on the same voxel
grid. Metrics and label conventions: :mod:`nnunet_kd.evaluation.metrics`.

Outputs (:func:`write_results`): ``metrics.json`` (``{"mean": {...}, "cases": {...}}``, written atomically),
``metrics.csv`` (columns case, region, dice, hd95) and one box plot per region
(``metrics_WT.png``, ...; Dice and HD95 side by side).

:func:`evaluate_case`, :func:`evaluate_pairs` and :func:`evaluate_folders` are meant to be reused
(e.g. by the missing-modality evaluation and by :mod:`nnunet_kd.evaluation.modes`, which adds the
official lesion-wise metrics). The ``nnunet_kd_evaluate`` command is :mod:`nnunet_kd.evaluation.evaluate_cli`.
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_kd.atomic import atomic_write_json
from nnunet_kd.evaluation.metrics import (CaseMetrics, EvaluationError, label_mapping, mean_metrics, region_metrics,
                                          to_nnunet_labels)
from nnunet_kd.evaluation.plots import plot_region_boxplots
from nnunet_kd.evaluation.tables import write_region_table
from nnunet_kd.nifti import NiftiError, grid_mismatch, read_image

NIFTI_SUFFIX = ".nii.gz"

#: A label map as read: the image (geometry) and its voxels (z, y, x).
Segmentation = Tuple[sitk.Image, np.ndarray]

# Tolerances when comparing the geometry of a prediction with its reference.
_SPACING_RTOL = 1e-4
_ORIGIN_ATOL = 1e-3
_DIRECTION_ATOL = 1e-4


# --------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------
def case_name(filename: str) -> str:
    """File name without the ``.nii.gz`` suffix."""
    base = os.path.basename(filename)
    return base[: -len(NIFTI_SUFFIX)] if base.endswith(NIFTI_SUFFIX) else base


def list_cases(folder: str, what: str = "folder") -> Dict[str, str]:
    """``{case: path}`` of the ``*.nii.gz`` files in ``folder``; raises EvaluationError if none."""
    if not os.path.isdir(folder):
        raise EvaluationError(f"{what} {folder!r} does not exist or is not a folder")
    files = {
        case_name(f): os.path.join(folder, f)
        for f in sorted(os.listdir(folder))
        if f.endswith(NIFTI_SUFFIX) and len(f) > len(NIFTI_SUFFIX) and os.path.isfile(os.path.join(folder, f))
    }
    if not files:
        raise EvaluationError(f"{what} {folder!r} contains no {NIFTI_SUFFIX} files")
    return files


def match_cases(ref_dir: str, pred_dir: str) -> Dict[str, Tuple[str, str]]:
    """``{case: (pred_file, ref_file)}``; raises EvaluationError naming missing / extra cases."""
    refs = list_cases(ref_dir, "reference folder")
    preds = list_cases(pred_dir, "prediction folder")
    missing = sorted(set(refs) - set(preds))
    extra = sorted(set(preds) - set(refs))
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing predictions for {len(missing)} case(s): {', '.join(missing)}")
        if extra:
            parts.append(f"{len(extra)} prediction(s) without a reference: {', '.join(extra)}")
        raise EvaluationError(
            f"prediction folder {pred_dir!r} and reference folder {ref_dir!r} hold different cases; "
            + "; ".join(parts)
        )
    return {c: (preds[c], refs[c]) for c in sorted(refs)}


def read_segmentation(path: str) -> Segmentation:
    """Read a whole label map: ``(sitk.Image, array (z, y, x))``; EvaluationError naming the file otherwise."""
    try:
        image, array = read_image(path)
    except NiftiError as e:
        raise EvaluationError(str(e)) from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise EvaluationError(f"{path!r} is a vector image; a single-channel label map is needed")
    return image, array


def check_geometry(case: str, pred_file: str, ref_file: str, pred: Segmentation, ref: Segmentation) -> None:
    """``pred`` and ``ref`` are ``(image, array)``; EvaluationError unless they share the voxel grid."""
    if pred[1].shape != ref[1].shape:
        raise EvaluationError(
            f"case {case}: shape mismatch, prediction {pred_file!r} has shape {pred[1].shape} (z, y, x) "
            f"but reference {ref_file!r} has {ref[1].shape}"
        )
    problem = grid_mismatch(pred[0], ref[0], spacing_rtol=_SPACING_RTOL, origin_atol=_ORIGIN_ATOL,
                            direction_atol=_DIRECTION_ATOL)
    if problem:
        raise EvaluationError(
            f"case {case}: geometry mismatch, prediction {pred_file!r} against reference {ref_file!r}: {problem}"
        )


def evaluate_case(pred_file: str, ref_file: str, labels: str = "nnunet") -> CaseMetrics:
    """Dice and HD95 for WT, TC and ET of one prediction file against its reference file.

    Both files use the label convention ``labels`` (``nnunet``, ``brats2021`` or ``brats2023``);
    shape and geometry (spacing, origin, direction) must agree.
    """
    label_mapping(labels)
    ref = read_segmentation(ref_file)
    pred = read_segmentation(pred_file)
    check_geometry(case_name(ref_file), pred_file, ref_file, pred, ref)
    spacing = tuple(float(s) for s in ref[0].GetSpacing())[::-1]  # array axis order
    ref_labels = to_nnunet_labels(ref[1], ref_file, labels)
    return region_metrics(to_nnunet_labels(pred[1], pred_file, labels), ref_labels, spacing)


def _evaluate_job(job: Tuple[str, str, str, str]) -> Tuple[str, CaseMetrics]:
    case, pred_file, ref_file, labels = job
    return case, evaluate_case(pred_file, ref_file, labels)


def default_num_processes() -> int:
    """min(4, number of CPUs)."""
    return max(1, min(4, os.cpu_count() or 1))


def evaluate_pairs(pairs: Mapping[str, Tuple[str, str]], labels: str = "nnunet",
                   num_processes: Optional[int] = None, progress: bool = True) -> Dict[str, CaseMetrics]:
    """Evaluate ``{case: (pred_file, ref_file)}`` in parallel; returns ``{case: region metrics}`` sorted by case."""
    from tqdm import tqdm

    label_mapping(labels)  # fail early on an unknown convention
    if not pairs:
        raise EvaluationError("no cases to evaluate")
    jobs = [(case, p, r, labels) for case, (p, r) in sorted(pairs.items())]
    n = default_num_processes() if num_processes is None else int(num_processes)
    n = max(1, min(n, len(jobs)))
    results: Dict[str, CaseMetrics] = {}
    with tqdm(total=len(jobs), desc="evaluating", unit="case", disable=not progress) as bar:
        if n == 1:
            for job in jobs:
                case, metrics = _evaluate_job(job)
                results[case] = metrics
                bar.update(1)
        else:
            with multiprocessing.get_context().Pool(n) as pool:
                for case, metrics in pool.imap(_evaluate_job, jobs):
                    results[case] = metrics
                    bar.update(1)
    return {case: results[case] for case in sorted(results)}


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------
def output_stem(output_json: str) -> str:
    """``metrics.json`` -> ``metrics`` (the prefix of the CSV and the plots)."""
    stem, ext = os.path.splitext(output_json)
    return stem if ext.lower() == ".json" else output_json


def write_results(results: Mapping, output_json: str, plots: bool = True, model: str = "") -> List[str]:
    """Write ``{"mean", "cases"}`` to ``output_json`` (atomically), plus CSV and box plots beside it.

    ``model`` titles the box plots. Returns the paths written.
    """
    atomic_write_json(results, output_json)
    stem = output_stem(output_json)
    cases = results["cases"]
    written = [output_json, write_region_table(stem + ".csv", "case", ((c, cases[c]) for c in sorted(cases)))]
    if plots:
        written.extend(plot_region_boxplots(cases, stem, model))
    return written


def evaluate_folders(
    ref_dir: str,
    pred_dir: str,
    output_json: Optional[str] = None,
    labels: str = "nnunet",
    num_processes: Optional[int] = None,
    plots: bool = True,
    progress: bool = True,
    model: Optional[str] = None,
) -> Dict[str, Dict]:
    """Score every prediction in ``pred_dir`` against the same-named reference in ``ref_dir``.

    Returns ``{"mean": {region: {"dice", "hd95"}}, "cases": {case: {region: {"dice", "hd95"}}}}``.
    If ``output_json`` is given, writes it atomically plus ``<stem>.csv`` and, if ``plots``,
    ``<stem>_WT.png``, ``<stem>_TC.png``, ``<stem>_ET.png``, titled ``model`` (default: ``pred_dir``'s name).
    """
    label_mapping(labels)
    pairs = match_cases(ref_dir, pred_dir)
    cases = evaluate_pairs(pairs, labels=labels, num_processes=num_processes, progress=progress)
    results = {"mean": mean_metrics(cases), "cases": cases}
    if output_json is not None:
        write_results(results, output_json, plots=plots,
                      model=model or os.path.basename(os.path.normpath(os.path.abspath(pred_dir))))
    return results


if __name__ == "__main__":  # ``python -m nnunet_kd.evaluation.evaluate``: the command of evaluate_cli.py
    import runpy

    runpy.run_module("nnunet_kd.evaluation.evaluate_cli", run_name="__main__")
