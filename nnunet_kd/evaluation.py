"""BraTS-style evaluation of segmentation folders: Dice and HD95 for WT, TC and ET.

Command line::

    nnunet_kd_evaluate -r REF_DIR -p PRED_DIR -o metrics.json [--labels nnunet|brats2021|brats2023] [-np N]

Predictions and references are NIfTI files (``*.nii.gz``) matched by file name; other
files are ignored. Labels are mapped to nnU-Net's BraTS convention (1 ED, 2 NCR, 3 ET,
see :mod:`nnunet_kd.brats`) before the regions WT = {1, 2, 3}, TC = {2, 3}, ET = {3}
are formed.

Metric conventions (BraTS 2018-2021), per case and region:

* Dice = 2 |P & R| / (|P| + |R|); both empty -> 1.
* HD95 in mm from :func:`medpy.metric.binary.hd95` with the image spacing (array axis
  order); both empty -> 0; exactly one empty -> Dice 0 and HD95 ``BRATS_HD95_PENALTY``.

Outputs: ``metrics.json`` (``{"mean": {...}, "cases": {...}}``, written atomically),
``metrics.csv`` (columns case, region, dice, hd95) and one box plot per region
(``metrics_WT.png``, ...; Dice and HD95 side by side).

The functions :func:`region_metrics`, :func:`evaluate_case`, :func:`evaluate_pairs`,
:func:`evaluate_folders`, :func:`mean_metrics`, :func:`write_results` and
:func:`plot_region_boxplots` are meant to be reused (e.g. by the missing-modality
evaluation).
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import sys
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from nnunet_kd.atomic import atomic_write_json, atomic_write_text
from nnunet_kd.brats import REGIONS, RELEASE_TO_NNUNET, map_labels, region_masks

#: HD95 (mm) assigned when exactly one of prediction and reference is empty (BraTS convention).
BRATS_HD95_PENALTY: float = 373.13

#: Label conventions accepted by ``--labels``; ``nnunet`` means labels are already 0/1/2/3 (1 ED, 2 NCR, 3 ET).
LABEL_CONVENTIONS: Tuple[str, ...] = ("nnunet", "brats2021", "brats2023")

#: Names of the metrics stored per region.
METRICS: Tuple[str, ...] = ("dice", "hd95")

NIFTI_SUFFIX = ".nii.gz"

# Tolerances when comparing the geometry of a prediction with its reference.
_SPACING_RTOL = 1e-4
_ORIGIN_ATOL = 1e-3
_DIRECTION_ATOL = 1e-4

CaseMetrics = Dict[str, Dict[str, float]]  # region -> {"dice": x, "hd95": x}


class EvaluationError(ValueError):
    """Bad input to the evaluation (missing files, mismatched cases, geometry or labels)."""


# --------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------
def label_mapping(labels: str) -> Dict[int, int]:
    """Lookup table from a label convention to nnU-Net labels."""
    if labels == "nnunet":
        return {0: 0, 1: 1, 2: 2, 3: 3}
    if labels in RELEASE_TO_NNUNET:
        return dict(RELEASE_TO_NNUNET[labels])
    raise EvaluationError(
        f"unknown label convention {labels!r}; choose one of {', '.join(LABEL_CONVENTIONS)}"
    )


def dice_score(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two boolean masks; 1.0 when both are empty."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    n_pred = int(np.count_nonzero(pred))
    n_ref = int(np.count_nonzero(ref))
    if n_pred + n_ref == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / (n_pred + n_ref)


def hd95_score(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """HD95 in mm of two boolean masks (medpy), with the BraTS conventions for empty masks.

    ``spacing`` is in array axis order.
    """
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    has_pred = bool(pred.any())
    has_ref = bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0
    if has_pred != has_ref:
        return BRATS_HD95_PENALTY
    from medpy.metric.binary import hd95

    return float(hd95(pred, ref, voxelspacing=tuple(float(s) for s in spacing)))


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> Dict[str, float]:
    """``{"dice": x, "hd95": x}`` for two boolean masks (spacing in array axis order)."""
    return {"dice": float(dice_score(pred, ref)), "hd95": float(hd95_score(pred, ref, spacing))}


def region_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> CaseMetrics:
    """Dice and HD95 for WT, TC and ET of one case.

    ``pred`` and ``ref`` are label maps in nnU-Net labels (0 background, 1 ED, 2 NCR, 3 ET);
    ``spacing`` is the voxel size in mm in the array's axis order.
    Returns ``{"WT": {"dice": x, "hd95": x}, "TC": {...}, "ET": {...}}``.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise EvaluationError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ref.ndim:
        raise EvaluationError(f"spacing {spacing} has {len(spacing)} entries for a {ref.ndim}-D array")
    pred_masks = region_masks(pred)
    ref_masks = region_masks(ref)
    return {name: binary_metrics(pred_masks[name], ref_masks[name], spacing) for name in REGIONS}


