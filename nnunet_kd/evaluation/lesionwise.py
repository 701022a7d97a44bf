"""The official BraTS 2023+ metrics (lesion-wise and global Dice / HD95) through the official package.

Since 2023 the BraTS challenges rank by lesion-wise Dice and HD95. They are computed by the official
evaluation package ``BraTS-evaluation`` (module ``brats_evaluation``, built on ``panoptica``) with one
bundled panoptica config per task: ``gli``, ``ped``, ``mets``, ``MenRT``, ``MenPre``, ``GoAT``. This
module adds no metric of its own: it runs the official evaluator on label arrays and reads the
numbers back through the official parser (``parse_seg_results``; ``parse_mets_results`` for ``mets``),
exactly the two steps of the package's ``brats-evaluate`` and ``brats-parse-metrics`` commands.

The package is an optional extra: ``pip install "nnunet-kd[brats-eval]"``.

Per case and region the official parser reports, and this module returns:

* ``lesion_dice``, ``lesion_hd95``: lesion-wise Dice / HD95 (the leaderboard metrics);
* ``global_dice``, ``global_hd95``: Dice / HD95 of the whole region (HD95 infinity -> 373, the parser's
  penalty). Regions empty in both prediction and reference give NaN (the legacy metrics give 1 / 0);
* ``lesion_tp``, ``lesion_fp``, ``lesion_fn``: matched, extra and missed lesions.

In BraTS-evaluation 0.0.10 the ``seg`` parser's lesion-wise Dice / HD95 are panoptica's segmentation
quality, the mean over *matched* lesions: missed and extra lesions show in the counts only. The
``mets`` parser scores missed and extra lesions above its volume threshold as Dice 0 / HD95 373.

Known behaviour of panoptica 2.1.7 (the pinned version): the global HD95 is computed in voxel units,
whatever the spacing; lesion-wise HD95 uses the spacing. On BraTS data (1 mm isotropic) the two agree
with millimetres. Arrays are passed with their spacing in array axis order.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
import math
import os
import tempfile
import types
import warnings
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

#: pip extra that installs the official package, and the command naming it.
EXTRA = "brats-eval"
INSTALL_HINT = f'pip install "nnunet-kd[{EXTRA}]"'
#: Panoptica configs bundled with the official package.
BUNDLED_CONFIGS: Tuple[str, ...] = ("gli", "ped", "mets", "MenRT", "MenPre", "GoAT")
#: Metrics returned per case and region.
LESIONWISE_METRICS: Tuple[str, ...] = ("lesion_dice", "lesion_hd95", "global_dice", "global_hd95",
                                       "lesion_tp", "lesion_fp", "lesion_fn")
#: Lesion volume threshold (voxels) and Dice overlap threshold of the metastasis parser: the defaults of
#: the official ``brats-parse-metrics mets`` command.
METS_VOLUME_THRESHOLD = 20.0
METS_OVERLAP_THRESHOLD = 0.1

# Official parser CSV column prefix -> our metric name.
_COLUMNS = {"lesionwise_dsc_mean": "lesion_dice", "lesionwise_hd95_mean": "lesion_hd95",
            "global_dsc": "global_dice", "global_hd95": "global_hd95",
            "all_instance_tp": "lesion_tp", "all_instance_fp": "lesion_fp", "all_instance_fn": "lesion_fn"}

CaseRecord = Dict[str, Any]  # what the official evaluate_single_exam records for one case
RegionMetrics = Dict[str, Dict[str, float]]  # region -> metric -> value


class OfficialPackageMissing(ImportError):
    """The optional official BraTS evaluation package is not installed."""


def official_package() -> types.ModuleType:
    """Import and return ``brats_evaluation``; OfficialPackageMissing naming the extra if it is absent."""
    try:
        import brats_evaluation
        import panoptica  # noqa: F401  (the evaluator behind it)
    except ImportError as e:
        raise OfficialPackageMissing(
            f"lesion-wise metrics need the official BraTS evaluation package (BraTS-evaluation with panoptica), "
            f"which is not installed ({e}); install the extra with: {INSTALL_HINT}") from None
    return brats_evaluation


def is_available() -> bool:
    """True if the official package can be imported."""
    try:
        official_package()
    except OfficialPackageMissing:
        return False
    return True


@contextlib.contextmanager
def _quiet():
    """Silence panoptica's citation banner, config notes and warnings (they would interleave with ours)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@functools.lru_cache(maxsize=None)
