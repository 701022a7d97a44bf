"""The study's report: per-case scores read back from the split folders, the paired differences to the
baseline, the learning curves, Markdown tables and plots (study.json, study.md, study_dice.png,
study_paired.png, study_learning_curves.png)."""
from __future__ import annotations

import json
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
from nnunet_kd.evaluation.paired import paired_difference, verdict
from nnunet_kd.experiments.datasets import plans_name_for
from nnunet_kd.experiments.study_design import (BASELINE, CONTRASTS, DATASET_IDS, StudyError, StudyModel,
                                                StudySettings)


def scores_file(root: Path, model: StudyModel) -> Path:
    """Where a split's scores of one model are written."""
    return root / f"scores_{model.slug}.json"


def combinations_file(root: Path, model: StudyModel) -> Path:
    """Where a split's 15-combination table of one model is written."""
    return root / f"combinations_{model.slug}" / "missing_modalities.json"


def model_folder(root: Path, model: StudyModel, plans: str) -> Optional[Path]:
    """A split's nnU-Net output folder of one model (``results/DatasetNNN_*/TRAINER__PLANS__3d_fullres/fold_all``),
    once its training has made it."""
    found = sorted(d for d in (root / "results").glob(f"Dataset{DATASET_IDS[model.dataset]}_*/{model.trainer}__"
                                                      f"{plans}__3d_fullres/fold_all") if d.is_dir())
    return found[0] if found else None


def distillation_log_file(root: Path, model: StudyModel, plans: str) -> Optional[Path]:
    """A split's per-epoch log of a distillation trainer's loss terms (``distillation_log.json``), if it has one."""
    folder = model_folder(root, model, plans)
    log = None if folder is None else folder / "distillation_log.json"
    return log if log is not None and log.is_file() else None


#: The checkpoints whose nnU-Net log gives a training's learning curve, first found first: the finished
#: training's, else the one an unfinished training rewrites every epoch (the study saves every epoch).
CURVE_CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth")
#: A curve has flattened when its EMA pseudo-Dice gained less than this over the last 20 % of the epochs.
FLAT_GAIN = 0.02


def read_learning_curve(folder: Path) -> Optional[dict]:
    """nnU-Net's validation pseudo-Dice per epoch, from the log that nnU-Net keeps in a fold folder's checkpoint
    (``checkpoint["logging"]``: its logger's per-epoch lists), or None while no checkpoint is readable.

    Returns ``{"checkpoint": file name, "finished": bool, "epochs": E, "mean_fg_dice": [E], "ema_fg_dice": [E],
    "dice_per_region": {region: [E]}}``; ``finished``: read from checkpoint_final.pth. The regions are WT, TC,
    ET (the study's datasets train them in this order), ``region N`` for any other count.
    """
    import torch  # here only: the rest of the report needs no torch

    for name in CURVE_CHECKPOINTS:
        path = folder / name
        if not path.is_file():
            continue
        try:
            log = torch.load(path, map_location="cpu", weights_only=False)["logging"]
            mean, ema, per_region = (log[k] for k in ("mean_fg_dice", "ema_fg_dice", "dice_per_class_or_region"))
        except Exception:  # being written by a stock trainer, truncated, or not nnU-Net's: try the next one
            continue
        epochs = min(len(mean), len(ema), len(per_region))  # a log cut within an epoch: the epochs it has whole
        if epochs == 0:
            continue
        n = len(per_region[0])
        regions = list(REGIONS) if n == len(REGIONS) else [f"region {i + 1}" for i in range(n)]
        return {"checkpoint": name, "finished": name == "checkpoint_final.pth", "epochs": epochs,
                "mean_fg_dice": [float(v) for v in mean[:epochs]], "ema_fg_dice": [float(v) for v in ema[:epochs]],
                "dice_per_region": {r: [float(e[i]) for e in per_region[:epochs]] for i, r in enumerate(regions)}}
    return None


