"""The per-case work, run in worker processes: find a case's files, read every one whole, check that
they share one voxel grid and that the labels belong to the release, then write the case into the
temporary dataset folder (images keep their voxels and geometry exactly; labels in nnU-Net's order)."""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_kd.brats import (LABEL_SET_NAMES, MODALITY_FILE_TOKENS, RELEASE_TO_NNUNET, Cohort, map_labels,
                             release_labels)
from nnunet_kd.conversion.discovery import CaseTask, modality_of
from nnunet_kd.conversion.releases import (GLI_RELEASES, MSD_CHANNELS, OUT_ENDING, RELEASES, ConversionError,
                                           is_hidden, nifti_stem)
from nnunet_kd.nifti import NiftiError, grid_mismatch, read_image


@dataclass
class CaseResult:
    """What a worker did with one case."""

    case_id: str
    is_test: bool = False
    skipped: Optional[str] = None  # reason, when skip_incomplete dropped the case
    notes: List[str] = field(default_factory=list)


def read_case_image(path: str, case_id: str, what: str) -> Tuple[sitk.Image, np.ndarray]:
    """Read an image and all its voxels; unreadable, corrupt or truncated files become
    ``ConversionError("case ID: cannot read WHAT file PATH: reason")``."""
    try:
        return read_image(path)
    except NiftiError as e:
        prefix = f"cannot read {path}: "
        reason = str(e)[len(prefix):] if str(e).startswith(prefix) else str(e)
        raise ConversionError(f"case {case_id}: cannot read {what} file {path}: {reason}") from None


def _check_same_grid(case_id: str, ref: sitk.Image, ref_path: str, img: sitk.Image, path: str) -> None:
    """A 3D image with the reference's size, and spacing/origin/direction within nifti.grid_mismatch's tolerances."""
    if img.GetDimension() != 3:
        raise ConversionError(f"case {case_id}: {path} is {img.GetDimension()}D, expected a 3D image")
    problem = grid_mismatch(img, ref, origin_rtol=1e-4)
    if problem:
        raise ConversionError(f"case {case_id}: {path}: {problem} of {ref_path}")


def _labels_to_nnunet(case_id: str, path: str, seg: np.ndarray, convention: str,
                      cohort: Optional[Cohort] = None) -> np.ndarray:
    """Release (or 2023+ cohort) labels -> nnU-Net labels, naming the offending values if any are not allowed."""
    allowed = release_labels(convention) if cohort is None else cohort.allowed_labels
    set_name = LABEL_SET_NAMES[convention] if cohort is None else f"BraTS {cohort.key} ({cohort.title})"
    values = np.unique(seg)
    non_integer = []
    if seg.dtype.kind == "f":  # some releases store labels as floats; 4.0 is fine, 2.5 or NaN are not
        non_integer = [float(v) for v in values if not np.isfinite(v) or v != np.round(v)]
    bad = non_integer or sorted(int(v) for v in values if int(v) not in allowed)
    if bad:
        raise ConversionError(f"case {case_id}: segmentation {path} has label values {bad} outside "
                              f"the {set_name} label set {list(allowed)}")
    mapping = RELEASE_TO_NNUNET[convention] if cohort is None else cohort.to_nnunet
    return map_labels(seg.astype(np.int64), mapping)


def write_image(img: sitk.Image, path: str) -> None:
    """Write an image compressed."""
    sitk.WriteImage(img, path, True)


def label_image(labels: np.ndarray, ref: sitk.Image) -> sitk.Image:
    """A uint8 label image on the grid of ``ref``."""
    out = sitk.GetImageFromArray(labels.astype(np.uint8))
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
        stem = nifti_stem(name)
        if stem is None or is_hidden(name) or not os.path.isfile(path):
            continue  # READMEs, CSV sheets, .DS_Store, resource forks
        modality = modality_of(stem)
        if modality is not None:
            found.setdefault(modality, []).append(path)
        elif re.split(r"[_-]", stem)[-1].lower() == (task.cohort.seg_token if task.cohort else "seg"):
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


#: File-name token of each modality: ``_`` for the releases up to 2021, ``-`` for the GLI naming.
_FILE_TOKENS: Dict[str, Dict[str, str]] = {"_": MODALITY_FILE_TOKENS["brats2021"],
                                           "-": MODALITY_FILE_TOKENS["brats2023"]}


def _expected_name(task: CaseTask, token: str) -> str:
    """The usual file name of a case's file: ``token`` is ``seg`` or a canonical modality."""
    sep = "-" if task.release in GLI_RELEASES else "_"
    if task.cohort is not None:
        token = task.cohort.seg_token if token == "seg" else token
        return f"{task.case_id}{task.cohort.separator}{_FILE_TOKENS['-'].get(token, token)}.nii.gz"
    return f"{task.case_id}{sep}{_FILE_TOKENS[sep].get(token, token)}.nii.gz"


