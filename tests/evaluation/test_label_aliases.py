"""BraTS 2018, 2019 and 2020 share the 2021 labels: ``--labels brats2018|2019|2020`` mean brats2021, and the
converter names that label set by its years."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kd.brats import canonical_label_convention
from nnunet_kd.conversion.convert import convert_brats
from nnunet_kd.conversion.releases import ConversionError
from nnunet_kd.evaluation import evaluate_cli
from nnunet_kd.evaluation import missing_modalities as mm
from nnunet_kd.experiments.synthetic import generate_dataset


def _write(path: Path, array: np.ndarray) -> None:
    sitk.WriteImage(sitk.GetImageFromArray(array.astype(np.uint8)), str(path))


@pytest.fixture
def brats2018_folders(tmp_path):
    """A reference and a prediction in BraTS 2018-2021 labels (1 NCR, 2 ED, 4 ET), overlapping partly."""
    ref, pred = np.zeros((12, 12, 12), np.uint8), np.zeros((12, 12, 12), np.uint8)
    ref[2:10, 2:10, 2:10], ref[4:8, 4:8, 4:8], ref[5:7, 5:7, 5:7] = 2, 1, 4
    pred[3:10, 2:10, 2:10], pred[4:8, 4:8, 4:8], pred[5:7, 5:8, 5:7] = 2, 4, 4
    for folder, array in (("ref", ref), ("pred", pred)):
        (tmp_path / folder).mkdir()
        _write(tmp_path / folder / "case_001.nii.gz", array)
    return tmp_path / "ref", tmp_path / "pred"


def test_canonical_label_convention():
    assert [canonical_label_convention(n) for n in ("brats2018", "brats2019", "brats2020", "brats2021")] == \
        ["brats2021"] * 4
    assert canonical_label_convention("brats2023") == "brats2023"
    assert canonical_label_convention("nnunet") == "nnunet"


@pytest.mark.parametrize("year", ["brats2018", "brats2019", "brats2020"])
def test_evaluate_reads_the_years_as_brats2021(brats2018_folders, tmp_path, year):
    ref, pred = brats2018_folders
    scores = {}
    for labels in (year, "brats2021"):
        out = tmp_path / f"{labels}.json"
        assert evaluate_cli.main(["-r", str(ref), "-p", str(pred), "-o", str(out), "--labels", labels, "-np", "1",
                                  "--no-plots"]) == 0
        scores[labels] = json.loads(out.read_text())["mean"]
    assert scores[year] == scores["brats2021"]
    # read as 2018-2021 labels: TC (NCR + ET) is the same 4x4x4 core in both; ET differs
    assert scores[year]["TC"]["dice"] == pytest.approx(1.0)
    assert 0 < scores[year]["ET"]["dice"] < 1


def test_unknown_labels_name_every_accepted_value(brats2018_folders, tmp_path, capsys):
    ref, pred = brats2018_folders
    with pytest.raises(SystemExit) as exc:
        evaluate_cli.main(["-r", str(ref), "-p", str(pred), "-o", str(tmp_path / "m.json"), "--labels", "brats2022"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--labels" in err and "brats2022" in err
    assert all(name in err for name in ("nnunet", "brats2018", "brats2019", "brats2020", "brats2021", "brats2023"))


@pytest.mark.parametrize("year", ["brats2018", "brats2019", "brats2020"])
def test_evaluate_missing_parses_the_years_as_brats2021(year):
    args = mm.build_parser().parse_args(["-i", "in", "-r", "ref", "-o", "out", "-m", "model", "--labels", year])
    assert args.labels == "brats2021"  # main hands args.labels to the evaluation unchanged
    assert mm.build_parser().parse_args(["-i", "in", "-r", "ref", "-o", "out", "-m", "model"]).labels == "nnunet"


def test_converter_names_the_2018_2021_label_set(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    (tmp_path / "raw").mkdir()
    cases = generate_dataset(str(tmp_path / "src"), 1, shape=(24, 24, 24), layout="brats2018")
    seg_path = next(Path(cases[0]).glob("*_seg.nii.gz"))
    image = sitk.ReadImage(str(seg_path))
    seg = sitk.GetArrayFromImage(image)
    seg[0, 0, 0] = 3  # no label 3 in 2018-2021
    broken = sitk.GetImageFromArray(seg)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(seg_path))
    with pytest.raises(ConversionError, match=r"label values \[3\] outside the BraTS 2018-2021 label set "
                                              r"\[0, 1, 2, 4\]"):
        convert_brats(str(tmp_path / "src"), 80)
