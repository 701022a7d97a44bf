"""Tests of the synthetic BraTS-like case generator."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kd.experiments import synthetic
from nnunet_kd.experiments.synthetic import generate_dataset, synthesize_case

MODS = ("t1", "t1ce", "t2", "flair")
SHAPE = (32, 32, 32)


def _read(path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _case_arrays(folder: Path) -> dict:
    cid = folder.name
    return {k: _read(folder / f"{cid}_{k}.nii.gz") for k in MODS + ("seg",)}


def test_one_case_layout_types_and_geometry(tmp_path):
    (written,) = generate_dataset(str(tmp_path), 1, shape=SHAPE, seed=3, spacing=(1.0, 1.0, 2.0))
    folder = Path(written)
    assert folder == tmp_path / "BraTS2021_00001"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"BraTS2021_00001_{k}.nii.gz" for k in MODS + ("seg",))
    for k in MODS:
        img = sitk.ReadImage(str(folder / f"BraTS2021_00001_{k}.nii.gz"))
        assert img.GetPixelID() == sitk.sitkInt16
        assert img.GetSpacing() == (1.0, 1.0, 2.0)
        assert sitk.GetArrayFromImage(img).shape == SHAPE
    seg = sitk.ReadImage(str(folder / "BraTS2021_00001_seg.nii.gz"))
    assert seg.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(seg)).tolist()) == {0, 1, 2, 4}


def test_same_seed_identical_different_seed_differs(tmp_path):
    a, b, c = (_case_arrays(Path(generate_dataset(str(tmp_path / name), 1, shape=SHAPE, seed=seed)[0]))
               for name, seed in (("a", 7), ("b", 7), ("c", 8)))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["seg"], c["seg"])
    assert not np.array_equal(a["t1ce"], c["t1ce"])


def test_dataset_is_deterministic_and_cases_differ(tmp_path):
    first = generate_dataset(str(tmp_path / "a"), 3, shape=(24, 24, 24), seed=1)
    second = generate_dataset(str(tmp_path / "b"), 3, shape=(24, 24, 24), seed=1)
    assert [Path(p).name for p in first] == ["BraTS2021_00001", "BraTS2021_00002", "BraTS2021_00003"]
    segs = []
    for p, q in zip(first, second):
        np.testing.assert_array_equal(_case_arrays(Path(p))["flair"], _case_arrays(Path(q))["flair"])
        segs.append(_case_arrays(Path(p))["seg"])
    assert not np.array_equal(segs[0], segs[1])  # random position/size per case


@pytest.mark.parametrize("shape", [(24, 24, 24), (32, 40, 36), (64, 64, 64)])
def test_shapes_and_all_labels_present(shape):
    for seed in range(5):
        arrays = synthesize_case(shape, seed)
        assert arrays["seg"].shape == shape
        assert set(np.unique(arrays["seg"]).tolist()) == {0, 1, 2, 4}
        for k in MODS:
            assert arrays[k].shape == shape and arrays[k].dtype == np.float32


def test_tumour_is_nested_and_inside_brain():
    for seed in range(5):
        a = synthesize_case(SHAPE, seed)
        seg, brain = a["seg"], a["brain"]
        assert not np.any((seg > 0) & ~brain)
        # NCR voxels touch only NCR or ET (never edema or healthy tissue directly): the ET rim encloses it.
        ncr = seg == 1
        for axis in range(3):
            for shift in (1, -1):
                neighbour = np.roll(seg, shift, axis=axis)[ncr]
                assert set(np.unique(neighbour).tolist()) <= {1, 4}


def test_contrasts(tmp_path):
    folders = generate_dataset(str(tmp_path), 4, shape=SHAPE, seed=0)
    for folder in folders:
        a = _case_arrays(Path(folder))
        seg = a["seg"]
        brain = a["t1"] > 0  # background is exactly zero, tissue is positive
        normal = brain & (seg == 0)
        t1ce, flair = a["t1ce"].astype(float), a["flair"].astype(float)
        assert t1ce[seg == 4].mean() > t1ce[seg == 2].mean() * 1.3  # enhancing rim bright in T1ce
        assert flair[seg == 2].mean() > flair[normal].mean() * 1.2  # oedema bright in FLAIR
        assert a["t2"][seg == 2].mean() > a["t2"][normal].mean()  # ... and in T2
        assert t1ce[seg == 1].mean() < t1ce[seg == 4].mean() * 0.5  # necrosis dark in T1ce


def test_background_zero_outside_brain():
    for seed in range(3):
        a = synthesize_case(SHAPE, seed)
        for k in MODS:
            assert np.all(a[k][~a["brain"]] == 0)
            assert a[k][a["brain"]].mean() > 50
        # the brain does not touch the volume border
        brain = a["brain"]
        assert not brain[0].any() and not brain[-1].any() and not brain[:, 0].any() and not brain[:, :, -1].any()


def test_noise_and_bias_make_tissue_inhomogeneous():
    a = synthesize_case(SHAPE, 0)
    healthy = a["brain"] & (a["seg"] == 0)
    assert len(np.unique(a["t1"][healthy])) > 100


LAYOUT_FILES = {
    "brats2018": ["HGG/Brats18_TCIA01_001_1/Brats18_TCIA01_001_1_t1ce.nii.gz",
                  "LGG/Brats18_TCIA01_003_1/Brats18_TCIA01_003_1_seg.nii.gz"],
    "brats2019": ["HGG/BraTS19_TCIA01_002_1/BraTS19_TCIA01_002_1_flair.nii.gz",
                  "LGG/BraTS19_TCIA01_003_1/BraTS19_TCIA01_003_1_t2.nii.gz"],
    "brats2020": ["BraTS20_Training_001/BraTS20_Training_001_seg.nii.gz",
                  "BraTS20_Validation_004/BraTS20_Validation_004_t1.nii.gz"],
    "brats2021": ["BraTS2021_00003/BraTS2021_00003_seg.nii.gz"],
    "brats2023": ["BraTS-GLI-00002-000/BraTS-GLI-00002-000-t1n.nii.gz",
                  "BraTS-GLI-00002-000/BraTS-GLI-00002-000-t2f.nii.gz",
                  "BraTS-GLI-00002-000/BraTS-GLI-00002-000-seg.nii.gz"],
    "msd": ["Task01_BrainTumour/imagesTr/BRATS_001.nii.gz", "Task01_BrainTumour/labelsTr/BRATS_003.nii.gz",
            "Task01_BrainTumour/imagesTs/BRATS_004.nii.gz", "Task01_BrainTumour/dataset.json"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_FILES))
def test_layouts(tmp_path, layout):
    generate_dataset(str(tmp_path), 3, shape=(24, 24, 24), layout=layout, num_test=1)
    for rel in LAYOUT_FILES[layout]:
        assert (tmp_path / rel).is_file(), rel
    if layout == "brats2023":
        seg = _read(tmp_path / LAYOUT_FILES[layout][2])
        assert set(np.unique(seg).tolist()) == {0, 1, 2, 3}
    if layout == "msd":
        img = sitk.ReadImage(str(tmp_path / LAYOUT_FILES[layout][0]))
        assert img.GetDimension() == 4 and img.GetSize()[3] == 4
        assert img.GetPixelID() == sitk.sitkFloat32
        arr = sitk.GetArrayFromImage(img)  # (channel, z, y, x): FLAIR, T1w, T1gd, T2w
        lab = _read(tmp_path / "Task01_BrainTumour/labelsTr/BRATS_001.nii.gz")
        assert set(np.unique(lab).tolist()) == {0, 1, 2, 3}
        # label 3 (enhancing) is brightest in the T1gd channel, label 1 (edema) bright in FLAIR
        assert arr[2][lab == 3].mean() > arr[2][lab == 1].mean()
        assert arr[0][lab == 1].mean() > arr[0][(lab == 0) & (arr[0] > 0)].mean()
        meta = json.loads((tmp_path / "Task01_BrainTumour/dataset.json").read_text())
        assert meta["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
        assert meta["numTraining"] == 3 and meta["numTest"] == 1
        assert meta["training"][0] == {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}


def test_brats2020_quirk_and_nii(tmp_path):
    generate_dataset(str(tmp_path), 2, shape=(24, 24, 24), layout="brats2020", start_index=354, file_ending=".nii")
    assert (tmp_path / "BraTS20_Training_355" / "W39_1998.09.19_Segm.nii").is_file()
    assert not (tmp_path / "BraTS20_Training_355" / "BraTS20_Training_355_seg.nii").exists()
    assert (tmp_path / "BraTS20_Training_354" / "BraTS20_Training_354_seg.nii").is_file()


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        generate_dataset(str(tmp_path), 1, layout="brats2017")
    with pytest.raises(ValueError, match="shape"):
        synthesize_case((8, 8, 8))


def test_default_size_case_is_complete_and_reproducible():
    # 48^3, the default size: every array, the documented types, the seed alone decides the case
    a, again, other = (synthesize_case((48, 48, 48), seed) for seed in (0, 0, 1))
    assert set(a) == set(MODS) | {"seg", "brain"}
    assert all(v.shape == (48, 48, 48) for v in a.values())
    assert a["seg"].dtype == np.uint8 and a["brain"].dtype == bool
    assert set(np.unique(a["seg"]).tolist()) == {0, 1, 2, 4}
    for k in a:
        np.testing.assert_array_equal(a[k], again[k])
    assert not np.array_equal(a["seg"], other["seg"])
    # a tumour, but mostly healthy brain: between 1 % and 30 % of the brain's voxels
    assert 0.01 < np.count_nonzero(a["seg"]) / np.count_nonzero(a["brain"]) < 0.3


def test_cli(tmp_path):
    out = tmp_path / "syn"
    proc = subprocess.run(
        [sys.executable, "-m", "nnunet_kd.experiments.synthetic", "-o", str(out), "-n", "2", "--shape", "24", "24", "24",
         "--seed", "5", "--layout", "brats2023"],
        capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[2]), env=dict(os.environ),
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000"]
    # the CLI uses the same per-case seeds as the API
    api = tmp_path / "api"
    generate_dataset(str(api), 2, shape=(24, 24, 24), seed=5, layout="brats2023")
    rel = "BraTS-GLI-00002-000/BraTS-GLI-00002-000-t1c.nii.gz"
    np.testing.assert_array_equal(_read(out / rel), _read(api / rel))
    assert synthetic.LAYOUTS == ("brats2018", "brats2019", "brats2020", "brats2021", "brats2023", "msd")
