"""The evaluation modes: ``legacy`` (BraTS 2018-2021 case-wise Dice / HD95 of WT, TC, ET; metrics.py),
``lesionwise`` (the BraTS 2023+ leaderboard metrics of the official BraTS-evaluation package; lesionwise.py)
or ``both``.

:func:`evaluate_with_metrics` is the one entry point for commands and the study. Lesion-wise metrics
need the cohort whose labels and official config apply: given, or the ``brats_cohort`` that the
converter wrote into the dataset.json above a ``labelsTr`` reference folder, else BraTS 2023 GLI (the
2018-2021 glioma regions are its regions).
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
from typing import Dict, Iterable, Mapping, Optional, Tuple

import numpy as np

from nnunet_kd.atomic import atomic_write_json, atomic_write_text
from nnunet_kd.brats import COHORTS, RELEASE_TO_NNUNET, Cohort
from nnunet_kd.evaluation import lesionwise
from nnunet_kd.evaluation.evaluate import (check_geometry, default_num_processes, evaluate_pairs, match_cases,
                                           output_stem, read_segmentation, write_results)
from nnunet_kd.evaluation.metrics import METRIC_MODES, EvaluationError, label_mapping, mean_metrics

DEFAULT_COHORT = "GLI-2023"
Pairs = Mapping[str, Tuple[str, str]]  # case -> (prediction file, reference file)


def check_mode(metrics: str) -> str:
    """``metrics`` if it is a mode of METRIC_MODES, else EvaluationError naming the choices."""
    if metrics not in METRIC_MODES:
        raise EvaluationError(f"unknown --metrics {metrics!r}; choose one of {', '.join(METRIC_MODES)}")
    return metrics


def require_official_package() -> None:
    """EvaluationError naming the ``brats-eval`` extra when the official package is missing."""
    try:
        lesionwise.official_package()
    except lesionwise.OfficialPackageMissing as e:
        raise EvaluationError(str(e)) from None


def resolve_cohort(cohort: Optional[str], ref_dir: Optional[str] = None) -> Cohort:
    """The cohort named ``cohort`` (a key such as ``GLI-2024``), else the ``brats_cohort`` of the dataset.json
    in ``ref_dir`` or its parent, else BraTS 2023 GLI."""
    if cohort is None and ref_dir is not None:
        for folder in (ref_dir, os.path.dirname(os.path.abspath(ref_dir))):
            path = os.path.join(folder, "dataset.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    cohort = json.load(f).get("brats_cohort")
                break
    key = cohort or DEFAULT_COHORT
    if key not in COHORTS:
        raise EvaluationError(f"unknown BraTS cohort {key!r}; choose one of {', '.join(COHORTS)}")
    return COHORTS[key]


def to_cohort_labels(array: np.ndarray, path: str, labels: str, cohort: Cohort) -> np.ndarray:
    """A label map in convention ``labels`` as the cohort's original labels (what the official configs read).

    ``nnunet``: the converter's nnU-Net labels of the cohort; ``brats2021``: 2018-2021 glioma labels;
    ``brats2023``: the cohort's own 2023+ label values. EvaluationError naming the file for other values.
    """
    label_mapping(labels)
    if labels == "nnunet":
        mapping = cohort.from_nnunet
    elif labels == "brats2021":
        mapping = {k: cohort.from_nnunet[v] for k, v in RELEASE_TO_NNUNET["brats2021"].items()}
    else:
        mapping = {v: v for v in cohort.allowed_labels}
    values = np.unique(array)
    bad = [v for v in values.tolist() if not (float(v).is_integer() and int(v) in mapping)]
    if bad:
        raise EvaluationError(f"{path!r} has label values {bad} outside the {labels} labels of BraTS {cohort.key} "
                              f"(allowed: {sorted(mapping)})")
    lut = np.zeros(max(mapping) + 1, np.uint8)
    for src, dst in mapping.items():
        lut[src] = dst
    return lut[array.astype(np.int64)]


def _lesionwise_job(job) -> Dict:
    case, pred_file, ref_file, pred_labels, ref_labels, key = job
    cohort = COHORTS[key]
    ref = read_segmentation(ref_file)
    pred = read_segmentation(pred_file)
    check_geometry(case, pred_file, ref_file, pred, ref)
    spacing = tuple(float(s) for s in ref[0].GetSpacing())[::-1]  # array axis order
    try:
        return lesionwise.evaluate_case(to_cohort_labels(pred[1], pred_file, pred_labels, cohort),
                                        to_cohort_labels(ref[1], ref_file, ref_labels, cohort), spacing,
                                        cohort.eval_config, case)
    except ValueError as e:
        raise EvaluationError(str(e)) from None


def lesionwise_pairs(pairs: Pairs, cohort: Cohort, pred_labels: str = "nnunet", ref_labels: str = "nnunet",
                     num_processes: Optional[int] = None) -> Dict:
    """Official lesion-wise (and global) metrics of ``{case: (pred_file, ref_file)}``.

    Returns ``{"cohort", "config", "mean": {region: {metric: nanmean}}, "cases": {case: {region: {metric}}}}``
    with the metrics of lesionwise.LESIONWISE_METRICS and the regions of the cohort's official config.
    """
    require_official_package()
    if not pairs:
        raise EvaluationError("no cases to evaluate")
    jobs = [(c, p, r, pred_labels, ref_labels, cohort.key) for c, (p, r) in sorted(pairs.items())]
    n = max(1, min(default_num_processes() if num_processes is None else int(num_processes), len(jobs)))
    if n == 1:
        records = [_lesionwise_job(j) for j in jobs]
    else:
        with multiprocessing.get_context().Pool(n) as pool:
            records = pool.map(_lesionwise_job, jobs)
    cases = lesionwise.summarize(records, cohort.eval_config, cohort.eval_regions)
    regions = list(cohort.eval_regions.values())
    mean = {r: {m: _nanmean([cases[c][r][m] for c in cases]) for m in lesionwise.LESIONWISE_METRICS}
            for r in regions}
    return {"cohort": cohort.key, "config": cohort.eval_config, "mean": mean, "cases": cases}


def _nanmean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def write_lesionwise_table(path: str, first_column: str, rows: Iterable[Tuple[str, Mapping]]) -> str:
    """CSV with columns ``first_column``, region and the lesion-wise metrics, one line per region of each
    ``(name, {region: metrics})`` of ``rows`` (written atomically); returns ``path``."""
    lines = [",".join((first_column, "region") + lesionwise.LESIONWISE_METRICS)]
    for name, regions in rows:
        for region, m in regions.items():
            lines.append(",".join([name, region] + [repr(float(m[k])) for k in lesionwise.LESIONWISE_METRICS]))
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def evaluate_with_metrics(ref_dir: str, pred_dir: str, output_json: Optional[str] = None, metrics: str = "legacy",
                          labels: str = "nnunet", cohort: Optional[str] = None,
                          num_processes: Optional[int] = None, plots: bool = True, progress: bool = True,
                          model: Optional[str] = None) -> Dict:
    """Score the predictions of ``pred_dir`` against the same-named references of ``ref_dir``.

    ``metrics``: ``legacy`` -> ``{"mean", "cases"}`` of evaluate.evaluate_folders; ``lesionwise`` ->
    ``{"lesionwise": lesionwise_pairs(...)}``; ``both`` -> both keys. ``labels``: convention of both folders;
    ``cohort``: see resolve_cohort. With ``output_json``: the JSON (atomically), the legacy CSV and plots
    (titled ``model``, default ``pred_dir``'s name) beside it, and ``<stem>_lesionwise.csv``.
    EvaluationError on bad input or a missing extra.
    """
    check_mode(metrics)
    label_mapping(labels)
    chosen = resolve_cohort(cohort, ref_dir) if metrics != "legacy" else None
    if chosen is not None:
        require_official_package()  # before any work
    pairs = match_cases(ref_dir, pred_dir)
    results: Dict = {}  # legacy alone: exactly evaluate_folders' {"mean", "cases"}
    if metrics in ("legacy", "both"):
        cases = evaluate_pairs(pairs, labels=labels, num_processes=num_processes, progress=progress)
        results.update({"mean": mean_metrics(cases), "cases": cases})
    if chosen is not None:
        results["metrics"] = metrics
        results["lesionwise"] = lesionwise_pairs(pairs, chosen, labels, labels, num_processes)
    if output_json is not None:
        if "cases" in results:
            write_results(results, output_json, plots=plots,
                          model=model or os.path.basename(os.path.normpath(os.path.abspath(pred_dir))))
        else:
            atomic_write_json(results, output_json)
        if chosen is not None:
            write_lesionwise_table(output_stem(output_json) + "_lesionwise.csv", "case",
                                   sorted(results["lesionwise"]["cases"].items()))
    return results
