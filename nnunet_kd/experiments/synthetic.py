"""Seeded synthetic BraTS-like cases, written in the folder layouts of the real releases.

Each case is a brain-like ellipsoid (background exactly 0 outside the brain) with white matter,
grey matter and a ventricle, and a glioma made of nested irregular blobs: a necrotic core (NCR)
inside an enhancing rim (ET) inside oedema (ED). Per-tissue contrasts mimic real scans (ET bright
in T1ce, oedema bright in FLAIR/T2 and faint in T1ce, necrosis dark in T1ce), with a smooth
multiplicative bias field and Gaussian noise. Everything is deterministic given the seed.

The data are meant for tests and demos of the converter and the trainers; they are not a model
of real anatomy.

CLI: ``nnunet_kd_synthetic -o OUT -n NUM [--shape 48 48 48] [--seed 0] [--layout brats2021]``.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from nnunet_kd.brats import MODALITY_FILE_TOKENS, RELEASE_TO_NNUNET, map_labels, nnunet_to_release
from nnunet_kd.cli import command

#: Layouts ``generate_dataset`` can write.
LAYOUTS: Tuple[str, ...] = ("brats2018", "brats2019", "brats2020", "brats2021", "brats2023", "msd")

# Relative intensity of each tissue per modality (T1, T1ce, T2, FLAIR). Chosen so the qualitative
# contrasts of real gliomas hold: ET bright in T1ce, ED bright in T2/FLAIR and only slightly raised
# in T1ce, NCR dark in T1/T1ce and bright in T2, CSF dark in T1/FLAIR and bright in T2.
_TISSUES: Dict[str, Tuple[float, float, float, float]] = {
    "wm": (0.90, 0.85, 0.45, 0.55),
    "gm": (0.65, 0.62, 0.65, 0.68),
    "csf": (0.25, 0.25, 1.00, 0.15),
    "ed": (0.55, 0.70, 0.95, 1.00),
    "et": (0.60, 1.45, 0.75, 0.82),
    "ncr": (0.35, 0.30, 1.05, 0.50),
}
_MODALITY_KEYS: Tuple[str, ...] = ("t1", "t1ce", "t2", "flair")


def _smooth_field(rng: np.random.Generator, shape: Sequence[int], grid: int = 4) -> np.ndarray:
    """A smooth random field in [-1, 1]: a coarse random grid upsampled with Gaussian weights.

    The upsampling is separable (one small matrix per axis), so it costs a few tensor products
    instead of a 3D spline interpolation; this keeps 48^3 cases well under a second.
    """
    coarse = rng.uniform(-1.0, 1.0, size=(grid,) * len(shape))
    field = coarse
    for axis, size in enumerate(shape):
        x = (np.arange(size) + 0.5) / size * grid - 0.5  # voxel centres in coarse-grid units
        w = np.exp(-0.5 * ((x[:, None] - np.arange(grid)[None, :]) / 0.7) ** 2)
        w /= w.sum(axis=1, keepdims=True)
        field = np.moveaxis(np.tensordot(w, np.moveaxis(field, axis, 0), axes=(1, 0)), 0, axis)
    field /= max(float(np.abs(field).max()), 1e-6)
    return field.astype(np.float32)


def _ellipsoid_distance(shape: Sequence[int], center: Sequence[float], radii: Sequence[float]) -> np.ndarray:
    """Normalised ellipsoidal distance (1 on the surface) of every voxel from ``center``."""
    grids = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    d2 = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, center, radii))
    return np.sqrt(d2).astype(np.float32)


def synthesize_case(shape: Sequence[int] = (48, 48, 48), seed: int = 0) -> Dict[str, np.ndarray]:
    """Arrays of one synthetic case (numpy order z, y, x).

    Returns a dict with float32 ``t1``, ``t1ce``, ``t2``, ``flair`` (intensities ~0..1000, exactly 0
    outside the brain), uint8 ``seg`` in BraTS 2018-2021 labels (1 NCR, 2 ED, 4 ET) and bool ``brain``.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"shape must be three sizes >= 16, got {shape}")
    rng = np.random.default_rng(seed)
    shp = np.asarray(shape, dtype=np.float32)

    # Brain: a slightly irregular ellipsoid around the volume centre.
    brain_center = shp / 2.0 + rng.uniform(-0.03, 0.03, 3) * shp
    brain_radii = shp * rng.uniform(0.38, 0.44, 3)
    d_brain = _ellipsoid_distance(shape, brain_center, brain_radii) / (1.0 + 0.06 * _smooth_field(rng, shape))
    brain = d_brain <= 1.0
    wm = d_brain <= 0.72 + 0.08 * _smooth_field(rng, shape)
    ventricle = _ellipsoid_distance(shape, brain_center, brain_radii * np.array([0.18, 0.30, 0.12])) <= 1.0

    # Tumour centre well inside the brain, away from the exact middle (ventricle).
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    tumour_center = brain_center + direction * brain_radii * rng.uniform(0.2, 0.42)
    rb = float(brain_radii.min())
    # Radii in voxels, with minimum gaps so that every label survives discretisation.
    r_ncr = max(1.2, rb * rng.uniform(0.10, 0.16))
    r_et = max(r_ncr + 1.6, rb * rng.uniform(0.20, 0.28))
    r_ed = max(r_et + 1.8, rb * rng.uniform(0.36, 0.50))

    def blob(radius: float, irregularity: float) -> np.ndarray:
        stretch = rng.uniform(0.8, 1.25, 3)
        d = _ellipsoid_distance(shape, tumour_center, radius * stretch)
        # Multiplicative modulation keeps the centre (d = 0) inside every blob: the blobs nest.
        return d <= 1.0 + irregularity * _smooth_field(rng, shape, grid=5)

    ed_outer = blob(r_ed, 0.30) & brain
    et_outer = blob(r_et, 0.25) & ed_outer
    ncr = blob(r_ncr, 0.20) & et_outer
    centre_voxel = tuple(int(round(c)) for c in tumour_center)
    ncr[centre_voxel] = brain[centre_voxel]  # guarantee a necrotic core even on tiny volumes

    seg = np.zeros(shape, dtype=np.uint8)
    seg[ed_outer] = 2
    seg[et_outer] = 4
    seg[ncr] = 1

    tissue_map = {  # later entries override earlier ones
        "gm": brain & ~wm,
        "wm": brain & wm,
        "csf": brain & ventricle,
        "ed": seg == 2,
        "et": seg == 4,
        "ncr": seg == 1,
    }
    bias = np.exp(0.12 * _smooth_field(rng, shape, grid=3))
    out: Dict[str, np.ndarray] = {}
    for m_idx, key in enumerate(_MODALITY_KEYS):
        img = np.zeros(shape, dtype=np.float32)
        for name, mask in tissue_map.items():
            img[mask] = _TISSUES[name][m_idx]
        img *= 1.0 + 0.05 * _smooth_field(rng, shape, grid=6)  # mild tissue texture
        img *= bias
        img += rng.normal(0.0, 0.03, size=shape).astype(np.float32)
        img *= rng.uniform(500.0, 900.0)  # per-scan intensity scale, like uncalibrated MRI
        img = np.clip(img, 0.0, None)
        img[~brain] = 0.0  # skull-stripped: background is exactly zero
        out[key] = img.astype(np.float32)
    out["seg"] = seg
    out["brain"] = brain
    return out


