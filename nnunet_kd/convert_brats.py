"""Convert any BraTS release (2018-2024) or the Decathlon Task01 to an nnU-Net v2 raw dataset.

Output: ``$nnUNet_raw/DatasetXXX_NAME`` with channels in the order T1, T1ce, T2, FLAIR (or a subset,
renumbered from 0) and labels in nnU-Net's BraTS convention (1 ED, 2 NCR/NET, 3 ET), trained as the
regions whole tumour / tumour core / enhancing tumour. Images keep their voxels and geometry exactly.

Every case is validated (all files present, readable to the last voxel, same grid, allowed labels)
in worker processes while the dataset is built in a temporary folder next to the target; only when
all cases succeeded is that folder renamed into place, so a failure never leaves anything behind.

``--to-brats`` does the reverse for predictions: nnU-Net labels back to a release's labels.
"""
from __future__ import annotations

import argparse
import gzip
import os
import re
import shutil
import struct
import sys
import tempfile
import zlib
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_kd.brats import (MODALITIES, REGIONS, RELEASE_TO_NNUNET, canonical_modality, map_labels,
                             nnunet_to_release, release_labels)


class ConversionError(ValueError):
    """Bad input or output for the converter; ``main`` turns it into ``error: ...`` and exit code 1."""


#: Releases the converter knows -> (label convention in brats.RELEASE_TO_NNUNET, default dataset name).
RELEASES: Dict[str, Tuple[str, str]] = {
    "brats2018": ("brats2021", "BraTS2018"),
    "brats2019": ("brats2021", "BraTS2019"),
    "brats2020": ("brats2021", "BraTS2020"),
    "brats2021": ("brats2021", "BraTS2021"),
    "brats2023": ("brats2023", "BraTS2023"),
    "brats2024": ("brats2023", "BraTS2024"),
    "msd": ("msd", "BrainTumour"),
}
YEAR_CHOICES: Tuple[str, ...] = ("2018", "2019", "2020", "2021", "2023", "2024", "msd")

# Case folder names per release. 2024 GLI uses the 2023 naming, so detection reports brats2023.
_CASE_PATTERNS: Dict[str, "re.Pattern[str]"] = {
    "brats2018": re.compile(r"^Brats18_\w+$", re.IGNORECASE),
    "brats2019": re.compile(r"^BraTS19_\w+$", re.IGNORECASE),
    "brats2020": re.compile(r"^BraTS20_(Training|Validation|Testing)_\d+$", re.IGNORECASE),
    "brats2021": re.compile(r"^BraTS2021_\d+$", re.IGNORECASE),
    "brats2023": re.compile(r"^BraTS-GLI-\d+-\d+$", re.IGNORECASE),
}
_CASE_PATTERNS["brats2024"] = _CASE_PATTERNS["brats2023"]
_GRADE_DIRS = ("HGG", "LGG")
_MSD_TASK = "Task01_BrainTumour"
#: Channel order inside the Decathlon's 4D images.
_MSD_CHANNELS: Tuple[str, ...] = ("FLAIR", "T1", "T1ce", "T2")
_NIFTI_ENDINGS = (".nii.gz", ".nii")
_OUT_ENDING = ".nii.gz"


def normalize_release(year: str) -> str:
    """``2021`` / ``brats2021`` / ``msd`` -> the release key used in ``RELEASES``."""
    key = str(year).strip().lower()
    if key.isdigit():
        key = f"brats{key}"
    if key not in RELEASES:
        raise ConversionError(f"unknown release {year!r}; choose one of {', '.join(YEAR_CHOICES)}")
    return key


def _is_hidden(name: str) -> bool:
    # ".DS_Store", macOS resource forks "._BRATS_001.nii.gz", "__MACOSX".
    return name.startswith(".") or name.startswith("__")


def _nifti_stem(name: str) -> Optional[str]:
    """File name without its NIfTI ending, or None for files that are not NIfTI."""
    lower = name.lower()
    for ending in _NIFTI_ENDINGS:
        if lower.endswith(ending):
            return name[: -len(ending)]
    return None


def _subdirs(path: str) -> List[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not _is_hidden(e.name))


# --------------------------------------------------------------------------- release detection


def _msd_root(path: str) -> Optional[str]:
    """The Task01 folder if ``path`` is it (has imagesTr/) or its parent, else None."""
    if os.path.isdir(os.path.join(path, "imagesTr")):
        return path
    task = os.path.join(path, _MSD_TASK)
    if os.path.isdir(os.path.join(task, "imagesTr")):
        return task
    return None


