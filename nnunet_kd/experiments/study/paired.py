"""Paired per-case comparison of two models: mean difference, bootstrap interval, Wilcoxon signed-rank test.

A claim that one model beats another on the same cases rests on the per-case differences, not on two
means with their spreads: the cases differ far more from each other than the models do.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import numpy as np

from nnunet_kd.brats import REGIONS
from nnunet_kd.evaluation.metrics import METRICS, CaseMetrics


def bootstrap_interval(differences: Sequence[float], confidence: float = 0.95, resamples: int = 10000,
                       seed: int = 0) -> tuple:
    """Percentile bootstrap interval of the mean of ``differences`` (N,): resample cases with replacement.

    Returns ``(low, high)``; ``(nan, nan)`` for fewer than 2 differences.
    """
    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = 100 * (1 - confidence) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def wilcoxon_p(differences: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of ``differences`` (N,) against 0; 1.0 when all are 0, nan for N < 2."""
    from scipy.stats import wilcoxon

    d = np.asarray(differences, dtype=float)
    if d.size < 2:
        return float("nan")
    if np.all(d == 0):
        return 1.0
    return float(wilcoxon(d, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_difference(model: Mapping[str, CaseMetrics], baseline: Mapping[str, CaseMetrics],
                      confidence: float = 0.95, resamples: int = 10000, seed: int = 0) -> Dict[str, Dict[str, dict]]:
    """Per region and metric, ``model - baseline`` over the cases both were scored on.

    ``model``, ``baseline``: ``{case: {region: {"dice": x, "hd95": x}}}``. Returns
    ``{region: {metric: {"mean", "low", "high", "p", "n", "better"}}}`` where ``better`` counts the cases in
    which the model is better (higher Dice, lower HD95). Raises ValueError when no case is shared.
    """
    cases = sorted(set(model) & set(baseline))
    if not cases:
        raise ValueError("the two models share no scored case")
    out: Dict[str, Dict[str, dict]] = {}
    for region in REGIONS:
        out[region] = {}
        for metric in METRICS:
            d = np.array([model[c][region][metric] - baseline[c][region][metric] for c in cases], dtype=float)
            low, high = bootstrap_interval(d, confidence, resamples, seed)
            better = int(np.sum(d > 0)) if metric == "dice" else int(np.sum(d < 0))
            out[region][metric] = {"mean": float(d.mean()), "low": low, "high": high, "p": wilcoxon_p(d),
                                   "n": len(cases), "better": better}
    return out


def verdict(entry: Mapping[str, float], metric: str) -> str:
    """``better``, ``worse`` or ``no difference shown`` from a difference's interval (Dice up / HD95 down is better)."""
    low, high = entry["low"], entry["high"]
    if not (np.isfinite(low) and np.isfinite(high)) or low <= 0 <= high:
        return "no difference shown"
    improved = low > 0 if metric == "dice" else high < 0
    return "better" if improved else "worse"
