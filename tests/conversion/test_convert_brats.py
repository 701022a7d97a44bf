"""Tests of the BraTS -> nnU-Net converter on synthetic data of every release layout (and real
BraTS 2021 cases when the shared sample is present)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import SimpleITK as sitk

import nnunet_kd.conversion.convert as convert_module
from nnunet_kd.brats import RELEASE_TO_NNUNET, map_labels
from nnunet_kd.conversion import ConversionError, convert_brats, convert_to_brats, detect_release
from nnunet_kd.conversion.cases import run_case
from nnunet_kd.experiments.synthetic import generate_dataset

REPO = Path(__file__).resolve().parents[2]
REAL_SAMPLE = Path(__file__).resolve().parents[3] / "shared" / "data" / "BraTS2021_sample"
SHAPE = (24, 24, 24)
CHANNELS = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
CANON = ("T1", "T1ce", "T2", "FLAIR")
# File-name token of each canonical modality in the per-file releases.
TOKENS = {"old": {"T1": "t1", "T1ce": "t1ce", "T2": "t2", "FLAIR": "flair"},
          "gli": {"T1": "t1n", "T1ce": "t1c", "T2": "t2w", "FLAIR": "t2f"}}
MSD_ORDER = ("FLAIR", "T1", "T1ce", "T2")
CONVENTION = {"brats2018": "brats2021", "brats2019": "brats2021", "brats2020": "brats2021",
              "brats2021": "brats2021", "brats2023": "brats2023", "msd": "msd"}


# ----------------------------------------------------------------------------------------- helpers


def _read(path):
    img = sitk.ReadImage(str(path))
    return img, sitk.GetArrayFromImage(img)


def _same_geometry(a: sitk.Image, b: sitk.Image) -> bool:
    return (a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin()) and np.allclose(a.GetDirection(), b.GetDirection()))


def _source_cases(layout: str, root: Path) -> Dict[str, Dict[str, Path]]:
    """case id -> {modality or 'seg': source file} for a synthetic input folder."""
    cases: Dict[str, Dict[str, Path]] = {}
    if layout == "msd":
        task = root / "Task01_BrainTumour"
        for sub in ("imagesTr", "imagesTs"):
            for p in sorted((task / sub).glob("BRATS_*.nii.gz")):
                cid = p.name[: -len(".nii.gz")]
                cases[cid] = {"image": p}
                if (task / "labelsTr" / p.name).exists():
                    cases[cid]["seg"] = task / "labelsTr" / p.name
        return cases
    tokens = TOKENS["gli" if layout == "brats2023" else "old"]
    for folder in sorted({p.parent for p in root.rglob("*.nii*") if not p.name.startswith(".")}):
        cid = folder.name
        files = {}
        for m in CANON:
            hits = [p for p in folder.iterdir() if not p.name.startswith(".")
                    and p.name.split(".nii")[0].endswith(("_" + tokens[m], "-" + tokens[m]))]
            files[m] = hits[0]
        others = [p for p in folder.iterdir() if ".nii" in p.name and not p.name.startswith(".")
                  and p not in files.values()]
        if others:
            files["seg"] = others[0]
        cases[cid] = files
    return cases


def _source_channel(layout: str, files: Dict[str, Path], modality: str):
    """(image, array) of one modality of a source case (split from the 4D image for MSD)."""
    if layout != "msd":
        return _read(files[modality])
    img4d, arr = _read(files["image"])
    return img4d, arr[MSD_ORDER.index(modality)]


def _check_dataset(dataset: Path, layout: str, src_root: Path, modalities=CANON) -> None:
    """Every channel voxel-identical to its source (bytes too where copied), labels mapped exactly."""
    meta = json.loads((dataset / "dataset.json").read_text())
    cases = _source_cases(layout, src_root)
    assert meta["channel_names"] == {str(i): m for i, m in enumerate(modalities)}
    assert meta["numTraining"] == sum("seg" in f for f in cases.values())
    assert meta["file_ending"] == ".nii.gz"
    assert meta["regions_class_order"] == [1, 2, 3]
    assert meta["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                              "enhancing tumor": [3]}
    assert meta["original_label_convention"] == CONVENTION[layout]
    written = sorted(p.name for p in (dataset / "imagesTr").iterdir())
    if (dataset / "imagesTs").exists():
        written += sorted(p.name for p in (dataset / "imagesTs").iterdir())
    assert len(written) == len(cases) * len(modalities)
    for cid, files in cases.items():
        sub = "imagesTr" if "seg" in files else "imagesTs"
        for ch, m in enumerate(modalities):
            out = dataset / sub / f"{cid}_{ch:04d}.nii.gz"
            out_img, out_arr = _read(out)
            src_img, src_arr = _source_channel(layout, files, m)
            np.testing.assert_array_equal(out_arr, src_arr)
            assert out_arr.dtype == src_arr.dtype
            assert out_img.GetSize() == tuple(reversed(src_arr.shape))
            assert out_img.GetSpacing() == src_img.GetSpacing()[:3]
            assert out_img.GetOrigin() == src_img.GetOrigin()[:3]
            if layout != "msd":
                assert out_img.GetDirection() == src_img.GetDirection()
                if files[m].name.endswith(".nii.gz"):
                    assert out.read_bytes() == files[m].read_bytes()
            else:
                d4 = np.array(src_img.GetDirection()).reshape(4, 4)[:3, :3].ravel()
                assert np.array_equal(out_img.GetDirection(), d4)
        lab = dataset / "labelsTr" / f"{cid}.nii.gz"
        if "seg" not in files:
            assert not lab.exists()
            continue
        lab_img, lab_arr = _read(lab)
        _, src_seg = _read(files["seg"])
        assert lab_img.GetPixelID() == sitk.sitkUInt8
        np.testing.assert_array_equal(lab_arr, map_labels(src_seg, RELEASE_TO_NNUNET[CONVENTION[layout]]))
        assert set(np.unique(lab_arr).tolist()) == {0, 1, 2, 3}
        assert _same_geometry(lab_img, out_img)


@pytest.fixture
def raw(tmp_path, monkeypatch) -> Path:
    """An empty nnUNet_raw, also set in the environment."""
    root = tmp_path / "nnUNet_raw"
    root.mkdir()
    monkeypatch.setenv("nnUNet_raw", str(root))
    return root


def _assert_clean(raw: Path, allowed=()) -> None:
    """After a failure: no dataset and no temporary folder in the output root."""
    assert sorted(p.name for p in raw.iterdir()) == sorted(allowed)


def _brats2021(tmp_path: Path, n: int = 2) -> Path:
    src = tmp_path / "in"
    generate_dataset(str(src), n, shape=SHAPE, layout="brats2021")
    return src


# ----------------------------------------------------------------------------------------- releases


LAYOUT_KW = {
    "brats2018": dict(num_test=1),  # flat validation folder next to HGG/LGG
    "brats2019": dict(),
    "brats2020": dict(num_test=1, start_index=354, file_ending=".nii"),  # .nii, case 355 quirk, Validation
    "brats2021": dict(),
    "brats2023": dict(),
    "msd": dict(num_test=1, spacing=(0.9, 1.1, 1.3)),
}


@pytest.mark.parametrize("layout", sorted(LAYOUT_KW))
def test_convert_every_release_autodetected(tmp_path, raw, layout, capsys):
    src = tmp_path / "in"
    generate_dataset(str(src), 3, shape=SHAPE, layout=layout, **LAYOUT_KW[layout])
    assert detect_release(str(src)) == layout
    out = Path(convert_brats(str(src), 11, num_processes=1))
    assert f"Detected release: {layout}" in capsys.readouterr().out
    default_name = {"msd": "BrainTumour"}.get(layout, layout.replace("brats", "BraTS"))
    assert out == raw / f"Dataset011_{default_name}"
    _check_dataset(out, layout, src)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["release"] == layout
    if "num_test" in LAYOUT_KW[layout]:
        assert len(list((out / "imagesTs").iterdir())) == 4
    assert sorted(p.name for p in raw.iterdir()) == [out.name]


@pytest.mark.parametrize("year,layout", [("2018", "brats2018"), ("2020", "brats2020"), ("2021", "brats2021"),
                                         ("2023", "brats2023"), ("msd", "msd")])
def test_convert_with_year(tmp_path, raw, year, layout, capsys):
    src = tmp_path / "in"
    generate_dataset(str(src), 2, shape=SHAPE, layout=layout)
    out = Path(convert_brats(str(src), 12, year=year, num_processes=1))
    assert "Detected release" not in capsys.readouterr().out
    _check_dataset(out, layout, src)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["release"] == ("msd" if year == "msd" else f"brats{year}")
    # --year 2024/2025 (GLI with RC): tests/conversion/test_cohort_layouts.py


def test_year_that_does_not_match_layout(tmp_path, raw):
    src = _brats2021(tmp_path)
    with pytest.raises(ConversionError, match=r"no brats2023 cases .*brats2021"):
        convert_brats(str(src), 1, year="2023", num_processes=1)
    _assert_clean(raw)


def test_msd_parent_or_task_folder_and_wrapper_folder(tmp_path, raw):
    src = tmp_path / "in"
    generate_dataset(str(src), 2, shape=SHAPE, layout="msd")
    assert detect_release(str(src / "Task01_BrainTumour")) == "msd"
    out = convert_brats(str(src / "Task01_BrainTumour"), 3, num_processes=1)
    _check_dataset(Path(out), "msd", src)
    # Unpacked archives often wrap the cases in one folder (MICCAI_BraTS2020_TrainingData/...).
    wrapped = tmp_path / "wrapped"
    generate_dataset(str(wrapped / "MICCAI_BraTS2020_TrainingData"), 2, shape=SHAPE, layout="brats2020")
    assert detect_release(str(wrapped)) == "brats2020"
    _check_dataset(Path(convert_brats(str(wrapped), 4, num_processes=1)), "brats2020", wrapped)


#: Environment variable naming the folder where _run_case_noting_worker notes ``<pid>.<case id>``.
WORKER_MARKS = "NNUNET_KD_TEST_WORKER_MARKS"


def _run_case_noting_worker(task, skip_incomplete):
    """The converter's run_case, after noting ``<pid>.<case id>`` in $NNUNET_KD_TEST_WORKER_MARKS and waiting until
    a second process has noted a case too: a case converts only while two processes convert at once, so a run in
    one process (or one worker) fails here after 60 s instead of passing."""
    marks = Path(os.environ[WORKER_MARKS])
    (marks / f"{os.getpid()}.{task.case_id}").touch()
    deadline = time.monotonic() + 60
    while len({p.name.split(".")[0] for p in marks.iterdir()}) < 2:
        if time.monotonic() > deadline:
            raise AssertionError(f"process {os.getpid()} waited 60 s for a second worker to convert a case")
        time.sleep(0.01)
    return run_case(task, skip_incomplete)


def _assert_same_dataset(a: Path, b: Path) -> None:
    """Two dataset folders hold the same files with the same voxels, geometry and dataset.json."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        if rel.name == "dataset.json":
            assert json.loads((a / rel).read_text()) == json.loads((b / rel).read_text())
            continue
        (img_a, arr_a), (img_b, arr_b) = _read(a / rel), _read(b / rel)
        np.testing.assert_array_equal(arr_a, arr_b)
        assert arr_a.dtype == arr_b.dtype and _same_geometry(img_a, img_b), rel