def _to_image(arr: np.ndarray, spacing: Sequence[float], dtype: Optional[type] = None) -> sitk.Image:
    """Wrap an array as a SimpleITK image with a BraTS-like LPS geometry."""
    if dtype is not None:
        arr = np.round(arr).astype(dtype) if np.issubdtype(dtype, np.integer) else arr.astype(dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(tuple(float(s) for s in spacing))
    # Real BraTS volumes have origin (0, -239, 0) for 240 voxels along y; mimic that.
    ny = arr.shape[1]
    img.SetOrigin((0.0, -float(ny - 1) * float(spacing[1]), 0.0))
    return img


def _write(img: sitk.Image, path: str) -> None:
    sitk.WriteImage(img, path, path.endswith(".gz"))


def _write_case_folder(
    folder: str,
    prefix: str,
    arrays: Dict[str, np.ndarray],
    spacing: Sequence[float],
    names: Dict[str, str],
    sep: str,
    with_seg: bool,
    seg_labels: str,
    file_ending: str,
    seg_name: Optional[str] = None,
) -> str:
    """Write one case in the per-modality-file layout of BraTS 2018-2023."""
    os.makedirs(folder, exist_ok=True)
    for key in _MODALITY_KEYS:
        _write(_to_image(arrays[key], spacing, np.int16), os.path.join(folder, f"{prefix}{sep}{names[key]}{file_ending}"))
    if with_seg:
        seg = arrays["seg"]
        if seg_labels != "brats2021":
            seg = nnunet_to_release(map_labels(seg, RELEASE_TO_NNUNET["brats2021"]), seg_labels)
        fname = seg_name or f"{prefix}{sep}seg{file_ending}"
        _write(_to_image(seg.astype(np.uint8), spacing), os.path.join(folder, fname))
    return folder


# The synthetic volumes are keyed by the 2018-2021 file tokens (t1, t1ce, t2, flair); the file names of each
# release come from the one table of tokens, brats.MODALITY_FILE_TOKENS.
_ARRAY_KEY = MODALITY_FILE_TOKENS["brats2021"]
_NAMES_2021 = {key: key for key in _ARRAY_KEY.values()}
_NAMES_2023 = {_ARRAY_KEY[m]: token for m, token in MODALITY_FILE_TOKENS["brats2023"].items()}
_COHORT_TOKENS = {m: (_ARRAY_KEY[m], token) for m, token in MODALITY_FILE_TOKENS["brats2023"].items()}


def _add_fourth_label(nn: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """nnU-Net labels with a small label-4 blob (RC / CC) mirrored from the tumour about the volume centre."""
    centre = np.array(nn.shape) - 1 - np.argwhere(nn > 0).mean(axis=0)
    blob = (_ellipsoid_distance(nn.shape, centre, [max(2.0, min(nn.shape) / 10)] * 3) <= 1.0) & brain & (nn == 0)
    blob[tuple(int(round(c)) for c in centre)] = nn[tuple(int(round(c)) for c in centre)] == 0
    out = nn.copy()
    out[blob] = 4
    return out


def _write_cohort_case(out_dir: str, index: int, cohort_key: str, arrays: Dict[str, np.ndarray],
                       spacing: Sequence[float], with_seg: bool, file_ending: str) -> str:
    """One case of a 2023+ cohort (brats/cohorts.py): its case name, sequences and original labels.
    Cohorts with a fourth label (RC, CC) get a label-4 blob; post-treatment cohorts (RC) timepoint 100."""
    from nnunet_kd.brats import COHORTS, to_original

    cohort = COHORTS[cohort_key]
    nn = map_labels(arrays["seg"], RELEASE_TO_NNUNET["brats2021"])  # 1 ED, 2 NCR, 3 ET
    if not cohort.uses_regions:
        nn = (nn > 0).astype(np.uint8)  # one label: the whole tumour (MEN-RT GTV)
    elif len(cohort.to_nnunet) > 4:
        nn = _add_fourth_label(nn, arrays["brain"])
    if cohort.prefix == "GoAT":
        name = f"BraTS-GoAT-{index:05d}"
    elif cohort.prefix == "MEN-RT":
        name = f"BraTS-MEN-RT-{index:04d}-1"
    else:
        post_treatment = cohort.labels.get(4, ("",))[0] == "RC"
        name = f"BraTS-{cohort.prefix}-{index:05d}-{100 if post_treatment else 0:03d}"
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    for modality in cohort.modalities:
        key, token = _COHORT_TOKENS[modality]
        path = os.path.join(folder, f"{name}{cohort.separator}{token}{file_ending}")
        _write(_to_image(arrays[key], spacing, np.int16), path)
    if with_seg:
        seg = to_original(nn, cohort).astype(np.uint8)
        path = os.path.join(folder, f"{name}{cohort.separator}{cohort.seg_token}{file_ending}")
        _write(_to_image(seg, spacing), path)
    return folder


def _case_seed(seed: int, index: int) -> int:
    """Independent, reproducible per-case seed derived from the dataset seed and the case index."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


_MSD_DATASET_JSON = {
    "name": "BRATS",
    "description": "Gliomas segmentation tumour and oedema in on brain images",
    "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
    "licence": "CC-BY-SA 4.0",
    "release": "2.0 04/05/2018",
    "tensorImageSize": "4D",
    "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
    "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
}


def _write_msd_case(img_path: str, label_path: Optional[str], arrays: Dict[str, np.ndarray],
                    spacing: Sequence[float]) -> None:
    """One Decathlon case: a 4D float32 image (FLAIR, T1w, T1gd, T2w) and a uint8 label map."""
    vols = [_to_image(arrays[k], spacing, np.float32) for k in ("flair", "t1", "t1ce", "t2")]
    _write(sitk.JoinSeries(vols), img_path)
    if label_path is not None:
        seg = nnunet_to_release(map_labels(arrays["seg"], RELEASE_TO_NNUNET["brats2021"]), "msd")
        _write(_to_image(seg.astype(np.uint8), spacing), label_path)


def generate_dataset(
    out_dir: str,
    num_cases: int,
    shape: Sequence[int] = (48, 48, 48),
    seed: int = 0,
    layout: str = "brats2021",
    start_index: int = 1,
    num_test: int = 0,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    file_ending: str = ".nii.gz",
    progress: bool = False,
    cohort: str = "GLI-2023",
) -> List[str]:
    """Write ``num_cases`` training cases (with segmentation) in the folder layout of a release.

    Layouts (``XXX`` is the case index, from ``start_index``):

    * ``brats2018``: ``HGG|LGG/Brats18_TCIA01_XXX_1/Brats18_TCIA01_XXX_1_{t1,t1ce,t2,flair,seg}``
      (every third case goes to LGG); test cases are flat folders next to HGG/LGG.
    * ``brats2019``: as 2018 with ``BraTS19_TCIA01_XXX_1``.
    * ``brats2020``: ``BraTS20_Training_XXX/...``; test cases ``BraTS20_Validation_XXX`` without seg.
      Like the real release, case 355's segmentation is named ``W39_1998.09.19_Segm`` + file_ending.
    * ``brats2021``: ``BraTS2021_XXXXX/BraTS2021_XXXXX_{t1,t1ce,t2,flair,seg}``.
    * ``brats2023``: ``BraTS-GLI-XXXXX-000/BraTS-GLI-XXXXX-000-{t1n,t1c,t2w,t2f,seg}``, labels 0/1/2/3;
      another ``cohort`` (a key of nnunet_kd.brats.COHORTS, e.g. ``GLI-2024``, ``PED-2024``,
      ``MEN-RT-2024``) writes that cohort's case names, sequences and original labels.
    * ``msd``: ``Task01_BrainTumour/{imagesTr,labelsTr,imagesTs}/BRATS_XXX.nii.gz``, 4D images
      (FLAIR, T1w, T1gd, T2w, float32), labels 1 edema / 2 non-enhancing / 3 enhancing, dataset.json.

    ``num_test`` extra cases without segmentation are written after the training cases. For 2021 and
    2023 they use the training naming without a seg file, like the real validation sets; since a real
    release never mixes the two in one folder, generate them into a separate folder
    (``num_cases=0, num_test=N``) when feeding the converter. ``file_ending`` is ``.nii.gz``
    or ``.nii`` (the real 2020 release ships uncompressed ``.nii``; MSD always uses ``.nii.gz``).
    Returns the written case folders (for ``msd``, the image files), training cases first.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if file_ending not in (".nii.gz", ".nii"):
        raise ValueError(f"file_ending must be '.nii.gz' or '.nii', got {file_ending!r}")
    if num_cases < 0 or num_test < 0:
        raise ValueError("num_cases and num_test must be >= 0")
    os.makedirs(out_dir, exist_ok=True)

    indices = [(start_index + i, True) for i in range(num_cases)]
    indices += [(start_index + num_cases + i, False) for i in range(num_test)]
    iterator = indices
    if progress:
        from tqdm import tqdm

        iterator = tqdm(indices, desc=f"synthetic {layout}", unit="case")

    written: List[str] = []
    msd_training, msd_test = [], []
    for index, with_seg in iterator:
        arrays = synthesize_case(shape, _case_seed(seed, index))
        if layout in ("brats2018", "brats2019"):
            prefix = ("Brats18" if layout == "brats2018" else "BraTS19") + f"_TCIA01_{index:03d}_1"
            grade = "LGG" if index % 3 == 0 else "HGG"
            folder = os.path.join(out_dir, grade, prefix) if with_seg else os.path.join(out_dir, prefix)
            written.append(_write_case_folder(folder, prefix, arrays, spacing, _NAMES_2021, "_", with_seg,
                                              "brats2021", file_ending))
        elif layout == "brats2020":
            prefix = f"BraTS20_{'Training' if with_seg else 'Validation'}_{index:03d}"
            # Reproduce the real release's misnamed segmentation of training case 355.
            seg_name = f"W39_1998.09.19_Segm{file_ending}" if (with_seg and index == 355) else None
            written.append(_write_case_folder(os.path.join(out_dir, prefix), prefix, arrays, spacing, _NAMES_2021,
                                              "_", with_seg, "brats2021", file_ending, seg_name))
        elif layout == "brats2021":
            prefix = f"BraTS2021_{index:05d}"
            written.append(_write_case_folder(os.path.join(out_dir, prefix), prefix, arrays, spacing, _NAMES_2021,
                                              "_", with_seg, "brats2021", file_ending))
        elif layout == "brats2023" and cohort != "GLI-2023":
            written.append(_write_cohort_case(out_dir, index, cohort, arrays, spacing, with_seg, file_ending))
        elif layout == "brats2023":
            prefix = f"BraTS-GLI-{index:05d}-000"
            written.append(_write_case_folder(os.path.join(out_dir, prefix), prefix, arrays, spacing, _NAMES_2023,
                                              "-", with_seg, "brats2023", file_ending))
        else:  # msd
            task = os.path.join(out_dir, "Task01_BrainTumour")
            sub = "imagesTr" if with_seg else "imagesTs"
            for d in ("imagesTr", "labelsTr", "imagesTs"):
                os.makedirs(os.path.join(task, d), exist_ok=True)
            name = f"BRATS_{index:03d}.nii.gz"
            img_path = os.path.join(task, sub, name)
            _write_msd_case(img_path, os.path.join(task, "labelsTr", name) if with_seg else None, arrays, spacing)
            (msd_training if with_seg else msd_test).append(name)
            written.append(img_path)

    if layout == "msd":
        meta = dict(_MSD_DATASET_JSON)
        meta.update({
            "numTraining": len(msd_training),
            "numTest": len(msd_test),
            "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in msd_training],
            "test": [f"./imagesTs/{n}" for n in msd_test],
        })
        with open(os.path.join(out_dir, "Task01_BrainTumour", "dataset.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=4)
    return written


@command(ValueError)
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nnunet_kd_synthetic``: write a synthetic BraTS-like dataset."""
    parser = argparse.ArgumentParser(
        prog="nnunet_kd_synthetic",
        description="Write seeded synthetic BraTS-like cases (brain ellipsoid + nested tumour blobs) "
                    "in the folder layout of a BraTS release or the Decathlon Task01.",
    )
    parser.add_argument("-o", "--output", required=True, help="output folder (created if missing)")
    parser.add_argument("-n", "--num-cases", type=int, required=True, help="number of training cases")
    parser.add_argument("--num-test", type=int, default=0, help="extra cases without segmentation (default 0)")
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 48, 48), metavar=("Z", "Y", "X"),
                        help="volume shape in voxels (default 48 48 48)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("X", "Y", "Z"),
                        help="voxel spacing in mm (default 1 1 1)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--layout", choices=LAYOUTS, default="brats2021", help="folder layout (default brats2021)")
    parser.add_argument("--start-index", type=int, default=1, help="index of the first case (default 1)")
    parser.add_argument("--nii", action="store_true", help="write uncompressed .nii instead of .nii.gz")
    args = parser.parse_args(argv)
    if args.num_cases < 0 or args.num_test < 0:
        parser.error("-n and --num-test must be >= 0")
    if min(args.shape) < 16:
        parser.error("--shape sizes must be >= 16")
    written = generate_dataset(
        args.output, args.num_cases, shape=tuple(args.shape), seed=args.seed, layout=args.layout,
        start_index=args.start_index, num_test=args.num_test, spacing=tuple(args.spacing),
        file_ending=".nii" if args.nii else ".nii.gz", progress=True,
    )
    print(f"wrote {len(written)} cases ({args.layout}) to {os.path.abspath(args.output)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