def flattening(ema_fg_dice: Sequence[float]) -> dict:
    """Whether a learning curve has flattened: with E epochs, the EMA pseudo-Dice gained less than
    :data:`FLAT_GAIN` (2 points) over the last 20 % of the epochs, i.e. from epoch index ceil(0.8 E) - 1 (the
    last epoch before them) to the last epoch, E - 1. Under 5 epochs the two are the same epoch: no gain,
    flattened by this rule (the report says so).

    Returns ``{"from_epoch": ceil(0.8 E) - 1, "last_ema": ema[E - 1], "gain": ema[E - 1] - ema[from_epoch],
    "flattened": gain < FLAT_GAIN}``.
    """
    last = len(ema_fg_dice) - 1
    start = -(-4 * len(ema_fg_dice) // 5) - 1  # ceil(0.8 E) in integers: 0.8 * 15 is 12.000000000000002
    gain = float(ema_fg_dice[last] - ema_fg_dice[start])
    return {"from_epoch": start, "last_ema": float(ema_fg_dice[last]), "gain": gain, "flattened": gain < FLAT_GAIN}


def collect_split(root: Path, models: Mapping[str, StudyModel], plans: str) -> dict:
    """Per-case scores of the models (and combination tables) a split has finished so far, the
    distillation trainers' per-epoch gradient shares (``plans``: the plans name the models trained with), and
    the learning curve of every model that has a checkpoint, finished or not (:func:`read_learning_curve`).

    Returns ``{"models": {name: {case: metrics}}, "combinations": {name: {combination: {case: metrics}}},
    "gradient_shares": {name: {"measured_at": str, "epochs": [{term: share}]}}, "learning_curves": {name: curve}}``.
    """
    out: dict = {"models": {}, "combinations": {}, "gradient_shares": {}, "learning_curves": {}}
    for name, model in models.items():
        folder = model_folder(root, model, plans)
        curve = None if folder is None else read_learning_curve(folder)
        if curve is not None:
            out["learning_curves"][name] = curve
        if scores_file(root, model).exists():
            out["models"][name] = json.loads(scores_file(root, model).read_text())["cases"]
        if model.combinations and combinations_file(root, model).exists():
            table = json.loads(combinations_file(root, model).read_text())["combinations"]
            out["combinations"][name] = {combo: entry["cases"] for combo, entry in table.items()}
        log = distillation_log_file(root, model, plans) if name in out["models"] else None
        if log is not None:
            epochs = json.loads(log.read_text())
            out["gradient_shares"][name] = {
                # MTCM-KD measures at the student's logits; MGSD says where it measured
                "measured_at": epochs[0].get("gradient_measured_at", "logits") if epochs else "logits",
                "epochs": [e["gradient_share"] for e in epochs if "gradient_share" in e]}
    return out


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
                     "incomplete": {}}
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