def test_parallel_workers(tmp_path, raw, monkeypatch):
    """-np 2: the cases convert in two worker processes at once, into the dataset a serial run writes."""
    src = tmp_path / "in"
    generate_dataset(str(src), 4, shape=SHAPE, layout="brats2023")
    serial = Path(convert_brats(str(src), 5, num_processes=1, output_root=str(tmp_path / "serial")))
    marks = tmp_path / "worker_marks"
    marks.mkdir()
    monkeypatch.setenv(WORKER_MARKS, str(marks))
    monkeypatch.setattr(convert_module, "run_case", _run_case_noting_worker)
    out = Path(convert_brats(str(src), 5, num_processes=2))
    noted = [p.name.split(".", 1) for p in marks.iterdir()]
    workers = {int(pid) for pid, _ in noted}
    assert len(workers) == 2 and os.getpid() not in workers
    assert sorted(case for _, case in noted) == sorted(p.name for p in src.iterdir())
    _check_dataset(out, "brats2023", src)
    assert out.name == serial.name
    _assert_same_dataset(out, serial)


def test_validation_set_goes_to_imagesTs(tmp_path, raw):
    src = tmp_path / "val"
    generate_dataset(str(src), 0, shape=SHAPE, layout="brats2021", num_test=2)
    out = Path(convert_brats(str(src), 6, num_processes=1))
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [
        f"BraTS2021_0000{i}_000{c}.nii.gz" for i in (1, 2) for c in range(4)]
    assert list((out / "imagesTr").iterdir()) == [] and list((out / "labelsTr").iterdir()) == []
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 0