def mean_metrics(cases: Mapping[str, CaseMetrics]) -> CaseMetrics:
    """Mean over cases of every region's Dice and HD95 (penalty values included)."""
    if not cases:
        raise EvaluationError("no cases to average")
    out: CaseMetrics = {}
    for region in REGIONS:
        out[region] = {}
        for metric in METRICS:
            values = [float(c[region][metric]) for c in cases.values()]
            out[region][metric] = float(np.mean(values))
    return out


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


def read_segmentation(path: str):
    """Read a segmentation: ``(array, spacing in array axis order, (spacing_xyz, origin, direction))``."""
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unreadable"
        raise EvaluationError(f"cannot read {path!r}: {first}") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise EvaluationError(f"{path!r} is a vector image; a single-channel label map is needed")
    array = sitk.GetArrayFromImage(image)
    spacing_xyz = tuple(float(s) for s in image.GetSpacing())
    geometry = (spacing_xyz, tuple(float(v) for v in image.GetOrigin()), tuple(float(v) for v in image.GetDirection()))
    return array, spacing_xyz[::-1], geometry


def _check_labels(array: np.ndarray, path: str, labels: str, mapping: Mapping[int, int]) -> np.ndarray:
    values = np.unique(array)
    if np.issubdtype(values.dtype, np.floating):
        non_integer = values[~np.isfinite(values) | (values != np.round(values))]
        if non_integer.size:
            raise EvaluationError(
                f"{path!r} has non-integer label values {non_integer[:10].tolist()}; "
                f"allowed for --labels {labels}: {sorted(mapping)}"
            )
    bad = sorted(set(int(v) for v in values) - set(mapping))
    if bad:
        raise EvaluationError(
            f"{path!r} has label values {bad} outside the {labels} convention (allowed: {sorted(mapping)})"
        )
    return map_labels(array.astype(np.int64, copy=False), mapping)


def _check_geometry(case: str, pred_file: str, ref_file: str, pred_array, ref_array, pred_geo, ref_geo) -> None:
    if pred_array.shape != ref_array.shape:
        raise EvaluationError(
            f"case {case}: shape mismatch, prediction {pred_file!r} has shape {pred_array.shape} (z, y, x) "
            f"but reference {ref_file!r} has {ref_array.shape}"
        )
    checks = (
        ("spacing", pred_geo[0], ref_geo[0], lambda a, b: np.allclose(a, b, rtol=_SPACING_RTOL, atol=0)),
        ("origin", pred_geo[1], ref_geo[1], lambda a, b: np.allclose(a, b, rtol=0, atol=_ORIGIN_ATOL)),
        ("direction", pred_geo[2], ref_geo[2], lambda a, b: np.allclose(a, b, rtol=0, atol=_DIRECTION_ATOL)),
    )
    for name, p, r, same in checks:
        if len(p) != len(r) or not same(np.asarray(p), np.asarray(r)):
            raise EvaluationError(
                f"case {case}: geometry mismatch ({name}), prediction {pred_file!r} has {name} {p} "
                f"but reference {ref_file!r} has {r}"
            )


def evaluate_case(pred_file: str, ref_file: str, labels: str = "nnunet") -> CaseMetrics:
    """Dice and HD95 for WT, TC and ET of one prediction file against its reference file.

    Both files use the label convention ``labels`` (``nnunet``, ``brats2021`` or ``brats2023``);
    shape and geometry (spacing, origin, direction) must agree.
    """
    mapping = label_mapping(labels)
    case = case_name(ref_file)
    ref_array, spacing, ref_geo = read_segmentation(ref_file)
    pred_array, _, pred_geo = read_segmentation(pred_file)
    _check_geometry(case, pred_file, ref_file, pred_array, ref_array, pred_geo, ref_geo)
    ref = _check_labels(ref_array, ref_file, labels, mapping)
    pred = _check_labels(pred_array, pred_file, labels, mapping)
    return region_metrics(pred, ref, spacing)


def _evaluate_job(job: Tuple[str, str, str, str]) -> Tuple[str, CaseMetrics]:
    case, pred_file, ref_file, labels = job
    return case, evaluate_case(pred_file, ref_file, labels)


def default_num_processes() -> int:
    """min(4, number of CPUs)."""
    return max(1, min(4, os.cpu_count() or 1))


def evaluate_pairs(
    pairs: Mapping[str, Tuple[str, str]],
    labels: str = "nnunet",
    num_processes: Optional[int] = None,
    progress: bool = True,
    desc: str = "evaluating",
) -> Dict[str, CaseMetrics]:
    """Evaluate ``{case: (pred_file, ref_file)}`` in parallel; returns ``{case: region metrics}`` sorted by case."""
    from tqdm import tqdm

    label_mapping(labels)  # fail early on an unknown convention
    if not pairs:
        raise EvaluationError("no cases to evaluate")
    jobs = [(case, p, r, labels) for case, (p, r) in sorted(pairs.items())]
    n = default_num_processes() if num_processes is None else int(num_processes)
    n = max(1, min(n, len(jobs)))
    results: Dict[str, CaseMetrics] = {}
    with tqdm(total=len(jobs), desc=desc, unit="case", disable=not progress) as bar:
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