def _candidate_case_dirs(path: str) -> List[Tuple[str, str]]:
    """(name, folder) of directories that may be cases: top level and inside HGG/ and LGG/."""
    out = []
    for name in _subdirs(path):
        if name in _GRADE_DIRS:
            grade_dir = os.path.join(path, name)
            out += [(n, os.path.join(grade_dir, n)) for n in _subdirs(grade_dir)]
        else:
            out.append((name, os.path.join(path, name)))
    return out


def _releases_in(path: str) -> Dict[str, int]:
    """How many case folders of each (detectable) release ``path`` contains."""
    counts: Dict[str, int] = {}
    for name, _ in _candidate_case_dirs(path):
        for release, pattern in _CASE_PATTERNS.items():
            if release != "brats2024" and pattern.match(name):
                counts[release] = counts.get(release, 0) + 1
    return counts


def _check_input_dir(input_dir: str) -> str:
    if not input_dir or not os.path.exists(input_dir):
        raise ConversionError(f"input folder {input_dir!r} does not exist")
    if not os.path.isdir(input_dir):
        raise ConversionError(f"input {input_dir!r} is not a folder")
    if not any(not _is_hidden(e) for e in os.listdir(input_dir)):
        raise ConversionError(f"input folder {os.path.abspath(input_dir)} is empty")
    return os.path.abspath(input_dir)


def _resolve_root(input_dir: str) -> Tuple[str, str]:
    """(release, data root). Descends into a single wrapper folder (e.g. the unpacked archive's
    ``MICCAI_BraTS2020_TrainingData``) up to two levels."""
    path = input_dir
    for _ in range(3):
        msd = _msd_root(path)
        if msd is not None:
            return "msd", msd
        counts = _releases_in(path)
        if len(counts) == 1:
            return next(iter(counts)), path
        if len(counts) > 1:
            found = ", ".join(f"{n} {r}" for r, n in sorted(counts.items()))
            raise ConversionError(f"{input_dir} mixes case folders of several releases ({found}); "
                                  "convert one release at a time")
        subs = _subdirs(path)
        if len(subs) != 1:
            break
        path = os.path.join(path, subs[0])
    raise ConversionError(
        f"cannot detect the BraTS release of {input_dir}: no case folders named like Brats18_*, "
        "BraTS19_*, BraTS20_Training_*, BraTS2021_*, BraTS-GLI-* and no Decathlon Task01 "
        "(imagesTr/); pass --year if the layout is right but the names differ")


def _root_for_release(release: str, input_dir: str) -> str:
    """Data root for a release given by the user: the input folder, or a single wrapper folder below it."""
    if release == "msd":
        root = _msd_root(input_dir)
        if root is None:
            raise ConversionError(f"{input_dir} is neither a Decathlon {_MSD_TASK} folder (with imagesTr/) "
                                  "nor its parent")
        return root
    path = input_dir
    for _ in range(3):
        if any(_CASE_PATTERNS[release].match(n) for n, _ in _candidate_case_dirs(path)):
            return path
        subs = _subdirs(path)
        if len(subs) != 1:
            break
        path = os.path.join(path, subs[0])
    return input_dir  # no cases: reported by the caller with a hint about the detected layout


def detect_release(input_dir: str) -> str:
    """Detect the release from the folder layout: one of brats2018, brats2019, brats2020, brats2021,
    brats2023 (also the 2024 GLI naming) or msd. Raises ConversionError if it cannot tell."""
    return _resolve_root(_check_input_dir(input_dir))[0]


# --------------------------------------------------------------------------- case discovery


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


@dataclass
class CaseResult:
    case_id: str
    is_test: bool = False
    skipped: Optional[str] = None  # reason, when skip_incomplete dropped the case
    notes: List[str] = field(default_factory=list)


def _has_seg_like_file(folder: str) -> bool:
    """True if the folder holds a NIfTI that is not a modality (a segmentation, however named)."""
    for name in os.listdir(folder):
        stem = _nifti_stem(name)
        if stem is None or _is_hidden(name):
            continue
        if _modality_of(stem) is None:
            return True
    return False


def _modality_of(stem: str) -> Optional[str]:
    """Canonical modality named by the last ``_``/``-`` token of a file stem, else None."""
    token = re.split(r"[_-]", stem)[-1]
    try:
        return canonical_modality(token)
    except ValueError:
        return None


