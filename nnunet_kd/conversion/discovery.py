"""Finding the cases of a release folder (a cheap directory listing; the files are checked by the
workers in :mod:`nnunet_kd.conversion.cases`), and choosing the modalities to write."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from nnunet_kd.brats import MODALITIES, Cohort, canonical_modality
from nnunet_kd.conversion.cohort_detection import cohort_of_cases, year_hint
from nnunet_kd.conversion.releases import (CASE_PATTERNS, GLI_RELEASES, GRADE_DIRS, NIFTI_ENDINGS, ConversionError,
                                           is_hidden, nifti_stem, subdirs)


@dataclass
class CaseTask:
    """One case to convert; picklable so that it can be sent to a worker process."""

    case_id: str
    release: str
    folder: Optional[str] = None  # per-modality-file releases
    msd_image: Optional[str] = None  # Decathlon: the 4D image ...
    msd_label: Optional[str] = None  # ... and its label file, if it should have one
    seg_required: Optional[bool] = True  # True: training case; False: test case; None: either
    modalities: Tuple[str, ...] = MODALITIES
    out_dir: str = ""
    cohort: Optional[Cohort] = None  # 2023+ releases: the cohort whose labels and file naming apply


def resolve_modalities(modalities: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """Canonical modality names (aliases allowed) in the converter's channel order T1, T1ce, T2, FLAIR."""
    if not modalities:
        return MODALITIES
    try:
        chosen = {canonical_modality(m) for m in modalities}
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return tuple(m for m in MODALITIES if m in chosen)


def modality_of(stem: str) -> Optional[str]:
    """Canonical modality named by the last ``_``/``-`` token of a file stem, else None."""
    token = re.split(r"[_-]", stem)[-1]
    try:
        return canonical_modality(token)
    except ValueError:
        return None


def _has_seg_like_file(folder: str) -> bool:
    """True if the folder holds a NIfTI that is not a modality (a segmentation, however named)."""
    for name in os.listdir(folder):
        stem = nifti_stem(name)
        if stem is None or is_hidden(name):
            continue
        if modality_of(stem) is None:
            return True
    return False


def _discover_msd(root: str, modalities: Tuple[str, ...], out_dir: str) -> List[CaseTask]:
    """The Decathlon's 4D images: imagesTr/ (with labelsTr/) are training cases, imagesTs/ test cases."""
    tasks: List[CaseTask] = []
    labels_dir = os.path.join(root, "labelsTr")
    for sub, is_train in (("imagesTr", True), ("imagesTs", False)):
        d = os.path.join(root, sub)
        if not os.path.isdir(d):
            continue
        for name in sorted(os.listdir(d)):
            stem = nifti_stem(name)
            if stem is None or is_hidden(name) or not os.path.isfile(os.path.join(d, name)):
                continue
            label = None
            if is_train:
                label = os.path.join(labels_dir, name)
                if not os.path.exists(label):  # accept .nii vs .nii.gz differences
                    alt = [os.path.join(labels_dir, stem + e) for e in NIFTI_ENDINGS]
                    label = next((a for a in alt if os.path.exists(a)), label)
            tasks.append(CaseTask(stem, "msd", msd_image=os.path.join(d, name), msd_label=label,
                                  seg_required=is_train, modalities=modalities, out_dir=out_dir))
    return tasks


def discover(release: str, root: str, modalities: Tuple[str, ...], out_dir: str) -> List[CaseTask]:
    """List the cases of ``root`` for ``release`` (cheap directory listing; files are checked later)."""
    if release == "msd":
        return _discover_msd(root, modalities, out_dir)
    tasks: List[CaseTask] = []
    pattern = CASE_PATTERNS[release]
    for name in subdirs(root):
        if name in GRADE_DIRS:
            for case in subdirs(os.path.join(root, name)):
                if pattern.match(case):
                    tasks.append(CaseTask(case, release, folder=os.path.join(root, name, case), seg_required=True))
        elif pattern.match(name):
            if release == "brats2020":
                required: Optional[bool] = name.lower().startswith("brats20_training")
            elif release in ("brats2018", "brats2019"):
                required = None  # flat folders are the validation set; HGG/LGG ones are training
            else:
                required = True  # decided below: a folder is a training set or a validation set
            tasks.append(CaseTask(name, release, folder=os.path.join(root, name), seg_required=required))
    if (release == "brats2021" or release in GLI_RELEASES) and tasks:
        # Same naming for training and validation sets: if no case has a segmentation, it is a
        # validation set (imagesTs); otherwise every case must have one.
        if not any(_has_seg_like_file(t.folder) for t in tasks):
            for t in tasks:
                t.seg_required = False
    for t in tasks:
        t.modalities, t.out_dir = modalities, out_dir
    return tasks


def assign_cohort(tasks: List[CaseTask], release: str, year_given: bool, folders: Sequence[str],
                  modalities: Optional[Sequence[str]]) -> Tuple[Optional[Cohort], Tuple[str, ...], str]:
    """(cohort, modalities to write, release) for the cases: the cohort of a 2023+ release (None for older
    releases; the release then becomes ``brats<year>`` of the year found, e.g. brats2024 for a GLI
    post-treatment folder).

    The year is the release's when the user gave one, else a year named by the folder names ``folders``
    (the input folder and the wrappers down to the cases, e.g. ``BraTS2024-GLI-Challenge-TrainingData``),
    else cohort_detection.detect_cohort's rules. Sets every task's
    cohort and modalities; ConversionError for mixed cohorts, a year without the cohort, or modalities
    the cohort does not have.
    """
    chosen = resolve_modalities(modalities)
    if release not in GLI_RELEASES:
        return None, chosen, release
    year = int(release[len("brats"):]) if year_given else None
    hint = year_hint(folders)
    try:
        cohort = cohort_of_cases([t.case_id for t in tasks], year, hint)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if not modalities:
        chosen = cohort.modalities
    elif set(chosen) - set(cohort.modalities):
        raise ConversionError(f"cohort {cohort.key} has only {', '.join(cohort.modalities)}; "
                              f"cannot write {', '.join(sorted(set(chosen) - set(cohort.modalities)))}")
    for t in tasks:
        t.cohort, t.modalities = cohort, chosen
    if not year_given:
        release = f"brats{hint if hint in cohort.years else cohort.years[0]}"
    return cohort, chosen, release
