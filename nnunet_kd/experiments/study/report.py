"""The study's report: the paired differences to the baseline over the pooled held-out cases, the learning
curves' flattening, and the files (study.json, study.md, study_dice.png, study_paired.png,
study_gradient_shares.png, study_learning_curves.png)."""
from __future__ import annotations

import platform
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np

from nnunet_kd.atomic import atomic_write_json, atomic_write_text
from nnunet_kd.brats import REGIONS
from nnunet_kd.evaluation.metrics import METRICS, mean_metrics
from nnunet_kd.experiments.datasets import plans_name_for
from nnunet_kd.experiments.study.collect import FLAT_GAIN, collect_split, flattening
from nnunet_kd.experiments.study.design import BASELINE, CONTRASTS, StudyError, StudyModel, StudySettings
from nnunet_kd.experiments.study.paired import paired_difference
from nnunet_kd.experiments.study.tables import (combinations_table, dice_differences_table, gradient_shares_table,
                                                kd_weights_table, learning_curves_table, models_table, paired_table,
                                                per_split_table)


def _pooled(tables: Mapping[str, Optional[Mapping]]) -> Optional[dict]:
    """One table of per-case scores from each split's (``split/case``), or None unless every split has one."""
    if any(table is None for table in tables.values()):
        return None
    return {f"{s}/{case}": v for s, table in tables.items() for case, v in table.items()}


def mean_gradient_shares(logs: Sequence[Mapping]) -> dict:
    """Each term's gradient share per epoch over splits: mean, lowest and highest, for the epochs that
    every split logged. ``logs``: one ``collect_split`` gradient-share entry per split."""
    epochs = min(len(log["epochs"]) for log in logs)
    terms = list(logs[0]["epochs"][0]) if epochs else []
    shares = {t: np.array([[log["epochs"][e][t] for e in range(epochs)] for log in logs], dtype=float)
              for t in terms}
    return {"measured_at": logs[0]["measured_at"], "splits": len(logs),
            "terms": {t: {"mean": v.mean(axis=0).tolist(), "low": v.min(axis=0).tolist(),
                          "high": v.max(axis=0).tolist()} for t, v in shares.items()}}


def mean_kd_weights(logs: Sequence[Mapping]) -> dict:
    """Each KD source's weight per region and epoch over splits: mean, lowest and highest, for the epochs that
    every split logged. ``logs``: one ``collect_split`` KD-weight entry per split. An epoch without weights
    (KD not started) counts 0; a source with one weight for every region (the paper's rule) has it on each.

    Returns ``{"regions": [region], "splits": n, "sources": {source: {region: {"mean", "low", "high": [epoch]}}}}``.
    """
    epochs = min(len(log["epochs"]) for log in logs)
    regions = logs[0]["regions"] or []
    sources = list(dict.fromkeys(src for log in logs for entry in log["epochs"][:epochs] if entry for src in entry))

    def weight(entry: Optional[Mapping], source: str, region: int) -> float:
        value = (entry or {}).get(source, 0.0)
        return float(value[region] if isinstance(value, (list, tuple)) else value)

    out: dict = {"regions": regions, "splits": len(logs), "sources": {}}
    for src in sources:
        values = np.array([[[weight(log["epochs"][e], src, r) for r in range(len(regions))] for e in range(epochs)]
                           for log in logs], dtype=float)  # (splits, epochs, regions)
        out["sources"][src] = {region: {"mean": values[:, :, r].mean(axis=0).tolist(),
                                        "low": values[:, :, r].min(axis=0).tolist(),
                                        "high": values[:, :, r].max(axis=0).tolist()}
                               for r, region in enumerate(regions)}
    return out


def summarise_learning_curves(per_split: Mapping[str, dict], models: Mapping[str, StudyModel]) -> dict:
    """Per model with a curve in some split: each split's curve with its :func:`flattening`, and whether it
    flattened in every split (None until every split has a curve).

    Returns ``{name: {"splits": {split: {**curve, **flattening}}, "flattened_in_every_split": bool or None}}``.
    """
    out: dict = {}
    for name in models:
        splits = {s: {**split["learning_curves"][name], **flattening(split["learning_curves"][name]["ema_fg_dice"])}
                  for s, split in per_split.items() if name in split["learning_curves"]}
        if splits:
            out[name] = {"splits": splits, "flattened_in_every_split": all(c["flattened"] for c in splits.values())
                         if len(splits) == len(per_split) else None}
    return out


def _spread(cases: Mapping[str, Mapping]) -> dict:
    """Standard deviation over cases of each region's Dice and HD95."""
    return {r: {m: float(np.std([c[r][m] for c in cases.values()], ddof=1)) if len(cases) > 1 else 0.0
                for m in METRICS} for r in REGIONS}