def _discover(release: str, root: str, modalities: Tuple[str, ...], out_dir: str) -> List[CaseTask]:
    """List the cases of ``root`` for ``release`` (cheap directory listing; files are checked later)."""
    tasks: List[CaseTask] = []
    if release == "msd":
        labels_dir = os.path.join(root, "labelsTr")
        for sub, is_train in (("imagesTr", True), ("imagesTs", False)):
            d = os.path.join(root, sub)
            if not os.path.isdir(d):
                continue
            for name in sorted(os.listdir(d)):
                stem = _nifti_stem(name)
                if stem is None or _is_hidden(name) or not os.path.isfile(os.path.join(d, name)):
                    continue
                label = None
                if is_train:
                    label = os.path.join(labels_dir, name)
                    if not os.path.exists(label):  # accept .nii vs .nii.gz differences
                        alt = [os.path.join(labels_dir, stem + e) for e in _NIFTI_ENDINGS]
                        label = next((a for a in alt if os.path.exists(a)), label)
                tasks.append(CaseTask(stem, release, msd_image=os.path.join(d, name), msd_label=label,
                                      seg_required=is_train, modalities=modalities, out_dir=out_dir))
        return tasks

    pattern = _CASE_PATTERNS[release]
    for name in _subdirs(root):
        if name in _GRADE_DIRS:
            for case in _subdirs(os.path.join(root, name)):
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
    if release in ("brats2021", "brats2023", "brats2024") and tasks:
        # Same naming for training and validation sets: if no case has a segmentation, it is a
        # validation set (imagesTs); otherwise every case must have one.
        if not any(_has_seg_like_file(t.folder) for t in tasks):
            for t in tasks:
                t.seg_required = False
    for t in tasks:
        t.modalities, t.out_dir = modalities, out_dir
    return tasks


# --------------------------------------------------------------------------- per-case work (workers)


def _nifti_incomplete(path: str) -> Optional[str]:
    """Why a NIfTI file is truncated or corrupt, or None if it is complete.

    ITK silently zero-fills voxels missing from a cut-off .nii or .nii.gz, so reading with SimpleITK
    is not enough: decompress the whole stream (gzip checks its CRC and end marker) and compare
    its length with what the header promises (vox_offset + voxels * bitpix / 8).
    """
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
            total = len(header)
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        return f"corrupt or truncated ({e})"
    if len(header) < 348:
        return f"truncated header ({len(header)} bytes)"
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540 and len(header) == 540:  # NIfTI-2
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None  # not a header we know; SimpleITK already accepted the file
    ndim = max(1, min(int(dims[0]), 7))
    expected = max(vox_offset, 348) + int(np.prod([max(int(d), 1) for d in dims[1:ndim + 1]])) * bitpix // 8
    if total < expected:
        return f"truncated: {total} bytes of image data where the header needs {expected}"
    return None


def _read(path: str, case_id: str, what: str) -> Tuple[sitk.Image, np.ndarray]:
    """Read an image and all its voxels; truncated or corrupt files become a ConversionError."""
    try:
        img = sitk.ReadImage(path)
        arr = sitk.GetArrayFromImage(img)  # forces every voxel to be decoded
    except RuntimeError as e:
        msg = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in reversed(msg) if ln.strip()), "unreadable")
        raise ConversionError(f"case {case_id}: cannot read {what} file {path}: {detail}") from None
    problem = _nifti_incomplete(path)
    if problem:
        raise ConversionError(f"case {case_id}: cannot read {what} file {path}: {problem}")
    return img, arr


def _geometry(img: sitk.Image) -> Tuple[Tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]:
    return (tuple(img.GetSize()), np.array(img.GetSpacing()), np.array(img.GetOrigin()),
            np.array(img.GetDirection()))


def _check_same_grid(case_id: str, ref: sitk.Image, ref_path: str, img: sitk.Image, path: str) -> None:
    """Same size, and spacing/origin/direction equal within a 1e-4 relative tolerance."""
    size_r, sp_r, or_r, dir_r = _geometry(ref)
    size, sp, org, dirc = _geometry(img)
    if img.GetDimension() != 3:
        raise ConversionError(f"case {case_id}: {path} is {img.GetDimension()}D, expected a 3D image")
    problem = None
    if size != size_r:
        problem = f"shape {size} differs from {size_r}"
    elif not np.allclose(sp, sp_r, rtol=1e-4, atol=1e-7):
        problem = f"spacing {tuple(sp)} differs from {tuple(sp_r)}"
    elif not np.allclose(org, or_r, rtol=1e-4, atol=1e-4 * float(max(sp_r.max(), 1.0))):
        problem = f"origin {tuple(org)} differs from {tuple(or_r)}"
    elif not np.allclose(dirc, dir_r, atol=1e-4):
        problem = f"direction {tuple(dirc)} differs from {tuple(dir_r)}"
    if problem:
        raise ConversionError(f"case {case_id}: {path}: {problem} of {ref_path}")


