"""The releases the converter knows: their names, folder layouts and file naming, and detecting which
release a folder holds (descending into a single wrapper folder such as an unpacked archive's)."""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Tuple

from nnunet_kd.brats import ANY_CASE_PATTERN, RELEASE_LABEL_CONVENTIONS


class ConversionError(ValueError):
    """Bad input or output for the converter; the command turns it into ``error: ...`` and exit code 1."""


#: Releases the converter knows -> (label convention, a key of brats.RELEASE_TO_NNUNET; default dataset name).
RELEASES: Dict[str, Tuple[str, str]] = {
    release: (RELEASE_LABEL_CONVENTIONS[release], name)
    for release, name in (("brats2018", "BraTS2018"), ("brats2019", "BraTS2019"), ("brats2020", "BraTS2020"),
                          ("brats2021", "BraTS2021"), ("brats2023", "BraTS2023"), ("brats2024", "BraTS2024"),
                          ("brats2025", "BraTS2025"), ("msd", "BrainTumour"))
}
YEAR_CHOICES: Tuple[str, ...] = ("2018", "2019", "2020", "2021", "2023", "2024", "2025", "msd")

#: Case folder names per release. 2023-2025 share one naming for every cohort (GLI, MEN, MEN-RT, MET, PED,
#: SSA, GoAT; brats/cohorts.py), so detection reports brats2023 and the cohort decides the labels.
CASE_PATTERNS: Dict[str, "re.Pattern[str]"] = {
    "brats2018": re.compile(r"^Brats18_\w+$", re.IGNORECASE),
    "brats2019": re.compile(r"^BraTS19_\w+$", re.IGNORECASE),
    "brats2020": re.compile(r"^BraTS20_(Training|Validation|Testing)_\d+$", re.IGNORECASE),
    "brats2021": re.compile(r"^BraTS2021_\d+$", re.IGNORECASE),
    "brats2023": ANY_CASE_PATTERN,
}
CASE_PATTERNS["brats2024"] = CASE_PATTERNS["brats2025"] = CASE_PATTERNS["brats2023"]
#: Releases with the 2023+ naming (``BraTS-<COHORT>-...``, files ``<case>-t1n.nii.gz``).
GLI_RELEASES: Tuple[str, ...] = ("brats2023", "brats2024", "brats2025")
#: Grade folders of the 2018/2019 training sets.
GRADE_DIRS: Tuple[str, ...] = ("HGG", "LGG")
MSD_TASK = "Task01_BrainTumour"
#: Channel order inside the Decathlon's 4D images.
MSD_CHANNELS: Tuple[str, ...] = ("FLAIR", "T1", "T1ce", "T2")
NIFTI_ENDINGS: Tuple[str, ...] = (".nii.gz", ".nii")
#: File ending of everything the converter writes.
OUT_ENDING = ".nii.gz"


def normalize_release(year: str) -> str:
    """``2021`` / ``brats2021`` / ``msd`` -> the release key used in ``RELEASES``."""
    key = str(year).strip().lower()
    if key.isdigit():
        key = f"brats{key}"
    if key not in RELEASES:
        raise ConversionError(f"unknown release {year!r}; choose one of {', '.join(YEAR_CHOICES)}")
    return key


def is_hidden(name: str) -> bool:
    """Files and folders to ignore: ``.DS_Store``, macOS resource forks ``._BRATS_001.nii.gz``, ``__MACOSX``."""
    return name.startswith(".") or name.startswith("__")


def nifti_stem(name: str) -> Optional[str]:
    """File name without its NIfTI ending, or None for files that are not NIfTI."""
    lower = name.lower()
    for ending in NIFTI_ENDINGS:
        if lower.endswith(ending):
            return name[: -len(ending)]
    return None


def subdirs(path: str) -> List[str]:
    """Names of the visible sub-folders of ``path``, sorted."""
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not is_hidden(e.name))