def test_brats2020_quirk_seg_name(tmp_path, raw, capsys):
    src = tmp_path / "in"
    generate_dataset(str(src), 1, shape=SHAPE, layout="brats2020", start_index=355, file_ending=".nii")
    assert (src / "BraTS20_Training_355" / "W39_1998.09.19_Segm.nii").exists()
    out = Path(convert_brats(str(src), 7, num_processes=1))
    assert "W39_1998.09.19_Segm.nii" in capsys.readouterr().err
    _, lab = _read(out / "labelsTr" / "BraTS20_Training_355.nii.gz")
    _, seg = _read(src / "BraTS20_Training_355" / "W39_1998.09.19_Segm.nii")
    np.testing.assert_array_equal(lab, map_labels(seg, RELEASE_TO_NNUNET["brats2021"]))


def test_non_case_files_ignored(tmp_path, raw):
    src = tmp_path / "in"
    generate_dataset(str(src), 2, shape=SHAPE, layout="brats2020", num_test=1)
    (src / "name_mapping.csv").write_text("a,b\n")
    (src / "survival_info.csv").write_text("a,b\n")
    (src / "README.txt").write_text("hello")
    (src / ".DS_Store").write_bytes(b"\0\1")
    (src / "__MACOSX").mkdir()
    (src / "BraTS20_Training_001" / ".DS_Store").write_bytes(b"\0")
    (src / "BraTS20_Training_001" / "notes.txt").write_text("x")
    (src / "BraTS20_Training_001" / "._BraTS20_Training_001_t1.nii.gz").write_bytes(b"junk")
    out = Path(convert_brats(str(src), 8, num_processes=1))
    _check_dataset(out, "brats2020", src)
    msd = tmp_path / "msd"
    generate_dataset(str(msd), 1, shape=SHAPE, layout="msd")
    (msd / "Task01_BrainTumour" / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"junk")
    (msd / "Task01_BrainTumour" / ".DS_Store").write_bytes(b"junk")
    _check_dataset(Path(convert_brats(str(msd), 9, num_processes=1)), "msd", msd)