def _labels_to_nnunet(case_id: str, path: str, seg: np.ndarray, convention: str) -> np.ndarray:
    """Release labels -> nnU-Net labels, naming the offending values if any are not allowed."""
    allowed = release_labels(convention)
    values = np.unique(seg)
    non_integer = []
    if seg.dtype.kind == "f":  # some releases store labels as floats; 4.0 is fine, 2.5 or NaN are not
        non_integer = [float(v) for v in values if not np.isfinite(v) or v != np.round(v)]
    bad = non_integer or sorted(int(v) for v in values if int(v) not in allowed)
    if bad:
        raise ConversionError(f"case {case_id}: segmentation {path} has label values {bad} outside "
                              f"the {convention} label set {list(allowed)}")
    return map_labels(seg.astype(np.int64), RELEASE_TO_NNUNET[convention])


def _write_image(img: sitk.Image, path: str) -> None:
    sitk.WriteImage(img, path, True)


def _label_image(nnunet_seg: np.ndarray, ref: sitk.Image) -> sitk.Image:
    out = sitk.GetImageFromArray(nnunet_seg.astype(np.uint8))
    out.CopyInformation(ref)
    return out


def _find_case_files(task: CaseTask) -> Tuple[Dict[str, str], Optional[str], List[str]]:
    """Map modality -> file and find the segmentation inside a case folder."""
    folder, case_id = task.folder, task.case_id
    found: Dict[str, List[str]] = {}
    seg: List[str] = []
    other: List[str] = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        stem = _nifti_stem(name)
        if stem is None or _is_hidden(name) or not os.path.isfile(path):
            continue  # READMEs, CSV sheets, .DS_Store, resource forks
        modality = _modality_of(stem)
        if modality is not None:
            found.setdefault(modality, []).append(path)
        elif re.split(r"[_-]", stem)[-1].lower() == "seg":
            seg.append(path)
        else:
            other.append(path)
    notes: List[str] = []
    for modality, paths in found.items():
        if len(paths) > 1:
            raise ConversionError(f"case {case_id}: several files for {modality}: {', '.join(paths)}")
    files = {m: found[m][0] for m in found}
    if len(seg) > 1:
        raise ConversionError(f"case {case_id}: several segmentation files: {', '.join(seg)}")
    seg_path = seg[0] if seg else None
    if seg_path is None and len(other) == 1:
        # BraTS 2020 training case 355 ships its seg as W39_1998.09.19_Segm.nii.
        seg_path = other[0]
        notes.append(f"case {case_id}: using {os.path.basename(seg_path)} as the segmentation "
                     "(the only NIfTI that is not a modality)")
    elif seg_path is None and len(other) > 1:
        raise ConversionError(f"case {case_id}: no *_seg file and several unrecognised NIfTI files "
                              f"({', '.join(os.path.basename(o) for o in other)}); cannot tell which is the segmentation")
    return files, seg_path, notes


def _expected_name(task: CaseTask, modality: str) -> str:
    sep = "-" if task.release in ("brats2023", "brats2024") else "_"
    token = {"T1": "t1", "T1ce": "t1ce", "T2": "t2", "FLAIR": "flair"}[modality]
    if sep == "-":
        token = {"T1": "t1n", "T1ce": "t1c", "T2": "t2w", "FLAIR": "t2f"}[modality]
    return f"{task.case_id}{sep}{token}.nii.gz"