def summarise(per_split: Mapping[str, dict], models: Mapping[str, StudyModel]) -> dict:
    """Means over the pooled held-out cases, paired differences to the baseline, the combination tables.

    Models that have not finished every split are listed under ``incomplete``.
    """
    summary: dict = {"models": {}, "per_split": {}, "paired": {}, "combinations": {}, "gradient_shares": {},
                     "kd_weights": {}, "incomplete": {}}
    pooled = {}
    for name in models:
        cases = _pooled({s: split["models"].get(name) for s, split in per_split.items()})
        if cases is None:
            summary["incomplete"][name] = sum(name in s["models"] for s in per_split.values())
            continue
        pooled[name] = cases
        summary["models"][name] = {"n": len(cases), "mean": mean_metrics(cases), "sd": _spread(cases)}
        summary["per_split"][name] = {s: mean_metrics(split["models"][name]) for s, split in per_split.items()}
        logs = [split["gradient_shares"].get(name) for split in per_split.values()]
        if all(logs):
            summary["gradient_shares"][name] = mean_gradient_shares(logs)
        weights = [split["kd_weights"].get(name) for split in per_split.values()]
        if all(weights):
            summary["kd_weights"][name] = mean_kd_weights(weights)
    if BASELINE in pooled:
        summary["paired"] = {name: paired_difference(cases, pooled[BASELINE])
                             for name, cases in pooled.items() if name != BASELINE}
    pooled_combos = {}
    for name, model in models.items():
        names = next(iter(per_split.values()))["combinations"].get(name, {}) if model.combinations else {}
        combos = {combo: _pooled({s: split["combinations"].get(name, {}).get(combo) for s, split in per_split.items()})
                  for combo in names}
        if combos and all(v is not None for v in combos.values()):
            pooled_combos[name] = combos
            summary["combinations"][name] = {combo: mean_metrics(cases) for combo, cases in combos.items()}
    summary["contrasts"] = {}
    for name, against in CONTRASTS:
        if name in pooled and against in pooled:
            shared = [c for c in pooled_combos.get(name, {}) if c in pooled_combos.get(against, {})]
            summary["contrasts"][f"{name} vs {against}"] = {
                "T1ce-fed": paired_difference(pooled[name], pooled[against]),
                "combinations": {c: paired_difference(pooled_combos[name][c], pooled_combos[against][c])
                                 for c in shared}}
    summary["learning_curves"] = summarise_learning_curves(per_split, models)
    return summary


