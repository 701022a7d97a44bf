"""The study's design without training: folds over real cases, plans names, planning commands, model choice."""
from __future__ import annotations

import pytest

from nnunet_kd.experiments.datasets import planning_commands, plans_name_for
from nnunet_kd.experiments.study.collect import model_folder
from nnunet_kd.experiments.study.design import (ABLATIONS, ALL_FOUR, BASELINE, DATASET_IDS, MODELS, StudyError,
                                                StudySettings, real_case_folds, study_models)
from nnunet_kd.experiments.study.run import _teacher_environment


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


def test_models_and_ablations_include_the_reference_variants_and_keep_the_baseline():
    trainers = {m.trainer for m in MODELS.values()}
    assert {"nnUNetTrainerMTCMKD", "nnUNetTrainerMTCMKD_FrozenTeachers", "nnUNetTrainerMGSD",
            "nnUNetTrainerModalityDropout", "nnUNetTrainerBudget"} == trainers
    assert {"nnUNetTrainerMTCMKD_PaperWeights", "nnUNetTrainerMTCMKD_Reference",
            "nnUNetTrainerMTCMKD_VoxelMeanT1"} <= {m.trainer for m in study_models(True).values()}
    assert {n for n, m in MODELS.items() if m.combinations} == {"MGSD fed T1ce alone",
                                                                  "modality dropout fed T1ce alone"}
    only = study_models(False, ("nnUNetTrainerMGSD_full",))
    assert list(only) == [BASELINE, "MGSD fed T1ce alone"]


FROZEN = "MTCM-KD student, frozen four-channel teacher"


def test_a_model_with_a_teacher_brings_it_along_and_trains_after_it():
    names = list(MODELS)
    assert MODELS[FROZEN].teacher == ALL_FOUR and names.index(ALL_FOUR) < names.index(FROZEN)
    only = study_models(False, ("nnUNetTrainerMTCMKD_FrozenTeachers_full",))
    assert list(only) == [BASELINE, ALL_FOUR, FROZEN]
    stronger = "ablation: MTCM-KD, frozen four-channel teacher, KD x4"
    assert ABLATIONS[stronger].teacher == ALL_FOUR
    assert ABLATIONS["ablation: MTCM-KD, frozen four-channel teacher, student starts from it"].teacher == ALL_FOUR
    assert list(study_models(True, ("nnUNetTrainerMTCMKD_FrozenTeachers_KDx4_full",))) == [BASELINE, ALL_FOUR,
                                                                                           stronger]


def test_teacher_environment_names_the_finished_teacher_or_refuses(tmp_path):
    settings, plans = StudySettings(), "nnUNetPlans_4x4x4mm"
    assert _teacher_environment(tmp_path, MODELS[BASELINE], settings, plans) == {}
    with pytest.raises(StudyError, match="nnUNetTrainerBudget_full, which has no finished training"):
        _teacher_environment(tmp_path, MODELS[FROZEN], settings, plans)
    fold = (tmp_path / "results" / f"Dataset{DATASET_IDS['full']}_BraTS" / f"nnUNetTrainerBudget__{plans}__3d_fullres"
            / "fold_all")
    fold.mkdir(parents=True)
    (fold / "checkpoint_latest.pth").write_bytes(b"")
    with pytest.raises(StudyError, match="train it first"):  # a stopped training is no teacher yet
        _teacher_environment(tmp_path, MODELS[FROZEN], settings, plans)
    (fold / "checkpoint_final.pth").write_bytes(b"")
    assert model_folder(tmp_path, MODELS[ALL_FOUR], plans) == fold
    assert _teacher_environment(tmp_path, MODELS[FROZEN], settings, plans) == {"nnUNet_kd_teachers": str(fold)}