def _convert_folder_case(task: CaseTask) -> CaseResult:
    case_id, convention = task.case_id, RELEASES[task.release][0]
    files, seg_path, notes = _find_case_files(task)
    for modality in task.modalities:
        if modality not in files:
            raise ConversionError(
                f"case {case_id}: missing {modality} image: expected a file like "
                f"{os.path.join(task.folder, _expected_name(task, modality))} (or .nii)")
    if seg_path is None and task.seg_required:
        sep = "-" if task.release in ("brats2023", "brats2024") else "_"
        raise ConversionError(f"case {case_id}: missing segmentation: expected a file like "
                              f"{os.path.join(task.folder, f'{case_id}{sep}seg.nii.gz')} (or .nii)")
    is_test = seg_path is None
    img_dir = os.path.join(task.out_dir, "imagesTs" if is_test else "imagesTr")

    ref, ref_path = None, None
    loaded = []
    for channel, modality in enumerate(task.modalities):
        path = files[modality]
        img, _ = _read(path, case_id, modality)
        if img.GetDimension() != 3:
            raise ConversionError(f"case {case_id}: {modality} file {path} is {img.GetDimension()}D, expected 3D")
        if ref is None:
            ref, ref_path = img, path
        else:
            _check_same_grid(case_id, ref, ref_path, img, path)
        loaded.append((channel, path, img))
    seg_out = None
    if seg_path is not None:
        seg_img, seg_arr = _read(seg_path, case_id, "segmentation")
        _check_same_grid(case_id, ref, ref_path, seg_img, seg_path)
        seg_out = _label_image(_labels_to_nnunet(case_id, seg_path, seg_arr, convention), ref)

    # Everything checked: write. A 3D .nii.gz is copied byte for byte; a .nii is recompressed.
    for channel, path, img in loaded:
        target = os.path.join(img_dir, f"{case_id}_{channel:04d}{_OUT_ENDING}")
        if path.lower().endswith(".nii.gz"):
            shutil.copyfile(path, target)
        else:
            _write_image(img, target)
    if seg_out is not None:
        _write_image(seg_out, os.path.join(task.out_dir, "labelsTr", f"{case_id}{_OUT_ENDING}"))
    return CaseResult(case_id, is_test=is_test, notes=notes)


def _convert_msd_case(task: CaseTask) -> CaseResult:
    case_id = task.case_id
    if task.seg_required and (task.msd_label is None or not os.path.exists(task.msd_label)):
        raise ConversionError(f"case {case_id}: missing segmentation {task.msd_label} for image {task.msd_image}")
    img4d, arr = _read(task.msd_image, case_id, "4D image")
    if img4d.GetDimension() != 4 or arr.shape[0] != len(_MSD_CHANNELS):
        raise ConversionError(f"case {case_id}: {task.msd_image} should be a 4D image with {len(_MSD_CHANNELS)} "
                              f"channels ({', '.join(_MSD_CHANNELS)}), got size {img4d.GetSize()}")
    # The 3D geometry is the spatial part of the 4D one: first three spacings/origin entries and the
    # upper-left 3x3 block of the 4x4 direction matrix.
    spacing = img4d.GetSpacing()[:3]
    origin = img4d.GetOrigin()[:3]
    direction = np.array(img4d.GetDirection()).reshape(4, 4)[:3, :3].ravel()
    volumes = {}
    for idx, modality in enumerate(_MSD_CHANNELS):
        vol = sitk.GetImageFromArray(arr[idx])  # keeps the dtype
        vol.SetSpacing(spacing)
        vol.SetOrigin(origin)
        vol.SetDirection(tuple(float(d) for d in direction))
        volumes[modality] = vol
    ref = volumes[task.modalities[0]]
    seg_out = None
    if task.seg_required:
        seg_img, seg_arr = _read(task.msd_label, case_id, "segmentation")
        _check_same_grid(case_id, ref, task.msd_image, seg_img, task.msd_label)
        seg_out = _label_image(_labels_to_nnunet(case_id, task.msd_label, seg_arr, "msd"), ref)
    img_dir = os.path.join(task.out_dir, "imagesTr" if task.seg_required else "imagesTs")
    for channel, modality in enumerate(task.modalities):
        _write_image(volumes[modality], os.path.join(img_dir, f"{case_id}_{channel:04d}{_OUT_ENDING}"))
    if seg_out is not None:
        _write_image(seg_out, os.path.join(task.out_dir, "labelsTr", f"{case_id}{_OUT_ENDING}"))
    return CaseResult(case_id, is_test=not task.seg_required)


def _remove_case_outputs(task: CaseTask) -> None:
    for sub in ("imagesTr", "imagesTs", "labelsTr"):
        d = os.path.join(task.out_dir, sub)
        for name in os.listdir(d):
            if name == f"{task.case_id}{_OUT_ENDING}" or (name.startswith(task.case_id + "_") and
                                                         re.fullmatch(r"_\d{4}\.nii\.gz", name[len(task.case_id):])):
                os.remove(os.path.join(d, name))