def _evaluator(config: str):
    if config not in BUNDLED_CONFIGS:
        raise ValueError(f"unknown BraTS evaluation config {config!r}; bundled: {', '.join(BUNDLED_CONFIGS)}")
    package = official_package()
    from panoptica import Panoptica_Evaluator

    with _quiet():
        return Panoptica_Evaluator.load_from_config(str(package.config_path(config)))


def evaluate_case(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], config: str,
                  case: str) -> CaseRecord:
    """Run the official evaluator of ``config`` on one case.

    ``pred`` and ``ref``: integer label maps of the same shape in the labels of the config's task
    (e.g. 1 NETC, 2 SNFH, 3 ET, 4 RC for ``gli``); ``spacing``: voxel size in mm, array axis order.
    Returns the record the official ``evaluate_single_exam`` keeps: ``{group: result dict, ...,
    "subject_name": case}``. Raises ValueError naming the case for shapes or labels the config rejects.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"case {case}: prediction shape {pred.shape} differs from reference shape {ref.shape}")
    if len(spacing) != ref.ndim:
        raise ValueError(f"case {case}: spacing {tuple(spacing)} does not match a {ref.ndim}-D array")
    evaluator = _evaluator(config)
    try:
        with _quiet():
            results = evaluator.evaluate(pred.astype(np.uint8), ref.astype(np.uint8),
                                         voxelspacing=tuple(float(s) for s in spacing))
    except (ValueError, TypeError, AssertionError) as e:
        raise ValueError(f"case {case}: the official '{config}' evaluation rejected the labels: {e}") from None
    record: CaseRecord = {group: result.to_dict(True) for group, result in results.items()}
    record["subject_name"] = case
    return record


def summarize(records: Sequence[CaseRecord], config: str, regions: Mapping[str, str]) -> Dict[str, RegionMetrics]:
    """Per-case metrics of ``regions`` (official group -> our region name) through the official parser.

    Returns ``{case: {region: {metric: value}}}`` with the metrics of ``LESIONWISE_METRICS``.
    """
    package = official_package()
    if not records:
        raise ValueError("no cases to summarize")
    missing = sorted(set(regions) - set(records[0]) - {"subject_name"})
    if missing:
        raise ValueError(f"config {config!r} has no region(s) {missing}; it has "
                         f"{sorted(k for k in records[0] if k != 'subject_name')}")
    with tempfile.TemporaryDirectory(prefix="brats_eval_") as tmp:
        summary = os.path.join(tmp, "panoptica_evaluation_summary.json")
        table = os.path.join(tmp, "parsed_metrics.csv")
        with open(summary, "w", encoding="utf-8") as f:
            json.dump({"metrics": list(records), "missings": []}, f)
        with _quiet():
            if config == "mets":
                package.parse_mets_results(summary, METS_VOLUME_THRESHOLD, METS_OVERLAP_THRESHOLD, table)
            else:
                package.parse_seg_results(summary, table)
        if not os.path.exists(table):
            raise ValueError(f"the official parser wrote no table for {len(records)} case(s) (config {config!r})")
        with open(table, newline="", encoding="utf-8") as f:
            rows = {row["subject_id"]: row for row in csv.DictReader(f)}
    out: Dict[str, RegionMetrics] = {}
    for record in records:
        case = record["subject_name"]
        row = rows[case]
        out[case] = {name: {metric: _number(row.get(f"{column}_{group}", ""))
                            for column, metric in _COLUMNS.items()}
                     for group, name in regions.items()}
    return out


def _number(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def lesionwise_metrics(cases: Mapping[str, Tuple[np.ndarray, np.ndarray, Sequence[float]]], config: str,
                       regions: Mapping[str, str]) -> Dict[str, RegionMetrics]:
    """Official metrics of ``{case: (pred, ref, spacing)}`` (labels of the config's task), see summarize."""
    records: List[CaseRecord] = [evaluate_case(p, r, s, config, case) for case, (p, r, s) in cases.items()]
    return summarize(records, config, regions)