def _convert_folder_case(task: CaseTask) -> CaseResult:
    case_id, convention = task.case_id, RELEASES[task.release][0]
    files, seg_path, notes = _find_case_files(task)
    for modality in task.modalities:
        if modality not in files:
            raise ConversionError(
                f"case {case_id}: missing {modality} image: expected a file like "
                f"{os.path.join(task.folder, _expected_name(task, modality))} (or .nii)")
    if seg_path is None and task.seg_required:
        raise ConversionError(f"case {case_id}: missing segmentation: expected a file like "
                              f"{os.path.join(task.folder, _expected_name(task, 'seg'))} (or .nii)")
    is_test = seg_path is None
    img_dir = os.path.join(task.out_dir, "imagesTs" if is_test else "imagesTr")

    ref, ref_path = None, None
    loaded = []
    for channel, modality in enumerate(task.modalities):
        path = files[modality]
        img, _ = read_case_image(path, case_id, modality)
        if img.GetDimension() != 3:
            raise ConversionError(f"case {case_id}: {modality} file {path} is {img.GetDimension()}D, expected 3D")
        if ref is None:
            ref, ref_path = img, path
        else:
            _check_same_grid(case_id, ref, ref_path, img, path)
        loaded.append((channel, path, img))
    seg_out = None
    if seg_path is not None:
        seg_img, seg_arr = read_case_image(seg_path, case_id, "segmentation")
        _check_same_grid(case_id, ref, ref_path, seg_img, seg_path)
        seg_out = label_image(_labels_to_nnunet(case_id, seg_path, seg_arr, convention, task.cohort), ref)

    # Everything checked: write. A 3D .nii.gz is copied byte for byte; a .nii is recompressed.
    for channel, path, img in loaded:
        target = os.path.join(img_dir, f"{case_id}_{channel:04d}{OUT_ENDING}")
        if path.lower().endswith(".nii.gz"):
            shutil.copyfile(path, target)
        else:
            write_image(img, target)
    if seg_out is not None:
        write_image(seg_out, os.path.join(task.out_dir, "labelsTr", f"{case_id}{OUT_ENDING}"))
    return CaseResult(case_id, is_test=is_test, notes=notes)


def _convert_msd_case(task: CaseTask) -> CaseResult:
    case_id = task.case_id
    if task.seg_required and (task.msd_label is None or not os.path.exists(task.msd_label)):
        raise ConversionError(f"case {case_id}: missing segmentation {task.msd_label} for image {task.msd_image}")
    img4d, arr = read_case_image(task.msd_image, case_id, "4D image")
    if img4d.GetDimension() != 4 or arr.shape[0] != len(MSD_CHANNELS):
        raise ConversionError(f"case {case_id}: {task.msd_image} should be a 4D image with {len(MSD_CHANNELS)} "
                              f"channels ({', '.join(MSD_CHANNELS)}), got size {img4d.GetSize()}")
    # The 3D geometry is the spatial part of the 4D one: first three spacings/origin entries and the
    # upper-left 3x3 block of the 4x4 direction matrix.
    spacing = img4d.GetSpacing()[:3]
    origin = img4d.GetOrigin()[:3]
    direction = np.array(img4d.GetDirection()).reshape(4, 4)[:3, :3].ravel()
    volumes = {}
    for idx, modality in enumerate(MSD_CHANNELS):
        vol = sitk.GetImageFromArray(arr[idx])  # keeps the dtype
        vol.SetSpacing(spacing)
        vol.SetOrigin(origin)
        vol.SetDirection(tuple(float(d) for d in direction))
        volumes[modality] = vol
    ref = volumes[task.modalities[0]]
    seg_out = None
    if task.seg_required:
        seg_img, seg_arr = read_case_image(task.msd_label, case_id, "segmentation")
        _check_same_grid(case_id, ref, task.msd_image, seg_img, task.msd_label)
        seg_out = label_image(_labels_to_nnunet(case_id, task.msd_label, seg_arr, "msd"), ref)
    img_dir = os.path.join(task.out_dir, "imagesTr" if task.seg_required else "imagesTs")
    for channel, modality in enumerate(task.modalities):
        write_image(volumes[modality], os.path.join(img_dir, f"{case_id}_{channel:04d}{OUT_ENDING}"))
    if seg_out is not None:
        write_image(seg_out, os.path.join(task.out_dir, "labelsTr", f"{case_id}{OUT_ENDING}"))
    return CaseResult(case_id, is_test=not task.seg_required)


def _remove_case_outputs(task: CaseTask) -> None:
    for sub in ("imagesTr", "imagesTs", "labelsTr"):
        d = os.path.join(task.out_dir, sub)
        for name in os.listdir(d):
            if name == f"{task.case_id}{OUT_ENDING}" or (name.startswith(task.case_id + "_") and
                                                        re.fullmatch(r"_\d{4}\.nii\.gz", name[len(task.case_id):])):
                os.remove(os.path.join(d, name))


def run_case(task: CaseTask, skip_incomplete: bool) -> CaseResult:
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