def _run_case(task: CaseTask, skip_incomplete: bool) -> CaseResult:
    """Worker entry point: validate and write one case into the temporary dataset folder."""
    try:
        if task.release == "msd":
            return _convert_msd_case(task)
        return _convert_folder_case(task)
    except (ConversionError, OSError) as e:
        msg = str(e) if isinstance(e, ConversionError) else f"case {task.case_id}: {e}"
        if not skip_incomplete:
            raise ConversionError(msg) from None
        _remove_case_outputs(task)
        return CaseResult(task.case_id, skipped=msg)


# --------------------------------------------------------------------------- orchestration


def _progress(iterable: Iterable, total: int, enabled: bool, desc: str):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="case")


def _log(message: str, progress: bool) -> None:
    if progress:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)
    else:
        print(message, file=sys.stderr)


def _run_all(tasks: List[CaseTask], num_processes: int, skip_incomplete: bool, progress: bool) -> List[CaseResult]:
    """Run every case; on the first failure (without skip_incomplete) cancel the rest and raise."""
    results: List[CaseResult] = []
    if num_processes <= 1 or len(tasks) <= 1:
        for task in _progress(tasks, len(tasks), progress, "converting"):
            results.append(_run_case(task, skip_incomplete))
        return results
    with ProcessPoolExecutor(max_workers=min(num_processes, len(tasks))) as pool:
        futures = [pool.submit(_run_case, t, skip_incomplete) for t in tasks]
        bar = _progress(None, len(tasks), progress, "converting") if progress else None
        pending = set(futures)
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    exc = f.exception()
                    if exc is not None:
                        for p in pending:
                            p.cancel()
                        raise exc
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        results = [f.result() for f in futures]
    return results


