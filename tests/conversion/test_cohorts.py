"""The BraTS 2023-2025 cohort table: label round trips, nnU-Net's region-to-label conversion, the
whole-tumour region the KD trainers pick, agreement with the official evaluation configs, and
case-name / year detection."""
from __future__ import annotations

import re

import numpy as np
import pytest
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_kd.brats import (COHORTS, REGIONS, Cohort, cohort_for, parse_case_id, region_masks, to_nnunet,
                             to_original)
from nnunet_kd.conversion.cohort_detection import detect_cohort, year_hint
from nnunet_kd.training.performance import whole_tumour_channel

KEYS = sorted(COHORTS)


def _random_labels(cohort: Cohort, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    seg = rng.choice(np.array(cohort.allowed_labels), size=(9, 10, 11))
    seg.flat[: len(cohort.allowed_labels)] = cohort.allowed_labels  # every label present
    return seg


@pytest.mark.parametrize("key", KEYS)
def test_labels_round_trip_through_nnunet_labels(key):
    cohort = COHORTS[key]
    original = _random_labels(cohort)
    nnunet = to_nnunet(original, cohort)
    assert sorted(np.unique(nnunet).tolist()) == list(range(len(cohort.allowed_labels)))
    np.testing.assert_array_equal(to_original(nnunet, cohort), original)
    # every voxel keeps its tissue: the name of its nnU-Net label is the name of its original label
    names = cohort.nnunet_label_names()
    for value, (abbr, _) in cohort.labels.items():
        assert set(np.unique(nnunet[original == value]).tolist()) == {cohort.to_nnunet[value]}
        assert names[cohort.to_nnunet[value]].startswith(abbr + ":")


@pytest.mark.parametrize("key", KEYS)
def test_nnunet_rebuilds_labels_from_the_regions(key):
    """nnU-Net's own region -> label conversion (regions_class_order) restores every label."""
    cohort = COHORTS[key]
    nnunet = to_nnunet(_random_labels(cohort, seed=1), cohort)
    manager = LabelManager(cohort.dataset_json_labels(), cohort.regions_class_order)
    assert manager.has_regions == cohort.uses_regions
    if cohort.uses_regions:
        masks = region_masks(nnunet, cohort.regions)
        probabilities = np.stack([masks[name] for name in cohort.regions]).astype(np.float32)
    else:
        probabilities = np.stack([nnunet == v for v in range(len(cohort.allowed_labels))]).astype(np.float32)
    rebuilt = manager.convert_probabilities_to_segmentation(probabilities)
    np.testing.assert_array_equal(np.asarray(rebuilt), nnunet)


@pytest.mark.parametrize("key", KEYS)
def test_whole_tumour_is_the_region_the_kd_trainers_pick(key):
    """The trainers take the region with the most labels as whole tumour (and channel 0 without regions)."""
    cohort = COHORTS[key]
    manager = LabelManager(cohort.dataset_json_labels(), cohort.regions_class_order)
    if not manager.has_regions:
        assert list(cohort.regions) == ["GTV"] and whole_tumour_channel(None) == 0
        return
    picked = whole_tumour_channel(manager.foreground_regions)  # what nnUNetTrainerMTCMKD uses
    assert list(cohort.regions)[picked] == "WT"
    # WT holds every tumour label; only RC (a cavity, not tumour) lies outside it
    outside = set(range(1, len(cohort.allowed_labels))) - set(cohort.regions["WT"])
    assert {cohort.labels[cohort.from_nnunet[v]][0] for v in outside} <= {"RC"}


def test_post_treatment_glioma_keeps_rc_as_its_own_label_and_region():
    gli = cohort_for("GLI", 2024)
    assert gli.labels[4][0] == "RC" and gli.to_nnunet[4] == 4
    assert gli.regions["RC"] == (4,) and 4 not in gli.regions["WT"]
    assert gli.original_regions() == {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,), "RC": (4,)}
    assert cohort_for("GLI", 2025) is gli


def test_labels_outside_a_cohorts_set_are_rejected():
    with pytest.raises(ValueError, match=r"\[4\]"):
        to_nnunet(np.array([0, 1, 4]), cohort_for("GLI", 2023))  # RC does not exist before 2024
    with pytest.raises(ValueError, match=r"\[5\]"):
        to_nnunet(np.array([0, 4, 5]), cohort_for("GLI", 2024))
    with pytest.raises(ValueError, match=r"\[2\]"):
        to_nnunet(np.array([0, 1, 2]), cohort_for("MEN-RT", 2024))  # one label only
    with pytest.raises(ValueError, match=r"\[5\]"):
        to_original(np.array([0, 5]), cohort_for("PED", 2024))  # nnU-Net labels 0-4 only


