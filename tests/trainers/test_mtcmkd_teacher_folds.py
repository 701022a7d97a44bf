"""Frozen MTCM-KD teachers must come from the student's fold: another fold is refused, fold_all is warned about."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from nnunet_kd.trainers.nnUNetTrainerMTCMKD_variants import nnUNetTrainerMTCMKD_FrozenTeachers
from nnunet_kd.training.teachers import check_teacher_fold, resolve_teacher_checkpoint


def _model(root: Path, folds) -> Path:
    """A teacher model folder with plans.json, dataset.json and ``fold_<f>/checkpoint_final.pth`` per fold."""
    root.mkdir(parents=True)
    (root / "plans.json").write_text("{}")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}}))
    for f in folds:
        (root / f"fold_{f}").mkdir()
        (root / f"fold_{f}" / "checkpoint_final.pth").write_bytes(b"")
    return root


def test_model_folder_gives_the_students_fold_else_fold_all(tmp_path):
    model = _model(tmp_path / "m", [0, 1, "all"])
    assert resolve_teacher_checkpoint(str(model), 1) == (str(model), "1", "checkpoint_final.pth")
    assert resolve_teacher_checkpoint(str(model), "all")[1] == "all"
    assert resolve_teacher_checkpoint(str(model), 3)[1] == "all"  # no fold_3: fold_all (warned by the trainer)


def test_another_fold_is_refused_naming_both_folds(tmp_path):
    model = _model(tmp_path / "m", [0, 1])
    with pytest.raises(ValueError, match=r"fold_0, fold_1 but not fold_2"):
        resolve_teacher_checkpoint(str(model), 2)
    for given in (model / "fold_1", model / "fold_1" / "checkpoint_final.pth"):
        with pytest.raises(ValueError, match=r"fold_1 but the student trains fold 0.*fold_0"):
            resolve_teacher_checkpoint(str(given), 0)
    assert resolve_teacher_checkpoint(str(model / "fold_0"), 0)[1] == "0"


def test_fold_all_teacher_is_allowed_with_a_warning():
    assert check_teacher_fold("0", 0, "t") is None and check_teacher_fold("all", "all", "t") is None
    warning = check_teacher_fold("all", 2, "teacher_dir")
    assert warning.startswith("WARNING") and "teacher_dir" in warning and "fold_2" in warning
    with pytest.raises(ValueError, match="fold_3 but the student trains fold 2"):
        check_teacher_fold("3", 2, "t")


def test_trainer_refuses_a_teacher_of_another_fold_before_building_anything(tmp_path, monkeypatch):
    model = _model(tmp_path / "m", [1])
    monkeypatch.setenv("nnUNet_kd_teachers", str(model / "fold_1"))
    with pytest.raises(ValueError, match="fold_1 but the student trains fold 0"):
        nnUNetTrainerMTCMKD_FrozenTeachers(plans={}, configuration="3d_fullres", fold=0, dataset_json={})