def _output_root_path(output_root: Optional[str]) -> str:
    """``output_root`` or ``$nnUNet_raw`` (checked before any work; created only when writing)."""
    root = output_root or os.environ.get("nnUNet_raw")
    if not root:
        raise ConversionError("no output folder: set the nnUNet_raw environment variable or pass -o/--output-root")
    root = os.path.abspath(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise ConversionError(f"output root {root} exists and is not a folder")
    return root


def _existing_datasets(root: str, dataset_id: int) -> List[str]:
    prefix = f"Dataset{dataset_id:03d}_"
    return sorted(os.path.join(root, n) for n in os.listdir(root)
                  if n.startswith(prefix) and os.path.isdir(os.path.join(root, n)))


def resolve_modalities(modalities: Optional[Sequence[str]]) -> Tuple[str, ...]:
    """Canonical modality names (aliases allowed) in the converter's channel order T1, T1ce, T2, FLAIR."""
    if not modalities:
        return MODALITIES
    try:
        chosen = {canonical_modality(m) for m in modalities}
    except ValueError as e:
        raise ConversionError(str(e)) from None
    return tuple(m for m in MODALITIES if m in chosen)


def convert_brats(
    input_dir: str,
    dataset_id: int,
    name: Optional[str] = None,
    year: Optional[str] = None,
    modalities: Optional[Sequence[str]] = None,
    num_processes: int = min(4, os.cpu_count() or 1),
    overwrite: bool = False,
    skip_incomplete: bool = False,
    output_root: Optional[str] = None,
    progress: bool = False,
) -> str:
    """Convert a BraTS release (or the Decathlon Task01) to ``<output_root>/DatasetXXX_NAME``.

    ``year``: ``2018`` ... ``2024`` or ``msd`` (``brats2021`` style also accepted); detected from
    the layout when None. ``modalities``: subset to write (aliases allowed), renumbered from 0 in
    the order T1, T1ce, T2, FLAIR. ``output_root`` defaults to ``$nnUNet_raw``.
    Returns the dataset folder. Raises ConversionError on bad input, leaving nothing behind.
    """
    try:
        dataset_id = int(dataset_id)
    except (TypeError, ValueError):
        raise ConversionError(f"dataset id must be an integer, got {dataset_id!r}") from None
    if not 1 <= dataset_id <= 999:
        raise ConversionError(f"dataset id must be between 1 and 999, got {dataset_id}")
    chosen = resolve_modalities(modalities)
    out_root = _output_root_path(output_root)
    input_dir = _check_input_dir(input_dir)
    detected, root = _resolve_root(input_dir) if year is None else (None, input_dir)
    if year is None:
        release = detected
        note = " (GLI naming of 2023 and 2024; pass --year 2024 to name it BraTS2024)" if release == "brats2023" else ""
        print(f"Detected release: {release}{note} (from the layout of {root})")
    else:
        release = normalize_release(year)
        root = _root_for_release(release, input_dir)
    convention, default_name = RELEASES[release]
    if name is None:
        name = default_name if chosen == MODALITIES else f"{default_name}_{'_'.join(chosen)}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise ConversionError(f"invalid dataset name {name!r}: use letters, digits, '_', '-' and '.'")

    os.makedirs(out_root, exist_ok=True)
    target = os.path.join(out_root, f"Dataset{dataset_id:03d}_{name}")
    existing = _existing_datasets(out_root, dataset_id)
    if existing and not overwrite:
        raise ConversionError(f"dataset folder {existing[0]} already exists for id {dataset_id}; "
                              "pass --overwrite to replace it")

    tasks = _discover(release, root, chosen, "")
    if not tasks:
        hint = ""
        try:
            hint = f" (its layout looks like {detect_release(input_dir)})"
        except ConversionError:
            pass
        raise ConversionError(f"no {release} cases found in {root}{hint}")
    ids = [t.case_id for t in tasks]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ConversionError(f"case ids found more than once: {', '.join(dupes)}")

    # Build next to the target (same filesystem, so the final rename is atomic).
    tmp = tempfile.mkdtemp(prefix=f".Dataset{dataset_id:03d}_{name}.partial-", dir=out_root)
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            os.makedirs(os.path.join(tmp, sub))
        for t in tasks:
            t.out_dir = tmp
        results = _run_all(tasks, num_processes, skip_incomplete, progress)
        for r in results:
            for note in r.notes:
                _log(f"note: {note}", progress)
            if r.skipped:
                _log(f"warning: skipping {r.skipped}", progress)
        kept = [r for r in results if not r.skipped]
        if not kept:
            raise ConversionError(f"no valid cases in {root}: all {len(results)} were skipped")
        num_training = sum(not r.is_test for r in kept)
        if not os.listdir(os.path.join(tmp, "imagesTs")):
            os.rmdir(os.path.join(tmp, "imagesTs"))
        _write_dataset_json(tmp, chosen, num_training, sum(r.is_test for r in kept), name, release, convention)

        existing = _existing_datasets(out_root, dataset_id)
        if existing and not overwrite:  # appeared while we worked
            raise ConversionError(f"dataset folder {existing[0]} already exists for id {dataset_id}; "
                                  "pass --overwrite to replace it")
        # Move old datasets aside first so the new one goes in with a single rename.
        trash = []
        try:
            for old in existing:
                aside = tempfile.mkdtemp(prefix=f".{os.path.basename(old)}.old-", dir=out_root)
                os.replace(old, os.path.join(aside, "d"))
                trash.append((old, aside))
            os.replace(tmp, target)
        except OSError:
            for old, aside in trash:  # put the previous dataset back
                os.replace(os.path.join(aside, "d"), old)
                os.rmdir(aside)
            raise
        for _, aside in trash:
            shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"Wrote {target}: {num_training} training cases, {len(kept) - num_training} test cases, "
          f"channels {', '.join(chosen)}")
    return target


def _write_dataset_json(folder: str, chosen: Tuple[str, ...], num_training: int, num_test: int, name: str,
                        release: str, convention: str) -> None:
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    generate_dataset_json(
        folder,
        channel_names={str(i): m for i, m in enumerate(chosen)},
        labels={"background": 0, "whole tumor": list(REGIONS["WT"]), "tumor core": list(REGIONS["TC"]),
                "enhancing tumor": list(REGIONS["ET"])},
        num_training_cases=num_training,
        file_ending=_OUT_ENDING,
        regions_class_order=(1, 2, 3),
        dataset_name=name,
        release=release,
        description=f"{release} converted by nnunet_kd.convert_brats; labels 1 edema, 2 necrosis/non-enhancing "
                    f"core, 3 enhancing tumour (trained as regions)",
        license="see the license of the original release",
        converted_by="nnunet_kd.convert_brats",
        original_label_convention=convention,
        original_to_nnunet_labels={str(k): v for k, v in RELEASE_TO_NNUNET[convention].items()},
        numTest=num_test,
    )


