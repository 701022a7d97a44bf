"""Paired per-case comparison: known values, interval coverage, the Wilcoxon test against scipy's definition."""
from __future__ import annotations

import math

import numpy as np
import pytest

from nnunet_kd.experiments.study.paired import bootstrap_interval, paired_difference, verdict, wilcoxon_p


def _cases(values_by_case):
    return {c: {r: {"dice": d, "hd95": h} for r in ("WT", "TC", "ET")} for c, (d, h) in values_by_case.items()}


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_cases():
    rng = np.random.default_rng(1)
    small = rng.normal(0.05, 0.1, size=10)
    large = rng.normal(0.05, 0.1, size=400)
    lo_s, hi_s = bootstrap_interval(small)
    lo_l, hi_l = bootstrap_interval(large)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 4  # ~ 1/sqrt(n): sqrt(40) ~ 6.3
    # the percentile interval of a normal mean is close to mean +- 1.96 s / sqrt(n)
    half = 1.96 * large.std(ddof=1) / math.sqrt(large.size)
    assert abs((hi_l - lo_l) / 2 - half) < 0.15 * half


def test_constant_differences_give_a_point_interval_and_too_few_give_nan():
    assert bootstrap_interval([0.2, 0.2, 0.2]) == pytest.approx((0.2, 0.2))
    assert all(math.isnan(v) for v in bootstrap_interval([0.3]))
    assert math.isnan(wilcoxon_p([0.3])) and wilcoxon_p([0.0, 0.0, 0.0]) == 1.0


def test_wilcoxon_known_value():
    # 6 positive differences with distinct ranks: exact two-sided p = 2 / 2**6
    assert wilcoxon_p([0.1, 0.2, 0.3, 0.4, 0.5, 0.6]) == pytest.approx(2 / 64)
    assert wilcoxon_p([-0.1, 0.2, -0.3, 0.4, -0.5, 0.6]) > 0.5


def test_paired_difference_per_region_and_metric():
    model = _cases({"a": (0.8, 5.0), "b": (0.7, 8.0), "c": (0.9, 2.0), "only_model": (0.1, 90.0)})
    base = _cases({"a": (0.6, 9.0), "b": (0.6, 8.0), "c": (0.6, 4.0)})
    out = paired_difference(model, base)
    dice, hd = out["WT"]["dice"], out["WT"]["hd95"]
    assert dice["n"] == 3  # only the shared cases
    assert dice["mean"] == pytest.approx((0.2 + 0.1 + 0.3) / 3)
    assert hd["mean"] == pytest.approx((-4.0 + 0.0 - 2.0) / 3)
    assert dice["better"] == 3 and hd["better"] == 2  # lower HD95 is better; a tie is not
    assert dice["low"] <= dice["mean"] <= dice["high"]
    assert verdict(dice, "dice") == "better" and verdict(hd, "hd95") == "no difference shown"
    assert verdict({"low": -0.3, "high": -0.1}, "dice") == "worse"
    assert verdict({"low": 1.0, "high": 3.0}, "hd95") == "worse"
    with pytest.raises(ValueError, match="share no scored case"):
        paired_difference(_cases({"x": (1, 1)}), base)