# ----------------------------------------------------------------------------------------- labels back


@pytest.mark.parametrize("layout,year", [("brats2021", "2021"), ("brats2023", "2023"), ("msd", "msd")])
def test_round_trip_to_brats(tmp_path, raw, layout, year):
    src = tmp_path / "in"
    generate_dataset(str(src), 2, shape=SHAPE, layout=layout)
    out = Path(convert_brats(str(src), 20, num_processes=1))
    pred_dir = out / "labelsTr"  # nnU-Net labels, standing in for predictions
    (pred_dir / "plans.json").write_text("{}")  # nnU-Net writes json files next to predictions
    back = tmp_path / "back"
    written = convert_to_brats(str(pred_dir), str(back), year)
    assert sorted(Path(p).name for p in written) == sorted(p.name for p in pred_dir.glob("*.nii.gz"))
    assert sorted(p.name for p in back.iterdir()) == sorted(Path(p).name for p in written)  # no temp left
    for cid, files in _source_cases(layout, src).items():
        img, arr = _read(back / f"{cid}.nii.gz")
        src_img, src_seg = _read(files["seg"])
        np.testing.assert_array_equal(arr, src_seg)
        assert _same_geometry(img, src_img)
    expected_et = {"2021": 4, "2023": 3, "msd": 3}[year]
    assert expected_et in np.unique(arr)


def test_to_brats_rejects_bad_predictions(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    img = sitk.GetImageFromArray(np.full((4, 4, 4), 5, np.uint8))
    sitk.WriteImage(img, str(pred / "case_1.nii.gz"))
    with pytest.raises(ConversionError, match=r"case_1.*\[5\]"):
        convert_to_brats(str(pred), str(tmp_path / "out"), "2021")
    assert list((tmp_path / "out").iterdir()) == []
    with pytest.raises(ConversionError, match="does not exist"):
        convert_to_brats(str(tmp_path / "nope"), str(tmp_path / "out"), "2021")


# ----------------------------------------------------------------------------------------- modalities


def test_modality_subset_t1ce(tmp_path, raw):
    src = _brats2021(tmp_path)
    out = Path(convert_brats(str(src), 30, modalities=["T1ce"], num_processes=1))
    assert out.name == "Dataset030_BraTS2021_T1ce"
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "T1ce"}
    _check_dataset(out, "brats2021", src, modalities=("T1ce",))


