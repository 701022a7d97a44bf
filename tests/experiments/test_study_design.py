"""The study's design without training: folds over real cases, plans names, planning commands, model choice."""
from __future__ import annotations

import pytest

from nnunet_kd.experiments.datasets import planning_commands, plans_name_for
from nnunet_kd.experiments.study_design import (BASELINE, MODELS, StudyError, real_case_folds, study_models)


def _release(tmp_path, n):
    for i in range(n):
        case = tmp_path / f"Brats18_X_{i:02d}_1"
        case.mkdir()
        (case / f"{case.name}_t1.nii.gz").write_bytes(b"")
    (tmp_path / "README.md").write_text("not a case")
    (tmp_path / "empty_folder").mkdir()
    return tmp_path


def test_folds_partition_the_cases_the_same_way_every_time(tmp_path):
    release = _release(tmp_path, 11)
    folds = real_case_folds(release, 3)
    assert sorted(len(f) for f in folds) == [3, 4, 4]
    names = [c.name for f in folds for c in f]
    assert sorted(names) == sorted(f"Brats18_X_{i:02d}_1" for i in range(11))  # each case in exactly one fold
    assert real_case_folds(release, 3) == folds
    assert [c.name for c in folds[0]] != sorted(names)[:4]  # shuffled, not the first cases in name order


def test_fold_errors_name_the_option(tmp_path):
    release = _release(tmp_path, 3)
    with pytest.raises(StudyError, match="--folds 4"):
        real_case_folds(release, 4)
    with pytest.raises(StudyError, match="--folds 1"):
        real_case_folds(release, 1)
    with pytest.raises(StudyError, match="not a folder"):
        real_case_folds(tmp_path / "missing", 2)


def test_plans_at_a_target_spacing_go_through_nnunets_planner():
    assert plans_name_for(None) == "nnUNetPlans"
    assert plans_name_for((4.0, 4.0, 4.0)) == "nnUNetPlans_4x4x4mm"
    assert plans_name_for((2.5, 1.0, 1.0)) == "nnUNetPlans_2.5x1x1mm"
    (plan,) = planning_commands(7, 2)
    assert plan[0].endswith("nnUNetv2_plan_and_preprocess")
    fingerprint, experiment, preprocess = planning_commands(7, 2, (4.0, 4.0, 4.0))
    assert fingerprint[0].endswith("nnUNetv2_extract_fingerprint")
    assert experiment[0].endswith("nnUNetv2_plan_experiment")
    assert experiment[experiment.index("-overwrite_target_spacing") + 1:][:3] == ["4", "4", "4"]
    assert experiment[experiment.index("-overwrite_plans_name") + 1] == "nnUNetPlans_4x4x4mm"
    assert preprocess[preprocess.index("-plans_name") + 1] == "nnUNetPlans_4x4x4mm"


def test_models_include_the_reference_variants_and_keep_the_baseline():
    trainers = {m.trainer for m in MODELS.values()}
    assert {"nnUNetTrainerMTCMKD", "nnUNetTrainerMTCMKD_Reference", "nnUNetTrainerMTCMKD_VoxelMeanT1",
            "nnUNetTrainerMGSD", "nnUNetTrainerModalityDropout", "nnUNetTrainerBudget"} == trainers
    assert {n for n, m in MODELS.items() if m.combinations} == {"MGSD fed T1ce alone",
                                                                  "modality dropout fed T1ce alone"}
    only = study_models(False, ("nnUNetTrainerMGSD_full",))
    assert list(only) == [BASELINE, "MGSD fed T1ce alone"]
