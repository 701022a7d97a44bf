"""``--to-brats`` never guesses a cohort: where the year's cohorts use different label values and neither
--cohort nor a dataset.json decides, the case names (BraTS-<COHORT>-...) must name one, else it stops and
says that --cohort picks one."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kd.conversion.cli import main

#: One voxel of every nnU-Net label of the PED 2024 cohort (1 ED, 2 NET, 3 ET, 4 CC).
NNUNET_LABELS = [0, 1, 2, 3, 4]


def _predictions(folder: Path, names: Sequence[str], labels: Sequence[int] = NNUNET_LABELS) -> Path:
    folder.mkdir()
    seg = np.zeros((4, 4, 8), np.uint8)
    seg[0, 0, :len(labels)] = labels
    for name in names:
        sitk.WriteImage(sitk.GetImageFromArray(seg), str(folder / f"{name}.nii.gz"))
    return folder


def _labels(path: Path, n: int = len(NNUNET_LABELS)) -> List[int]:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))[0, 0, :n].tolist()


def _refused(argv: List[str], capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    return err


@pytest.mark.parametrize("year", ["2024", "2025"])
def test_paediatric_names_choose_the_paediatric_labels(tmp_path, capsys, year):
    cases = ["BraTS-PED-00001-000", "BraTS-PED-00002-000"]
    preds = _predictions(tmp_path / "preds", cases)
    assert main(["--to-brats", "--year", year, "-i", str(preds), "-o", str(tmp_path / "out")]) == 0
    assert "PED" in capsys.readouterr().out  # says which cohort's labels it wrote
    assert main(["--to-brats", "--year", year, "--cohort", "PED", "-i", str(preds), "-o", str(tmp_path / "cli")]) == 0
    for case in cases:
        # PED 2024+: nnU-Net 1 ED -> 4, 2 NET -> 2, 3 ET -> 1, 4 CC -> 3
        assert _labels(tmp_path / "out" / f"{case}.nii.gz") == [0, 4, 2, 1, 3]
        assert _labels(tmp_path / "cli" / f"{case}.nii.gz") == [0, 4, 2, 1, 3]


def test_unnamed_predictions_are_refused_with_the_cohort_choices(tmp_path, capsys):
    preds = _predictions(tmp_path / "preds", ["case_001", "case_002"], [0, 1, 2, 3])
    out = tmp_path / "out"
    err = _refused(["--to-brats", "--year", "2024", "-i", str(preds), "-o", str(out)], capsys)
    assert "--cohort" in err and "GLI, GoAT, MEN-RT, PED, SSA" in err and str(preds) in err
    assert not out.exists()
    assert main(["--to-brats", "--year", "2024", "--cohort", "GLI", "-i", str(preds), "-o", str(out)]) == 0
    assert _labels(out / "case_001.nii.gz", 4) == [0, 2, 1, 3]


def test_names_of_several_cohorts_are_refused(tmp_path, capsys):
    preds = _predictions(tmp_path / "preds", ["BraTS-PED-00001-000", "BraTS-GLI-00002-100", "other"], [0, 1, 2, 3])
    err = _refused(["--to-brats", "--year", "2024", "-i", str(preds), "-o", str(tmp_path / "out")], capsys)
    assert "BraTS-GLI-00002-100" in err and "BraTS-PED-00001-000" in err and "other" in err and "--cohort" in err
    assert not (tmp_path / "out").exists()
    met = _predictions(tmp_path / "met", ["BraTS-MET-00001-000"], [0, 1, 2, 3])  # no MET cohort in 2024
    err = _refused(["--to-brats", "--year", "2024", "-i", str(met), "-o", str(tmp_path / "out")], capsys)
    assert "BraTS 2024 has no MET cohort" in err and "--year" in err and "--cohort" in err


@pytest.mark.parametrize("year,cohort", [("2024", "SSA"), ("2023", None), ("2021", None)])
def test_a_label_outside_the_set_says_what_to_do(tmp_path, capsys, year, cohort):
    preds = _predictions(tmp_path / "preds", ["BraTS-SSA-00001-000"])  # label 4: CC of a PED 2024 model
    argv = ["--to-brats", "--year", year, "-i", str(preds), "-o", str(tmp_path / "out")]
    err = _refused(argv + (["--cohort", cohort] if cohort else []), capsys)
    assert "label values [4] are not in the allowed set [0, 1, 2, 3]" in err and "--cohort" in err


def test_years_with_one_label_convention_are_unchanged(tmp_path):
    preds = _predictions(tmp_path / "preds", ["case_001"], [0, 1, 2, 3])
    assert main(["--to-brats", "--year", "2023", "-i", str(preds), "-o", str(tmp_path / "y2023")]) == 0
    assert _labels(tmp_path / "y2023" / "case_001.nii.gz", 4) == [0, 2, 1, 3]
    assert main(["--to-brats", "--year", "2021", "-i", str(preds), "-o", str(tmp_path / "y2021")]) == 0
    assert _labels(tmp_path / "y2021" / "case_001.nii.gz", 4) == [0, 2, 1, 4]