def models_table(summary: dict) -> str:
    lines = ["| model | cases | WT Dice | TC Dice | ET Dice | WT HD95 | TC HD95 | ET HD95 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in summary["models"].items():
        mean, sd = entry["mean"], entry["sd"]
        dice = [f"{100 * mean[r]['dice']:.1f} ± {100 * sd[r]['dice']:.1f}" for r in REGIONS]
        hd = [f"{mean[r]['hd95']:.1f} ± {sd[r]['hd95']:.1f}" for r in REGIONS]
        lines.append(f"| {name} | {entry['n']} | " + " | ".join(dice + hd) + " |")
    return "\n".join(lines)


def paired_table(paired: Mapping[str, Mapping], first_column: str = "model") -> str:
    """Rows of paired differences ``{row name: {region: {metric: entry}}}`` as paired_difference returns."""
    lines = [f"| {first_column} | region | Δ Dice (points) [95% CI] | p | better | Δ HD95 (mm) [95% CI] | p | "
             "verdict (Dice, HD95) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, regions in paired.items():
        for r in REGIONS:
            d, h = regions[r]["dice"], regions[r]["hd95"]
            lines.append(
                f"| {name} | {r} | {100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] | "
                f"{d['p']:.3g} | {d['better']}/{d['n']} | {h['mean']:+.1f} [{h['low']:+.1f}, {h['high']:+.1f}] | "
                f"{h['p']:.3g} | {verdict(d, 'dice')}, {verdict(h, 'hd95')} |")
    return "\n".join(lines)


def dice_differences_table(paired: Mapping[str, Mapping]) -> str:
    """One row per entry of ``{name: paired_difference(...)}``: each region's Dice difference, interval and p."""
    lines = ["| available modalities | " + " | ".join(f"{r} Δ Dice" for r in REGIONS) + " |",
             "| --- |" + " --- |" * len(REGIONS)]
    for name, regions in paired.items():
        cells = [f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] (p {d['p']:.2g})"
                 for d in (regions[r]["dice"] for r in REGIONS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_split_table(per_split: Mapping[str, Mapping[str, Mapping]]) -> str:
    """Each model's mean Dice per split (WT / TC / ET, %)."""
    splits = list(next(iter(per_split.values()))) if per_split else []
    lines = ["| model | " + " | ".join(splits) + " |", "| --- |" + " --- |" * len(splits)]
    for name, means in per_split.items():
        lines.append(f"| {name} | " + " | ".join(
            " / ".join(f"{100 * means[s][r]['dice']:.1f}" for r in REGIONS) for s in splits) + " |")
    return "\n".join(lines)


def gradient_shares_table(shares: Mapping[str, Mapping]) -> str:
    """Each distillation model's term shares of the gradient per epoch (mean over splits)."""
    epochs = max((len(t["mean"]) for entry in shares.values() for t in entry["terms"].values()), default=0)
    lines = ["| model (measured at) | term | " + " | ".join(f"epoch {e}" for e in range(epochs)) + " |",
             "| --- | --- |" + " --- |" * epochs]
    for name, entry in shares.items():
        for term, v in entry["terms"].items():
            cells = [f"{x:.2f}" for x in v["mean"]] + [""] * (epochs - len(v["mean"]))
            lines.append(f"| {name} ({entry['measured_at']}) | {term} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def learning_curves_table(curves: Mapping[str, Mapping], splits: Sequence[str]) -> str:
    """Per model and split: the last epoch's EMA pseudo-Dice (%), its gain over the last 20 % of the epochs
    (points) and whether it flattened; the epochs so far of an unfinished training."""
    lines = ["| model | " + " | ".join(splits) + " | flattened in every split |",
             "| --- |" + " --- |" * (len(splits) + 1)]
    for name, entry in curves.items():
        cells = []
        for s in splits:
            c = entry["splits"].get(s)
            if c is None:
                cells.append("")
                continue
            state = "flattened" if c["flattened"] else "not flattened"
            if c["from_epoch"] == c["epochs"] - 1:
                state += ": under 5 epochs, no gain to measure"
            if not c["finished"]:
                state += f"; unfinished, {c['epochs']} epochs"
            cells.append(f"{100 * c['last_ema']:.1f} ({100 * c['gain']:+.1f}, {state})")
        every = entry["flattened_in_every_split"]
        every_cell = (f"- ({len(entry['splits'])} of {len(splits)} splits)" if every is None
                      else "yes" if every else "no")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {every_cell} |")
    return "\n".join(lines)


def combinations_table(means: Mapping[str, Mapping]) -> str:
    lines = ["| available modalities | WT Dice | TC Dice | ET Dice | WT HD95 | TC HD95 | ET HD95 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for combo, m in means.items():
        lines.append(f"| {combo} | " + " | ".join([f"{100 * m[r]['dice']:.1f}" for r in REGIONS]
                                               + [f"{m[r]['hd95']:.1f}" for r in REGIONS]) + " |")
    return "\n".join(lines)


def source_commit() -> str:
    """The git commit of the package's checkout (``-dirty`` when it has changes), or ``unknown``."""
    repo = Path(__file__).resolve().parents[2]
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
    """study.json, study.md (and ``markdown``), study_dice.png, study_paired.png, study_gradient_shares.png and
    study_learning_curves.png from the splits' scores and logs."""
    from nnunet_kd.evaluation.plots import (plot_gradient_shares, plot_learning_curves, plot_model_means,
                                            plot_paired_differences)

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