def msd_root(path: str) -> Optional[str]:
    """The Task01 folder if ``path`` is it (has imagesTr/) or its parent, else None."""
    if os.path.isdir(os.path.join(path, "imagesTr")):
        return path
    task = os.path.join(path, MSD_TASK)
    if os.path.isdir(os.path.join(task, "imagesTr")):
        return task
    return None


def _candidate_case_dirs(path: str) -> List[Tuple[str, str]]:
    """(name, folder) of directories that may be cases: top level and inside HGG/ and LGG/."""
    out = []
    for name in subdirs(path):
        if name in GRADE_DIRS:
            grade_dir = os.path.join(path, name)
            out += [(n, os.path.join(grade_dir, n)) for n in subdirs(grade_dir)]
        else:
            out.append((name, os.path.join(path, name)))
    return out


def _releases_in(path: str) -> Dict[str, int]:
    """How many case folders of each (detectable) release ``path`` contains."""
    counts: Dict[str, int] = {}
    for name, _ in _candidate_case_dirs(path):
        for release, pattern in CASE_PATTERNS.items():
            if release not in ("brats2024", "brats2025") and pattern.match(name):
                counts[release] = counts.get(release, 0) + 1
    return counts


def check_input_dir(input_dir: str) -> str:
    """The absolute path of an existing, non-empty folder; ConversionError otherwise."""
    if not input_dir or not os.path.exists(input_dir):
        raise ConversionError(f"input folder {input_dir!r} does not exist")
    if not os.path.isdir(input_dir):
        raise ConversionError(f"input {input_dir!r} is not a folder")
    if not any(not is_hidden(e) for e in os.listdir(input_dir)):
        raise ConversionError(f"input folder {os.path.abspath(input_dir)} is empty")
    return os.path.abspath(input_dir)


def resolve_root(input_dir: str) -> Tuple[str, str]:
    """(release, data root). Descends into a single wrapper folder (e.g. the unpacked archive's
    ``MICCAI_BraTS2020_TrainingData``) up to two levels."""
    path = input_dir
    for _ in range(3):
        msd = msd_root(path)
        if msd is not None:
            return "msd", msd
        counts = _releases_in(path)
        if len(counts) == 1:
            return next(iter(counts)), path
        if len(counts) > 1:
            found = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
            raise ConversionError(f"{input_dir} mixes case folders of several releases ({found}); "
                                  "convert one release at a time")
        subs = subdirs(path)
        if len(subs) != 1:
            break
        path = os.path.join(path, subs[0])
    raise ConversionError(
        f"cannot detect the BraTS release of {input_dir}: no case folders named like Brats18_*, "
        "BraTS19_*, BraTS20_Training_*, BraTS2021_*, BraTS-GLI-*/MEN-*/MET-*/PED-*/SSA-*/GoAT-* "
        "and no Decathlon Task01 "
        "(imagesTr/); pass --year if the layout is right but the names differ")


def root_for_release(release: str, input_dir: str) -> str:
    """Data root for a release given by the user: the input folder, or a single wrapper folder below it."""
    if release == "msd":
        root = msd_root(input_dir)
        if root is None:
            raise ConversionError(f"{input_dir} is neither a Decathlon {MSD_TASK} folder (with imagesTr/) "
                                  "nor its parent")
        return root
    path = input_dir
    for _ in range(3):
        if any(CASE_PATTERNS[release].match(n) for n, _ in _candidate_case_dirs(path)):
            return path
        subs = subdirs(path)
        if len(subs) != 1:
            break
        path = os.path.join(path, subs[0])
    return input_dir  # no cases: reported by the caller with a hint about the detected layout


def detect_release(input_dir: str) -> str:
    """Detect the release from the folder layout: one of brats2018, brats2019, brats2020, brats2021,
    brats2023 (the naming of every 2023-2025 cohort) or msd. Raises ConversionError if it cannot tell."""
    return resolve_root(check_input_dir(input_dir))[0]
