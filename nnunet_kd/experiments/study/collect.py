"""What a study left in its split folders, read back: each model's per-case scores and combination tables,
the distillation trainers' per-epoch gradient shares, and every training's learning curve (from the log
nnU-Net keeps in its checkpoints)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping, Optional, Sequence

from nnunet_kd.brats import REGIONS
from nnunet_kd.experiments.study.design import DATASET_IDS, StudyModel


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
    "gradient_shares": {name: {"measured_at": str, "epochs": [{term: share}]}}, "kd_weights": {name: {"regions":
    [region], "epochs": [{source: weight or [weight per region]} or None]}}, "learning_curves": {name: curve}}``;
    ``kd_weights``: MTCM-KD's weights of each teacher and CDSFL level as used in each epoch (ramp included; None
    before KD starts), for the models whose log records them.
    """
    out: dict = {"models": {}, "combinations": {}, "gradient_shares": {}, "kd_weights": {}, "learning_curves": {}}
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
            if any("kd_weights" in e for e in epochs):
                regions = next((e["regions"] for e in epochs if "regions" in e), None)
                out["kd_weights"][name] = {"regions": regions, "epochs": [e.get("kd_weights") for e in epochs]}
    return out