def test_modality_aliases_in_canonical_order(tmp_path, raw):
    src = tmp_path / "in"
    generate_dataset(str(src), 2, shape=SHAPE, layout="brats2023")
    out = Path(convert_brats(str(src), 31, modalities=["t2f", "t1c"], num_processes=1))
    assert out.name == "Dataset031_BraTS2023_T1ce_FLAIR"
    _check_dataset(out, "brats2023", src, modalities=("T1ce", "FLAIR"))
    out = Path(convert_brats(str(src), 32, modalities=["t1gd"], name="OnlyT1ce", num_processes=1))
    assert out.name == "Dataset032_OnlyT1ce"
    _check_dataset(out, "brats2023", src, modalities=("T1ce",))


def test_unknown_modality(tmp_path, raw):
    src = _brats2021(tmp_path)
    with pytest.raises(ConversionError, match="unknown MRI modality 'PD'"):
        convert_brats(str(src), 33, modalities=["T1ce", "PD"], num_processes=1)
    _assert_clean(raw)


# ----------------------------------------------------------------------------------------- bad input


def _rewrite(path: Path, arr=None, spacing=None, origin=None) -> None:
    img = sitk.ReadImage(str(path))
    new = sitk.GetImageFromArray(sitk.GetArrayFromImage(img) if arr is None else arr)
    new.SetSpacing(img.GetSpacing())  # keep the geometry unless told otherwise (the size may differ)
    new.SetOrigin(img.GetOrigin())
    new.SetDirection(img.GetDirection())
    if spacing is not None:
        new.SetSpacing(spacing)
    if origin is not None:
        new.SetOrigin(origin)
    sitk.WriteImage(new, str(path), True)


def _case_file(src: Path, case: int, token: str) -> Path:
    return src / f"BraTS2021_{case:05d}" / f"BraTS2021_{case:05d}_{token}.nii.gz"


def _break_missing_modality(src):
    _case_file(src, 2, "t1ce").unlink()
    return r"case BraTS2021_00002: missing T1ce image.*BraTS2021_00002_t1ce\.nii\.gz"


def _break_missing_seg(src):
    _case_file(src, 2, "seg").unlink()
    return r"case BraTS2021_00002: missing segmentation.*BraTS2021_00002_seg\.nii\.gz"


def _break_shape(src):
    p = _case_file(src, 2, "flair")
    _rewrite(p, arr=sitk.GetArrayFromImage(sitk.ReadImage(str(p)))[:-2])
    return r"case BraTS2021_00002: .*BraTS2021_00002_flair\.nii\.gz: shape \(24, 24, 22\) differs"


def _break_spacing(src):
    _rewrite(_case_file(src, 2, "t2"), spacing=(1.0, 1.0, 1.5))
    return r"case BraTS2021_00002: .*BraTS2021_00002_t2\.nii\.gz: spacing .* differs"


def _break_origin(src):
    _rewrite(_case_file(src, 1, "seg"), origin=(5.0, -23.0, 0.0))
    return r"case BraTS2021_00001: .*BraTS2021_00001_seg\.nii\.gz: origin .* differs"


def _break_labels(src):
    p = _case_file(src, 2, "seg")
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(p)))
    arr[0, 0, :2] = (3, 7)
    _rewrite(p, arr=arr)
    return r"case BraTS2021_00002: segmentation .*BraTS2021_00002_seg\.nii\.gz has label values \[3, 7\]"


def _break_truncated(src):
    p = _case_file(src, 2, "t1")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return r"case BraTS2021_00002: cannot read T1 file .*BraTS2021_00002_t1\.nii\.gz"


def _break_garbage(src):
    _case_file(src, 1, "t2").write_bytes(b"this is not a nifti file at all" * 20)
    return r"case BraTS2021_00001: cannot read T2 file .*BraTS2021_00001_t2\.nii\.gz"


BREAKERS = [_break_missing_modality, _break_missing_seg, _break_shape, _break_spacing, _break_origin,
            _break_labels, _break_truncated, _break_garbage]


@pytest.mark.parametrize("breaker", BREAKERS, ids=[b.__name__[7:] for b in BREAKERS])
@pytest.mark.parametrize("num_processes", [1, 2])
def test_bad_case_fails_and_leaves_nothing(tmp_path, raw, breaker, num_processes):
    src = _brats2021(tmp_path, n=3)
    pattern = breaker(src)
    with pytest.raises(ConversionError, match=pattern):
        convert_brats(str(src), 40, num_processes=num_processes)
    _assert_clean(raw)