def write_csv(cases: Mapping[str, CaseMetrics], path: str) -> str:
    """CSV with columns case, region, dice, hd95 (one row per case and region), written atomically."""
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["case", "region", "dice", "hd95"])
    for case in sorted(cases):
        for region in REGIONS:
            m = cases[case][region]
            writer.writerow([case, region, repr(float(m["dice"])), repr(float(m["hd95"]))])
    atomic_write_text(path, buf.getvalue())
    return path


def plot_region_boxplots(cases: Mapping[str, CaseMetrics], out_prefix: str) -> List[str]:
    """One PNG per region (``{out_prefix}_WT.png`` ...), Dice and HD95 box plots side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    folder = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(folder, exist_ok=True)
    paths = []
    for region in REGIONS:
        dice = [float(c[region]["dice"]) for c in cases.values()]
        hd = [float(c[region]["hd95"]) for c in cases.values()]
        fig = Figure(figsize=(8, 4.5))
        FigureCanvasAgg(fig)
        ax_dice, ax_hd = fig.subplots(1, 2)
        for ax, values, title, ylabel in (
            (ax_dice, dice, "Dice", "Dice"),
            (ax_hd, hd, "HD95", "HD95 (mm)"),
        ):
            ax.boxplot(values, widths=0.5, showmeans=True, showfliers=False)  # points drawn below
            jitter = np.random.default_rng(0).uniform(-0.08, 0.08, size=len(values))
            ax.scatter(1 + jitter, values, s=10, alpha=0.6, color="tab:blue", zorder=3)
            ax.set_xticks([1])
            ax.set_xticklabels([region])
            ax.set_title(f"{region} {title} (n={len(values)}, mean={np.mean(values):.3f})" if values else title)
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
        ax_dice.set_ylim(-0.02, 1.02)
        fig.tight_layout()
        path = f"{out_prefix}_{region}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


def write_results(results: Mapping, output_json: str, plots: bool = True, csv_file: bool = True) -> List[str]:
    """Write ``{"mean", "cases"}`` to ``output_json`` (atomically), plus CSV and box plots beside it.

    Returns the paths written.
    """
    atomic_write_json(results, output_json)
    written = [output_json]
    stem = output_stem(output_json)
    if csv_file:
        written.append(write_csv(results["cases"], stem + ".csv"))
    if plots:
        written.extend(plot_region_boxplots(results["cases"], stem))
    return written


def evaluate_folders(
    ref_dir: str,
    pred_dir: str,
    output_json: Optional[str] = None,
    labels: str = "nnunet",
    num_processes: Optional[int] = None,
    plots: bool = True,
    progress: bool = True,
) -> Dict[str, Dict]:
    """Score every prediction in ``pred_dir`` against the same-named reference in ``ref_dir``.

    Returns ``{"mean": {region: {"dice", "hd95"}}, "cases": {case: {region: {"dice", "hd95"}}}}``.
    If ``output_json`` is given, writes it atomically plus ``<stem>.csv`` and, if ``plots``,
    ``<stem>_WT.png``, ``<stem>_TC.png``, ``<stem>_ET.png``.
    """
    label_mapping(labels)
    pairs = match_cases(ref_dir, pred_dir)
    cases = evaluate_pairs(pairs, labels=labels, num_processes=num_processes, progress=progress)
    results = {"mean": mean_metrics(cases), "cases": cases}
    if output_json is not None:
        write_results(results, output_json, plots=plots)
    return results


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet_kd_evaluate",
        description="BraTS evaluation (Dice, HD95 in mm) of WT, TC, ET for a folder of .nii.gz predictions.",
    )
    p.add_argument("-r", "--ref", required=True, help="folder with reference segmentations (.nii.gz)")
    p.add_argument("-p", "--pred", required=True, help="folder with predicted segmentations (same file names)")
    p.add_argument("-o", "--output", required=True, help="output JSON; CSV and PNG box plots are written beside it")
    p.add_argument(
        "--labels", default="nnunet", choices=LABEL_CONVENTIONS,
        help="label convention of both folders: nnunet (1 ED, 2 NCR, 3 ET; default), "
             "brats2021 (1 NCR, 2 ED, 4 ET) or brats2023 (1 NCR, 2 ED, 3 ET)",
    )
    p.add_argument("-np", "--num-processes", type=int, default=default_num_processes(),
                   help="worker processes (default: min(4, CPUs))")
    p.add_argument("--no-plots", action="store_true", help="skip the box plots")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.num_processes < 1:
            raise EvaluationError(f"-np must be at least 1, got {args.num_processes}")
        results = evaluate_folders(
            args.ref, args.pred, args.output, labels=args.labels,
            num_processes=args.num_processes, plots=not args.no_plots,
        )
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for region, m in results["mean"].items():
        print(f"{region}: Dice {m['dice']:.4f}  HD95 {m['hd95']:.2f} mm")
    print(f"{len(results['cases'])} cases; written {args.output}")
    return 0


if __name__ == "__main__":
    main()