def test_paediatric_2024_labels_mean_other_tissues_than_2023():
    old, new = cohort_for("PED", 2023), cohort_for("PED", 2024)
    assert old.labels[1][0] == "NCR" and new.labels[1][0] == "ET"
    seg = np.array([1, 2, 3, 4])
    nn = to_nnunet(seg, new)
    # ET -> nnU-Net 3 (as in every cohort), NET -> 2, CC -> 4, ED -> 1
    assert nn.tolist() == [3, 2, 4, 1]
    assert new.original_regions() == {"WT": (1, 2, 3, 4), "TC": (1, 2, 3), "ET": (1,), "CC": (3,)}


def test_inconsistent_regions_are_refused():
    gli = cohort_for("GLI", 2023)
    with pytest.raises(ValueError, match="label 2 must lie in region 2"):
        Cohort("bad", "GLI", (2023,), "bad", gli.labels, gli.to_nnunet, {"WT": (1, 2, 3), "ET": (3,), "TC": (2, 3)},
               "gli", {}, source="")
    with pytest.raises(ValueError, match="onto 0..N"):
        Cohort("bad", "GLI", (2023,), "bad", gli.labels, {0: 0, 1: 2, 2: 1, 3: 5}, gli.regions, "gli", {}, source="")


def _official_groups(config: str):
    """group -> label values of a bundled config of the official package (read from its YAML)."""
    from nnunet_kd.evaluation.lesionwise import official_package

    text = official_package().config_path(config).read_text()
    return {name: tuple(int(v) for v in values.split(","))
            for name, values in re.findall(r"(\w+): !Label(?:Merge)?Group\s+single_instance: \w+\s+"
                                           r"value_labels: \[([\d, ]+)\]", text)}


@pytest.mark.parametrize("key", KEYS)
def test_regions_agree_with_the_official_evaluation_configs(key):
    lesionwise = pytest.importorskip("nnunet_kd.evaluation.lesionwise")
    if not lesionwise.is_available():
        pytest.skip(f"official BraTS evaluation package not installed ({lesionwise.INSTALL_HINT})")
    cohort = COHORTS[key]
    groups = _official_groups(cohort.eval_config)
    ours = cohort.original_regions()
    by_abbr = {abbr: (value,) for value, (abbr, _) in cohort.labels.items()}
    for group, name in cohort.eval_regions.items():
        expected = ours[name] if name in ours else by_abbr[name]
        assert tuple(sorted(groups[group])) == expected, (key, group, name)


def test_case_names_and_year_hints():
    assert parse_case_id("BraTS-GLI-02073-100") == ("GLI", "02073", 100)
    assert parse_case_id("BraTS-MEN-RT-0402-1") == ("MEN-RT", "0402", 1)
    assert parse_case_id("BraTS-MEN-00134-000") == ("MEN", "00134", 0)
    assert parse_case_id("BraTS-GoAT-00001") == ("GoAT", "00001", None)
    assert parse_case_id("BraTS-SSA-00163-000")[0] == "SSA"
    assert parse_case_id("BraTS2021_00001") is None and parse_case_id("BraTS-XYZ-00001-000") is None
    assert year_hint(["ASNR-MICCAI-BraTS2023-PED-Challenge-TrainingData"]) == 2023
    assert year_hint(["MICCAI2024-BraTS-GoAT-TrainingData-With-GroundTruth"]) == 2024
    assert year_hint(["BraTS2023-x", "BraTS2024-y"]) is None  # ambiguous
    assert year_hint(["BraTS-MEN-RT-2024-1", "data"]) is None  # a case folder, not a release


def test_detection_picks_the_year_from_names_or_refuses():
    pre = ["BraTS-GLI-00000-000", "BraTS-GLI-00002-001"]
    assert detect_cohort("GLI", pre).key == "GLI-2023"
    assert detect_cohort("GLI", pre + ["BraTS-GLI-02073-100"]).key == "GLI-2024"
    assert detect_cohort("GLI", pre, year=2025).key == "GLI-2024"
    assert detect_cohort("MET", ["BraTS-MET-00001-000"], hint=2025).key == "MET-2025"
    assert detect_cohort("MEN", ["BraTS-MEN-00001-000"], hint=2024).key == "MEN-2023"  # no 2024 MEN: hint ignored
    assert detect_cohort("PED", [], hint=2024).key == "PED-2024"
    with pytest.raises(ValueError, match="--year 2023 or --year 2024"):
        detect_cohort("PED", ["BraTS-PED-00001-000"])
    with pytest.raises(ValueError, match=r"GoAT exists for \[2024, 2025\]"):
        detect_cohort("GoAT", [], year=2023)
    with pytest.raises(ValueError, match="unknown BraTS cohort"):
        cohort_for("XYZ", 2024)


def test_region_masks_match_the_legacy_regions_for_adult_glioma():
    """GLI-2023 regions are the legacy (2018-2021) WT/TC/ET in nnU-Net labels."""
    assert dict(cohort_for("GLI", 2023).regions) == REGIONS
    seg = np.random.default_rng(2).integers(0, 4, (5, 6, 7))
    masks = region_masks(seg, cohort_for("SSA", 2023).regions)
    np.testing.assert_array_equal(masks["TC"], np.isin(seg, (2, 3)))
