"""The converter on synthetic cases in the layout of every BraTS 2023+ cohort: detection of the cohort,
labels and regions in dataset.json, the bad-label check per cohort, and ``--to-brats`` restoring the
cohort's original labels."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kd.brats import COHORTS
from nnunet_kd.conversion import ConversionError, convert_brats, convert_to_brats
from nnunet_kd.experiments.synthetic import generate_dataset

SHAPE = (20, 20, 20)
# cohort -> (year to pass, or None to detect; the cohort the converter must find)
LAYOUTS = {
    "GLI-2023": None, "GLI-2024": None, "MEN-2023": None, "MEN-RT-2024": None, "MET-2023": None,
    "MET-2025": "2025", "PED-2023": "2023", "PED-2024": "2024", "SSA-2023": None, "GoAT-2024": None,
}


def _array(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _sources(src: Path, token: str):
    return {p.parent.name: p for p in src.rglob(f"*{token}.nii.gz")}


@pytest.mark.parametrize("key", sorted(LAYOUTS))
def test_every_cohort_converts_with_its_labels_and_back(tmp_path, key):
    cohort = COHORTS[key]
    src = tmp_path / "src"
    generate_dataset(str(src), 2, shape=SHAPE, layout="brats2023", cohort=key)
    out = Path(convert_brats(str(src), 40, year=LAYOUTS[key], num_processes=1, output_root=str(tmp_path / "raw")))
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["brats_cohort"] == key
    assert list(meta["channel_names"].values()) == list(cohort.modalities)
    assert meta["labels"] == json.loads(json.dumps(cohort.dataset_json_labels()))
    assert meta.get("regions_class_order") == (list(cohort.regions_class_order) if cohort.uses_regions else None)
    differs = meta["label_meaning_differs_from_GLI"]
    assert bool(differs) == (key in ("GLI-2024", "MET-2025", "PED-2024", "MEN-RT-2024"))

    sources = _sources(src, cohort.seg_token)
    assert len(sources) == 2 and {p.name for p in (out / "labelsTr").iterdir()} == {f"{c}.nii.gz" for c in sources}
    preds = tmp_path / "preds"
    preds.mkdir()
    for case, seg_path in sources.items():
        original = _array(seg_path)
        converted = _array(out / "labelsTr" / f"{case}.nii.gz")
        assert set(np.unique(original)) == set(cohort.allowed_labels)  # every label of the cohort is present
        for value, nn_label in cohort.to_nnunet.items():
            np.testing.assert_array_equal(converted == nn_label, original == value)
        # nnU-Net writes the region-trained prediction back as labels; --to-brats restores the originals
        shutil.copy(out / "labelsTr" / f"{case}.nii.gz", preds / f"{case}.nii.gz")
    shutil.copy(out / "dataset.json", preds / "dataset.json")  # as nnUNetv2_predict does
    year = str(cohort.years[0])
    for folder, explicit in (("back_meta", None), ("back_cli", cohort.prefix)):
        written = convert_to_brats(str(preds), str(tmp_path / folder), year, cohort=explicit)
        assert len(written) == 2
        for case, seg_path in sources.items():
            np.testing.assert_array_equal(_array(tmp_path / folder / f"{case}.nii.gz"), _array(seg_path))


def test_post_treatment_glioma_keeps_rc_beside_wt_tc_et(tmp_path):
    src = tmp_path / "src"
    generate_dataset(str(src), 1, shape=SHAPE, layout="brats2023", cohort="GLI-2024")
    case = next(src.iterdir()).name
    assert case.endswith("-100")  # post-treatment timepoint: detected as 2024+ without --year
    out = Path(convert_brats(str(src), 41, num_processes=1, output_root=str(tmp_path / "raw")))
    assert out.name == "Dataset041_BraTS2024"
    named = Path(convert_brats(str(src), 45, year="2025", num_processes=1, output_root=str(tmp_path / "raw")))
    assert named.name == "Dataset045_BraTS2025"
    assert json.loads((named / "dataset.json").read_text())["brats_cohort"] == "GLI-2024"
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                              "enhancing tumor": [3], "resection cavity": [4]}
    assert meta["original_regions"]["RC"] == [4] and meta["original_regions"]["WT"] == [1, 2, 3]
    rc = _array(out / "labelsTr" / f"{case}.nii.gz") == 4
    np.testing.assert_array_equal(rc, _array(src / case / f"{case}-seg.nii.gz") == 4)
    assert rc.any()


@pytest.mark.parametrize("key,bad", [("GLI-2023", 4), ("GLI-2024", 5), ("PED-2024", 5), ("MEN-RT-2024", 2)])
def test_labels_outside_the_cohorts_set_are_rejected(tmp_path, key, bad):
    src = tmp_path / "src"
    generate_dataset(str(src), 1, shape=SHAPE, layout="brats2023", cohort=key)
    seg_path = next(src.rglob(f"*{COHORTS[key].seg_token}.nii.gz"))
    img = sitk.ReadImage(str(seg_path))
    arr = sitk.GetArrayFromImage(img)
    arr[0, 0, 0] = bad
    fixed = sitk.GetImageFromArray(arr)
    fixed.CopyInformation(img)
    sitk.WriteImage(fixed, str(seg_path))
    year = "2024" if key == "PED-2024" else None
    with pytest.raises(ConversionError, match=rf"label values \[{bad}\] outside the BraTS {key} .*label set"):
        convert_brats(str(src), 42, year=year, num_processes=1, output_root=str(tmp_path / "raw"))
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_mixed_cohorts_and_ambiguous_paediatric_year_are_refused(tmp_path):
    src = tmp_path / "src"
    generate_dataset(str(src), 1, shape=SHAPE, layout="brats2023", cohort="PED-2024")
    with pytest.raises(ConversionError, match="--year 2024"):
        convert_brats(str(src), 43, num_processes=1, output_root=str(tmp_path / "raw"))
    named = tmp_path / "BraTS2024-PED-Challenge-TrainingData"
    src.rename(named)  # the release folder's name tells the year
    out = Path(convert_brats(str(named), 43, num_processes=1, output_root=str(tmp_path / "raw")))
    assert json.loads((out / "dataset.json").read_text())["brats_cohort"] == "PED-2024"
    generate_dataset(str(named), 1, shape=SHAPE, layout="brats2023", cohort="MEN-2023", start_index=7)
    with pytest.raises(ConversionError, match="mix BraTS cohorts MEN, PED"):
        convert_brats(str(named), 44, num_processes=1, output_root=str(tmp_path / "raw"))


def test_to_brats_for_an_older_release_ignores_the_cohort_in_dataset_json(tmp_path):
    """A GLI 2024 model's predictions asked for in 2021 labels get ET = 4 (RC has no 2021 label)."""
    preds = tmp_path / "preds"
    preds.mkdir()
    seg = np.zeros((4, 4, 4), np.uint8)
    seg[0, 0, :4] = [0, 1, 2, 3]
    sitk.WriteImage(sitk.GetImageFromArray(seg), str(preds / "c.nii.gz"))
    (preds / "dataset.json").write_text(json.dumps({"brats_cohort": "GLI-2024"}))
    convert_to_brats(str(preds), str(tmp_path / "out"), "2021")
    assert _array(tmp_path / "out" / "c.nii.gz")[0, 0, :4].tolist() == [0, 2, 1, 4]
    convert_to_brats(str(preds), str(tmp_path / "out24"), "2024")
    assert _array(tmp_path / "out24" / "c.nii.gz")[0, 0, :4].tolist() == [0, 2, 1, 3]
    with pytest.raises(ConversionError, match="--cohort needs a 2023"):
        convert_to_brats(str(preds), str(tmp_path / "x"), "2021", cohort="PED")