def source_commit() -> str:
    """The git commit of the package's checkout (``-dirty`` when it has changes), or ``unknown``."""
    repo = Path(__file__).resolve().parents[3]  # nnunet_kd/experiments/study/report.py -> the checkout
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def write_report(work: Path, per_split: Mapping[str, dict], settings: StudySettings, wall_time_s: float,
                 markdown: Optional[str] = None) -> dict:
    """study.json, study.md (and ``markdown``), study_dice.png, study_paired.png, study_gradient_shares.png,
    study_kd_weights.png and study_learning_curves.png from the splits' scores and logs."""
    from nnunet_kd.experiments.study.plots import (plot_gradient_shares, plot_kd_weights, plot_learning_curves,
                                                   plot_model_means, plot_paired_differences)

    s = settings
    summary = summarise(per_split, s.models())
    if not summary["models"]:
        raise StudyError(f"{work}: no model has finished every split yet")
    result = {"date": date.today().isoformat(), "device": s.device, "host": platform.node(),
              "commit": source_commit(), "command": " ".join(sys.argv), "splits": list(per_split),
              "settings": s.resume_record(), "wall_time_s": wall_time_s, "per_split": per_split,
              "summary": summary}
    atomic_write_json(result, str(work / "study.json"))
    plot_model_means(summary["models"], str(work / "study_dice.png"))
    if summary["paired"]:
        plot_paired_differences(summary["paired"], BASELINE, str(work / "study_paired.png"))
    if summary["gradient_shares"]:
        plot_gradient_shares(summary["gradient_shares"], str(work / "study_gradient_shares.png"))
    if summary["kd_weights"]:
        plot_kd_weights(summary["kd_weights"], str(work / "study_kd_weights.png"))
    if summary["learning_curves"]:
        plot_learning_curves(summary["learning_curves"], str(work / "study_learning_curves.png"))
    splits = ", ".join(per_split)
    if s.real_brats:
        data = (f"real cases in `{s.real_brats}`, {s.folds} folds (each case is a test case once); splits run: "
                f"{splits}")
    else:
        data = (f"synthetic data, {s.cases} training and {s.test_cases} held-out cases of "
                f"{'x'.join(map(str, s.shape))} voxels per seed; splits: {splits}")
    spacing = "nnU-Net's planned spacing" if s.target_spacing is None else \
        "target spacing " + "x".join(f"{v:g}" for v in s.target_spacing) + " mm"
    precision = "" if s.autocast == "none" else f" ({s.autocast} autocast on the CPU)"
    md = (f"{data}; {spacing}; {s.epochs} epochs x {s.iterations} iterations per model; device {s.device}{precision}; "
          f"{result['date']}; commit {result['commit']}"
          f"{f'; {wall_time_s:.0f} s' if np.isfinite(wall_time_s) else ''}.\n\n"
          "Held-out cases, T1ce-only input unless stated (Dice %, HD95 mm; mean ± sd over cases):\n\n"
          + models_table(summary) + "\n")
    if summary["paired"]:
        md += (f"\nPaired per-case differences to {BASELINE} (95% bootstrap CI of the mean difference, "
               "Wilcoxon signed-rank p; better = cases in which the model is better):\n\n"
               + paired_table(summary["paired"]) + "\n")
    for name, contrast in summary["contrasts"].items():
        md += (f"\nPaired per-case differences, {name}, fed T1ce alone:\n\n"
               + paired_table({"T1ce-fed": contrast["T1ce-fed"]}, "input") + "\n")
        if contrast["combinations"]:
            md += (f"\nThe same in each modality combination (Δ Dice in points [95% CI], Wilcoxon p):\n\n"
                   + dice_differences_table(contrast["combinations"]) + "\n")
    if len(per_split) > 1:
        md += "\nMean Dice per split (WT / TC / ET, %):\n\n" + per_split_table(summary["per_split"]) + "\n"
    if summary["gradient_shares"]:
        md += ("\nEach loss term's share of the gradient per epoch, mean over splits (the trainers' "
               "distillation_log.json; range in study.json and study_gradient_shares.png):\n\n"
               + gradient_shares_table(summary["gradient_shares"]) + "\n")
    if summary["kd_weights"]:
        md += ("\nMTCM-KD's weight of each teacher and CDSFL level per region as used in the epoch (ramp included, 0 "
               "before KD starts), mean over splits, at some epochs (every epoch and the range in study.json and "
               "study_kd_weights.png):\n\n" + kd_weights_table(summary["kd_weights"]) + "\n")
    if summary["learning_curves"]:
        md += ("\nLearning curves: nnU-Net's validation pseudo-Dice per epoch (each fold folder's "
               "checkpoint_final.pth, or checkpoint_latest.pth of an unfinished training; every epoch's values in "
               "study.json and study_learning_curves.png). Last epoch's EMA pseudo-Dice (%) per split, its gain "
               "over the last 20 % of the epochs (points; with E epochs, from epoch index ceil(0.8 E) - 1 to E - 1), "
               f"flattened when the gain is under {100 * FLAT_GAIN:g} points:\n\n"
               + learning_curves_table(summary["learning_curves"], list(per_split)) + "\n")
    for name, means in summary["combinations"].items():
        md += f"\n{name.replace(' fed T1ce alone', '')} over all 15 modality combinations:\n\n" \
              + combinations_table(means) + "\n"
    if summary["incomplete"]:
        md += "\nNot finished on every split yet: " + "; ".join(
            f"{name} ({done} of {len(per_split)})" for name, done in summary["incomplete"].items()) + ".\n"
    atomic_write_text(str(work / "study.md"), md)
    if markdown:
        atomic_write_text(markdown, md)
    print(md)
    return result


def collect_report(workdirs: Sequence[str], workdir: str, settings: StudySettings,
                   markdown: Optional[str] = None, splits: Optional[Sequence[int]] = None) -> dict:
    """Report in ``workdir`` over the split folders (``seedN``, ``foldN``) that runs left in ``workdirs``
    (several machines, or an unfinished run); ``splits``: only these split numbers."""
    names = None if splits is None else {settings.split_folder(s) for s in splits}
    split_dirs: List[Path] = sorted(d for w in workdirs for pattern in ("seed*", "fold*")
                                    for d in Path(w).resolve().glob(pattern)
                                    if d.is_dir() and (names is None or d.name in names))
    if not split_dirs:
        raise StudyError(f"no seedN or foldN folders in {' '.join(workdirs)}")
    plans = plans_name_for(settings.target_spacing)
    per_split: Dict[str, dict] = {d.name: collect_split(d, settings.models(), plans) for d in split_dirs}
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    return write_report(work, per_split, settings, float("nan"), markdown)