def test_truncated_uncompressed_nii_and_msd(tmp_path, raw):
    # ITK zero-fills voxels missing from a cut-off file; the converter must notice anyway.
    src = tmp_path / "in"
    generate_dataset(str(src), 2, shape=SHAPE, layout="brats2020", file_ending=".nii")
    seg = src / "BraTS20_Training_002" / "BraTS20_Training_002_seg.nii"
    seg.write_bytes(seg.read_bytes()[:-100])
    with pytest.raises(ConversionError, match=r"case BraTS20_Training_002: cannot read segmentation file "
                                              r".*BraTS20_Training_002_seg\.nii: truncated"):
        convert_brats(str(src), 43, num_processes=1)
    msd = tmp_path / "msd"
    generate_dataset(str(msd), 2, shape=SHAPE, layout="msd")
    img = msd / "Task01_BrainTumour" / "imagesTr" / "BRATS_001.nii.gz"
    img.write_bytes(img.read_bytes()[: img.stat().st_size * 2 // 3])
    with pytest.raises(ConversionError, match=r"case BRATS_001: cannot read 4D image file .*BRATS_001\.nii\.gz"):
        convert_brats(str(msd), 43, num_processes=2)
    generate_dataset(str(msd), 2, shape=SHAPE, layout="msd")  # repair, then drop a label file
    (msd / "Task01_BrainTumour" / "labelsTr" / "BRATS_002.nii.gz").unlink()
    with pytest.raises(ConversionError, match=r"case BRATS_002: missing segmentation .*labelsTr/BRATS_002\.nii\.gz"):
        convert_brats(str(msd), 43, num_processes=1, skip_incomplete=False)
    _assert_clean(raw)


@pytest.mark.parametrize("breaker", [_break_missing_modality, _break_labels, _break_truncated])
def test_skip_incomplete(tmp_path, raw, breaker, capsys):
    src = _brats2021(tmp_path, n=3)
    breaker(src)
    out = Path(convert_brats(str(src), 41, num_processes=2, skip_incomplete=True))
    assert "warning: skipping case BraTS2021_00002" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["BraTS2021_00001.nii.gz", "BraTS2021_00003.nii.gz"]
    assert not any(p.name.startswith("BraTS2021_00002") for p in (out / "imagesTr").iterdir())
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2


def test_missing_and_empty_input(tmp_path, raw):
    with pytest.raises(ConversionError, match="does not exist"):
        convert_brats(str(tmp_path / "nope"), 42)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="is empty"):
        convert_brats(str(tmp_path / "empty"), 42)
    with pytest.raises(ConversionError, match="is empty"):
        convert_brats(str(tmp_path / "empty"), 42, year="2021")
    (tmp_path / "other" / "foo").mkdir(parents=True)
    (tmp_path / "other" / "bar").mkdir()
    with pytest.raises(ConversionError, match="cannot detect the BraTS release"):
        convert_brats(str(tmp_path / "other"), 42)
    _assert_clean(raw)


def test_no_output_root(tmp_path, monkeypatch):
    monkeypatch.delenv("nnUNet_raw", raising=False)
    src = _brats2021(tmp_path)
    with pytest.raises(ConversionError, match="nnUNet_raw"):
        convert_brats(str(src), 1)
    out = convert_brats(str(src), 1, output_root=str(tmp_path / "explicit"), num_processes=1)
    assert Path(out) == tmp_path / "explicit" / "Dataset001_BraTS2021"


def test_existing_dataset_needs_overwrite(tmp_path, raw):
    src = _brats2021(tmp_path)
    old = raw / "Dataset050_Something"
    old.mkdir()
    (old / "marker.txt").write_text("keep me")
    with pytest.raises(ConversionError, match="Dataset050_Something already exists"):
        convert_brats(str(src), 50, num_processes=1)
    assert (old / "marker.txt").read_text() == "keep me"
    _assert_clean(raw, ["Dataset050_Something"])
    # a failing conversion with --overwrite leaves the old dataset alone too
    _case_file(src, 1, "seg").unlink()
    with pytest.raises(ConversionError, match="case BraTS2021_00001: missing segmentation"):
        convert_brats(str(src), 50, num_processes=1, overwrite=True)
    assert (old / "marker.txt").read_text() == "keep me"
    _assert_clean(raw, ["Dataset050_Something"])
    generate_dataset(str(src), 1, shape=SHAPE)  # restore case 1
    out = Path(convert_brats(str(src), 50, num_processes=1, overwrite=True))
    _assert_clean(raw, ["Dataset050_BraTS2021"])
    _check_dataset(out, "brats2021", src)


def test_invalid_ids_and_names(tmp_path, raw):
    src = _brats2021(tmp_path)
    with pytest.raises(ConversionError, match="between 1 and 999"):
        convert_brats(str(src), 1000)
    with pytest.raises(ConversionError, match="invalid dataset name"):
        convert_brats(str(src), 1, name="bad name/x")
    _assert_clean(raw)


# ----------------------------------------------------------------------------------------- CLI


def _cli(args, raw: Path):
    env = dict(os.environ, nnUNet_raw=str(raw))
    return subprocess.run([sys.executable, "dataset_conversion/convert_brats.py", *args], cwd=str(REPO), env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_success(tmp_path, raw):
    src = tmp_path / "in"
    generate_dataset(str(src), 2, shape=SHAPE, layout="brats2021")
    proc = _cli(["-i", str(src), "-d", "60", "-np", "2"], raw)
    assert proc.returncode == 0, proc.stderr
    assert "Detected release: brats2021" in proc.stdout
    _check_dataset(raw / "Dataset060_BraTS2021", "brats2021", src)
    back = tmp_path / "back"
    proc = _cli(["--to-brats", "-i", str(raw / "Dataset060_BraTS2021" / "labelsTr"), "-o", str(back),
                 "--year", "2021"], raw)
    assert proc.returncode == 0, proc.stderr
    _, arr = _read(back / "BraTS2021_00001.nii.gz")
    _, seg = _read(src / "BraTS2021_00001" / "BraTS2021_00001_seg.nii.gz")
    np.testing.assert_array_equal(arr, seg)


@pytest.mark.parametrize("breaker", [_break_truncated, _break_missing_modality])
def test_cli_error_has_no_traceback(tmp_path, raw, breaker):
    src = _brats2021(tmp_path, n=2)
    breaker(src)
    proc = _cli(["-i", str(src), "-d", "61", "-np", "2"], raw)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    error = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and "BraTS2021_00002" in error[0] and "BraTS2021_00002_t" in error[0]
    _assert_clean(raw)


def test_cli_usage_errors(tmp_path, raw):
    proc = _cli(["-i", str(tmp_path / "missing"), "-d", "62"], raw)
    assert proc.returncode == 1 and proc.stderr.startswith("error: input folder") and "Traceback" not in proc.stderr
    proc = _cli(["-i", str(tmp_path), "-d", "62", "--modalities", "PD"], raw)
    assert proc.returncode == 1 and "unknown MRI modality 'PD'" in proc.stderr
    proc = _cli(["-i", str(tmp_path)], raw)
    assert proc.returncode != 0 and "dataset-id" in proc.stderr
    _assert_clean(raw)


# ----------------------------------------------------------------------------------------- real data


def test_real_brats2021_sample(tmp_path, raw):
    if not REAL_SAMPLE.is_dir():
        pytest.skip(f"real BraTS 2021 sample not found at {REAL_SAMPLE}")
    out = Path(convert_brats(str(REAL_SAMPLE), 70, num_processes=2))
    assert out == raw / "Dataset070_BraTS2021"
    meta = json.loads((out / "dataset.json").read_text())
    cases = sorted(p.name for p in REAL_SAMPLE.iterdir() if p.is_dir())
    assert meta["numTraining"] == len(cases) and meta["release"] == "brats2021"
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in cases]
    cid = cases[0]
    for ch, token in enumerate(("t1", "t1ce", "t2", "flair")):
        src = REAL_SAMPLE / cid / f"{cid}_{token}.nii.gz"
        dst = out / "imagesTr" / f"{cid}_{ch:04d}.nii.gz"
        assert dst.read_bytes() == src.read_bytes()
        np.testing.assert_array_equal(_read(dst)[1], _read(src)[1])
    lab_img, lab = _read(out / "labelsTr" / f"{cid}.nii.gz")
    src_img, seg = _read(REAL_SAMPLE / cid / f"{cid}_seg.nii.gz")
    assert set(np.unique(lab).tolist()) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(lab, map_labels(seg, RELEASE_TO_NNUNET["brats2021"]))
    assert _same_geometry(lab_img, src_img)
