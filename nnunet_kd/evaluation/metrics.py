"""BraTS metrics: Dice and HD95 of the regions WT, TC and ET, their means, and the label conventions.

Labels are mapped to nnU-Net's BraTS convention (1 ED, 2 NCR, 3 ET, see :mod:`nnunet_kd.brats`)
before the regions WT = {1, 2, 3}, TC = {2, 3}, ET = {3} are formed.

Metric conventions (BraTS 2018-2021), per case and region:

* Dice = 2 |P & R| / (|P| + |R|); both empty -> 1.
* HD95 in mm from :func:`medpy.metric.binary.hd95` with the image spacing (array axis
  order); both empty -> 0; exactly one empty -> Dice 0 and HD95 ``BRATS_HD95_PENALTY``.
"""
from __future__ import annotations

import argparse
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from nnunet_kd.brats import (LABEL_CONVENTION_ALIASES, NNUNET_LABELS, REGIONS, RELEASE_TO_NNUNET,
                             canonical_label_convention, map_labels, region_masks)

#: HD95 (mm) assigned when exactly one of prediction and reference is empty (BraTS 2018-2021 convention: the
#: diagonal of the 240 x 240 x 155 voxel, 1 mm BraTS volume).
BRATS_HD95_PENALTY: float = 373.13

#: Label conventions accepted by ``--labels``; ``nnunet`` means labels are already 0/1/2/3 (1 ED, 2 NCR, 3 ET).
LABEL_CONVENTIONS: Tuple[str, ...] = ("nnunet", "brats2021", "brats2023")
#: What ``--labels`` accepts: the conventions plus the years 2018-2020, which the parser turns into brats2021.
LABEL_CHOICES: Tuple[str, ...] = LABEL_CONVENTIONS + tuple(LABEL_CONVENTION_ALIASES)

#: Names of the metrics stored per region.
METRICS: Tuple[str, ...] = ("dice", "hd95")

CaseMetrics = Dict[str, Dict[str, float]]  # region -> {"dice": x, "hd95": x}


class EvaluationError(ValueError):
    """Bad input to the evaluation (missing files, mismatched cases, geometry or labels)."""


# --------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------
def label_mapping(labels: str) -> Dict[int, int]:
    """Lookup table from a label convention to nnU-Net labels."""
    if labels == "nnunet":
        return {v: v for v in sorted(NNUNET_LABELS.values())}
    if labels in RELEASE_TO_NNUNET:
        return dict(RELEASE_TO_NNUNET[labels])
    raise EvaluationError(
        f"unknown label convention {labels!r}; choose one of {', '.join(LABEL_CONVENTIONS)}"
    )


def to_nnunet_labels(array: np.ndarray, path: str, labels: str) -> np.ndarray:
    """The label map ``array`` (read from ``path``, convention ``labels``) in nnU-Net labels.

    EvaluationError naming the file when a value is not an integer or not in the convention.
    """
    mapping = label_mapping(labels)
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


# --------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------
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
    return {name: {"dice": float(dice_score(pred_masks[name], ref_masks[name])),
                   "hd95": float(hd95_score(pred_masks[name], ref_masks[name], spacing))}
            for name in REGIONS}


# --------------------------------------------------------------------------------------
# means
# --------------------------------------------------------------------------------------
def mean_metrics(cases: Mapping[str, CaseMetrics]) -> CaseMetrics:
    """Mean over cases of every region's Dice and HD95 (penalty values included)."""
    if not cases:
        raise EvaluationError("no cases to average")
    return {region: {metric: float(np.mean([float(c[region][metric]) for c in cases.values()]))
                     for metric in METRICS} for region in REGIONS}


def mean_over_combinations(combinations: Mapping[str, Mapping]) -> CaseMetrics:
    """Per region and metric, the mean of the combinations' means (``{combo: {"mean": CaseMetrics}}``)."""
    return mean_metrics({name: entry["mean"] for name, entry in combinations.items()})


#: ``--metrics`` choices: the legacy (2018-2021) case-wise metrics, the lesion-wise ones of the official BraTS 2023+
#: package BraTS-evaluation, or both.
METRIC_MODES: Tuple[str, ...] = ("legacy", "lesionwise", "both")


def add_labels_argument(parser: argparse.ArgumentParser, help_start: str) -> None:
    """``--labels``: a convention of LABEL_CONVENTIONS; brats2018/2019/2020 are parsed as brats2021."""
    parser.add_argument("--labels", default="nnunet", choices=LABEL_CHOICES, type=canonical_label_convention,
                        help=f"{help_start}: nnunet (1 ED, 2 NCR, 3 ET; default), brats2021 (1 NCR, 2 ED, 4 ET; "
                             "the labels of BraTS 2018-2021, so brats2018, brats2019 and brats2020 mean the same) "
                             "or brats2023 (1 NCR, 2 ED, 3 ET)")


def add_metrics_arguments(parser: argparse.ArgumentParser) -> None:
    """``--metrics`` and ``--cohort``, the same in every command that scores segmentations."""
    parser.add_argument("--metrics", default="legacy", choices=METRIC_MODES,
                        help="legacy: BraTS 2018-2021 Dice/HD95 of WT, TC, ET (default); lesionwise: the official "
                             "BraTS 2023+ metrics (needs pip install \"nnunet-kd[brats-eval]\"); both")
    parser.add_argument("--cohort", help="lesion-wise only: BraTS cohort key such as GLI-2024, PED-2024 (default: "
                                         "the brats_cohort of the references' dataset.json, else GLI-2023)")
