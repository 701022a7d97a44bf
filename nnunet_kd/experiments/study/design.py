"""What the distillation study compares: its models, settings, data splits and their folders.

The study (:mod:`nnunet_kd.experiments.study.run`) runs this design; :mod:`nnunet_kd.experiments.study.collect`
reads what it left behind.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


class StudyError(ValueError):
    """Bad input to the study (settings that differ from a resumed run's, missing or incomplete folders)."""


@dataclass(frozen=True)
class StudyModel:
    """One model of the study: its trainer, the dataset it trains on and how it is fed at test time.

    ``dataset``: ``full`` (all four channels) or ``t1ce`` (the T1ce-only dataset). ``feed``: ``t1ce_file``
    (stock ``nnUNetv2_predict`` on T1ce-only inputs), ``available_t1ce`` (``nnunet_kd_predict --available
    T1ce``: the other channels zero-filled) or ``all``. ``combinations``: also scored over all 15
    modality combinations. ``teacher``: the name of another model of the study whose trained model (same split)
    this trainer distils from, handed over in ``nnUNet_kd_teachers``; it trains after that model.
    """

    trainer: str
    dataset: str
    feed: str
    combinations: bool = False
    teacher: Optional[str] = None

    @property
    def slug(self) -> str:
        """File-name form: ``TRAINER_DATASET``."""
        return f"{self.trainer}_{self.dataset}"


#: The paired differences are taken against this model.
BASELINE = "stock nnU-Net, T1ce-only dataset"
#: Stock nnU-Net on all four channels: the upper reference, and the frozen teacher of the MTCM-KD variant.
ALL_FOUR = "stock nnU-Net, all four modalities (upper reference)"
#: In the order they train (cheapest first, so that an interrupted study has its baselines).
MODELS: Dict[str, StudyModel] = {
    BASELINE: StudyModel("nnUNetTrainerBudget", "t1ce", "t1ce_file"),
    ALL_FOUR: StudyModel("nnUNetTrainerBudget", "full", "all"),
    "modality dropout fed T1ce alone": StudyModel("nnUNetTrainerModalityDropout", "full", "available_t1ce", True),
    "MGSD fed T1ce alone": StudyModel("nnUNetTrainerMGSD", "full", "available_t1ce", True),
    "MTCM-KD student, frozen four-channel teacher": StudyModel("nnUNetTrainerMTCMKD_FrozenTeachers", "full",
                                                               "t1ce_file", teacher=ALL_FOUR),
    "MTCM-KD student (T1ce)": StudyModel("nnUNetTrainerMTCMKD", "full", "t1ce_file"),
}
#: Further paired comparisons (model, against): MGSD is modality dropout plus self-distillation, so this pair
#: isolates what the distillation adds (T1ce-fed, and in each of the 15 modality combinations).
CONTRASTS: Tuple[Tuple[str, str], ...] = (("MGSD fed T1ce alone", "modality dropout fed T1ce alone"),)
#: --ablations: further levers, on the same data and budget.
ABLATIONS: Dict[str, StudyModel] = {
    "ablation: MTCM-KD, the paper's weights (WT Dice, fixed total)": StudyModel("nnUNetTrainerMTCMKD_PaperWeights",
                                                                                "full", "t1ce_file"),
    "ablation: MTCM-KD, reference KD (batchmean, x T)": StudyModel("nnUNetTrainerMTCMKD_Reference", "full",
                                                                   "t1ce_file"),
    "ablation: MTCM-KD, voxel-mean KD x T (earlier default)": StudyModel("nnUNetTrainerMTCMKD_VoxelMeanT1", "full",
                                                                         "t1ce_file"),
    "ablation: MTCM-KD, KD from epoch 0": StudyModel("nnUNetTrainerMTCMKD_KDFromStart", "full", "t1ce_file"),
    "ablation: MTCM-KD, frozen four-channel teacher, KD x4": StudyModel("nnUNetTrainerMTCMKD_FrozenTeachers_KDx4",
                                                                       "full", "t1ce_file", teacher=ALL_FOUR),
    "ablation: MTCM-KD, frozen four-channel teacher, student starts from it": StudyModel(
        "nnUNetTrainerMTCMKD_FrozenTeachers_WarmStart", "full", "t1ce_file", teacher=ALL_FOUR),
    "ablation: MGSD, modality-level weight 5, fed T1ce alone": StudyModel(
        "nnUNetTrainerMGSD_LightModalityKD", "full", "available_t1ce"),
}
#: Dataset ids inside one split's folder: the training sets (all channels, T1ce only) and the held-out sets.
DATASET_IDS = {"full": 600, "t1ce": 601, "test": 602, "test_t1ce": 603}
#: Settings that change the data or the budget: a --resume run must use the same ones.
RESUME_SETTINGS = ("cases", "test_cases", "shape", "epochs", "iterations", "device", "real_brats", "folds",
                   "target_spacing", "autocast")
#: What work dirs written before a setting existed ran with (their study_settings.json lacks it).
RESUME_DEFAULTS = {"autocast": "none"}


def study_models(with_ablations: bool, only: Optional[Sequence[str]] = None) -> Dict[str, StudyModel]:
    """The models a study trains; ``only`` keeps just these slugs (e.g. ``nnUNetTrainerMTCMKD_full``), the
    baseline and the teachers of those kept."""
    models = {**MODELS, **(ABLATIONS if with_ablations else {})}
    kept = {name for name, m in models.items() if not only or m.slug in only or name == BASELINE}
    kept |= {models[name].teacher for name in kept if models[name].teacher}
    return {name: m for name, m in models.items() if name in kept}


@dataclass(frozen=True)
class StudySettings:
    """The data, budget and models of a study (the same for every split)."""

    cases: int = 16
    test_cases: int = 8
    shape: Tuple[int, int, int] = (40, 40, 40)
    epochs: int = 4
    iterations: int = 40
    device: str = "cpu"
    real_brats: Optional[str] = None
    folds: int = 5
    target_spacing: Optional[Tuple[float, float, float]] = None
    num_processes: int = 2
    parallel: int = 1
    #: ``legacy``, or ``lesionwise`` / ``both`` to add the official lesion-wise metrics to every scores file
    #: (the legacy ones are always computed: the paired differences use them).
    metrics: str = "legacy"
    ablations: bool = False
    only: Optional[Tuple[str, ...]] = None
    #: Training precision on the CPU: "bf16" runs every training with nnUNet_kd_autocast=bf16 (training/precision.py).
    autocast: str = "none"

    def models(self) -> Dict[str, StudyModel]:
        """The models this study trains (see :func:`study_models`); the baseline always."""
        return study_models(self.ablations, self.only)

    def split_folder(self, split: int) -> str:
        """``foldN`` (real cases) or ``seedN`` (synthetic cases)."""
        return f"{'fold' if self.real_brats else 'seed'}{split}"

    def resume_record(self) -> dict:
        """The settings a --resume run is checked against (JSON-ready)."""
        record = {k: getattr(self, k) for k in RESUME_SETTINGS}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}


def case_folders(release: Path) -> List[Path]:
    """The case folders of a release folder (sorted), or StudyError naming the folder."""
    if not release.is_dir():
        raise StudyError(f"--real-brats {release}: not a folder")
    cases = sorted(d for d in release.iterdir() if d.is_dir() and any(d.glob("*.nii*")))
    if len(cases) < 2:
        raise StudyError(f"--real-brats {release}: needs at least 2 case folders with NIfTI files, found {len(cases)}")
    return cases


def real_case_folds(release: Path, folds: int) -> List[List[Path]]:
    """The cases split into ``folds`` test folds of near-equal size (a fixed shuffle, so every model and every
    run gets the same folds); every case is a test case in exactly one fold."""
    cases = case_folders(release)
    if not 2 <= folds <= len(cases):
        raise StudyError(f"--folds {folds}: must be between 2 and the number of cases in {release} ({len(cases)})")
    order = np.random.default_rng(0).permutation(len(cases))
    return [[cases[i] for i in sorted(part)] for part in np.array_split(order, folds)]