# --------------------------------------------------------------------------- predictions -> release labels


def convert_to_brats(pred_dir: str, out_dir: str, year: str) -> List[str]:
    """Map nnU-Net predictions (1 ED, 2 NCR, 3 ET) in ``pred_dir`` back to the labels of ``year``
    (ET = 4 up to 2021, 3 for 2023/2024, Decathlon convention for msd), keeping file names and
    geometry. Files are written to a temporary folder first and moved into ``out_dir`` only when
    every prediction converted. Returns the written files."""
    convention = RELEASES[normalize_release(year)][0]
    pred_dir = _check_input_dir(pred_dir)
    names = sorted(n for n in os.listdir(pred_dir)
                   if _nifti_stem(n) is not None and not _is_hidden(n) and os.path.isfile(os.path.join(pred_dir, n)))
    if not names:
        raise ConversionError(f"no NIfTI predictions (.nii.gz/.nii) in {pred_dir}")
    out_dir = os.path.abspath(out_dir)
    if os.path.abspath(out_dir) == pred_dir:
        raise ConversionError("the output folder must differ from the prediction folder")
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".to_brats.partial-", dir=out_dir)
    written = []
    try:
        for n in names:
            path = os.path.join(pred_dir, n)
            img, arr = _read(path, _nifti_stem(n), "prediction")
            try:
                mapped = nnunet_to_release(arr.astype(np.int64), convention)
            except ValueError as e:
                raise ConversionError(f"case {_nifti_stem(n)}: prediction {path}: {e}") from None
            _write_image(_label_image(mapped, img), os.path.join(tmp, n))
        for n in names:
            os.replace(os.path.join(tmp, n), os.path.join(out_dir, n))
            written.append(os.path.join(out_dir, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet_kd_convert_brats",
        description="Convert a BraTS release (2018-2024) or the Decathlon Task01_BrainTumour to an nnU-Net v2 "
                    "raw dataset (channels T1, T1ce, T2, FLAIR; labels 1 ED, 2 NCR, 3 ET as regions), or with "
                    "--to-brats convert nnU-Net predictions back to a release's labels.",
    )
    p.add_argument("-i", "--input", required=True,
                   help="release folder (case folders, HGG/LGG, or Task01_BrainTumour or its parent); "
                        "with --to-brats: the folder of nnU-Net predictions")
    p.add_argument("-d", "--dataset-id", type=int, help="nnU-Net dataset id (1-999)")
    p.add_argument("-n", "--name", help="dataset name (default from the release, e.g. BraTS2021 or BraTS2021_T1ce)")
    p.add_argument("--year", choices=YEAR_CHOICES, help="release (default: detected from the layout)")
    p.add_argument("--modalities", nargs="+", metavar="MOD",
                   help="write only these modalities (T1 T1ce T2 FLAIR; aliases such as t1c, t2f work)")
    p.add_argument("-o", "--output-root",
                   help="folder to write DatasetXXX_NAME into (default $nnUNet_raw); "
                        "with --to-brats: the output folder")
    p.add_argument("-np", "--num-processes", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes (default min(4, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the same id")
    p.add_argument("--skip-incomplete", action="store_true",
                   help="skip incomplete or invalid cases with a warning instead of failing")
    p.add_argument("--to-brats", action="store_true",
                   help="convert nnU-Net predictions in -i to the labels of --year, written to -o")
    return p


def main(argv: Optional[Sequence[str]] = None) -> None:
    """CLI entry point; bad input exits with ``error: ...`` on stderr and status 1, never a traceback."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.to_brats:
            if not args.output_root or not args.year:
                parser.error("--to-brats needs -o OUT_DIR and --year")
            written = convert_to_brats(args.input, args.output_root, args.year)
            print(f"Wrote {len(written)} segmentations in {args.year} labels to {os.path.abspath(args.output_root)}")
            return
        if args.dataset_id is None:
            parser.error("-d/--dataset-id is required")
        if args.num_processes < 1:
            parser.error("-np must be >= 1")
        convert_brats(args.input, args.dataset_id, name=args.name, year=args.year, modalities=args.modalities,
                      num_processes=args.num_processes, overwrite=args.overwrite,
                      skip_incomplete=args.skip_incomplete, output_root=args.output_root, progress=True)
    except ConversionError as e:
        raise SystemExit(f"error: {e}") from None
    except OSError as e:  # permissions, full disk, ...
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
