"""The study's report from score files alone: pooling over splits, paired differences, incomplete models."""
from __future__ import annotations

import json

import pytest

from nnunet_kd.experiments.study.collect import combinations_file, scores_file
from nnunet_kd.experiments.study.design import BASELINE, DATASET_IDS, MODELS, StudySettings, study_models
from nnunet_kd.experiments.study.report import collect_report
from nnunet_kd.experiments.study.tables import shown_epochs

DROPOUT = "modality dropout fed T1ce alone"
MTCMKD = "MTCM-KD student (T1ce)"


def _metrics(dice, hd95):
    return {r: {"dice": dice, "hd95": hd95} for r in ("WT", "TC", "ET")}


def _write_scores(path, cases):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"mean": {}, "cases": {c: _metrics(*v) for c, v in cases.items()}}))


def test_report_pools_splits_and_pairs_cases(tmp_path):
    work = tmp_path / "study"
    base = {"fold0": {"a": (0.5, 10.0), "b": (0.6, 8.0)}, "fold1": {"c": (0.7, 6.0)}}
    for fold, cases in base.items():
        root = work / fold
        _write_scores(scores_file(root, MODELS[BASELINE]), cases)
        _write_scores(scores_file(root, MODELS[DROPOUT]), {c: (d + 0.1, h - 1.0) for c, (d, h) in cases.items()})
        table = {"T1ce": {"cases": {c: _metrics(*v) for c, v in cases.items()}},
                 "T1+T1ce": {"cases": {c: _metrics(1.0, 1.0) for c in cases}}}
        combinations_file(root, MODELS[DROPOUT]).parent.mkdir(parents=True)
        combinations_file(root, MODELS[DROPOUT]).write_text(json.dumps({"combinations": table}))
    _write_scores(scores_file(work / "fold0", MODELS[MTCMKD]), {"a": (0.9, 1.0)})  # fold1 not finished

    settings = StudySettings(real_brats="cases", folds=2, target_spacing=(4.0, 4.0, 4.0), epochs=8, iterations=25)
    report = tmp_path / "report"
    md_file = tmp_path / "results.md"
    result = collect_report([str(work)], str(report), settings, str(md_file))
    summary = result["summary"]
    assert list(summary["models"]) == [BASELINE, DROPOUT]
    assert summary["models"][BASELINE]["n"] == 3
    assert summary["models"][BASELINE]["mean"]["WT"]["dice"] == pytest.approx(0.6)
    paired = summary["paired"][DROPOUT]["ET"]
    assert paired["dice"]["mean"] == pytest.approx(0.1) and paired["dice"]["better"] == 3
    assert paired["hd95"]["mean"] == pytest.approx(-1.0) and paired["hd95"]["better"] == 3
    assert summary["combinations"][DROPOUT]["T1+T1ce"]["WT"]["dice"] == pytest.approx(1.0)
    assert summary["incomplete"] == {MTCMKD: 1, **{n: 0 for n in MODELS if n not in (BASELINE, DROPOUT, MTCMKD)}}
    md = md_file.read_text()
    assert "target spacing 4x4x4 mm" in md and "8 epochs x 25 iterations" in md and "commit" in md
    assert f"| {DROPOUT} | WT | +10.0 [+10.0, +10.0] |" in md
    assert f"{MTCMKD} (1 of 2)" in md
    for png in ("study_dice.png", "study_paired.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_some_splits_only(tmp_path):
    work = tmp_path / "study"
    for fold, dice in (("fold0", 0.5), ("fold1", 0.7)):
        _write_scores(scores_file(work / fold, MODELS[BASELINE]), {f"case_{fold}": (dice, 3.0)})
    _write_scores(scores_file(work / "fold0", MODELS[MTCMKD]), {"case_fold0": (0.6, 2.0)})
    settings = StudySettings(real_brats="cases", folds=2)
    summary = collect_report([str(work)], str(tmp_path / "r"), settings, splits=[0])["summary"]
    assert summary["models"][BASELINE]["n"] == 1 and summary["models"][MTCMKD]["n"] == 1
    assert summary["paired"][MTCMKD]["WT"]["dice"]["mean"] == pytest.approx(0.1)


def _write_distillation_log(root, model, plans, shares, measured_at=None, extra=None):
    """``extra``: per epoch, further entries of that epoch's record (e.g. MTCM-KD's KD weights)."""
    folder = (root / "results" / f"Dataset{DATASET_IDS[model.dataset]}_BraTS" / f"{model.trainer}__{plans}__3d_fullres"
              / "fold_all")
    folder.mkdir(parents=True)
    entries = [{"epoch": e, "gradient_share": s, **({"gradient_measured_at": measured_at} if measured_at else {}),
                **(extra[e] if extra else {})} for e, s in enumerate(shares)]
    (folder / "distillation_log.json").write_text(json.dumps(entries))


def test_report_gives_per_split_means_and_gradient_shares(tmp_path):
    work, plans = tmp_path / "study", "nnUNetPlans_4x4x4mm"
    mgsd = "MGSD fed T1ce alone"
    logs = {"fold0": [{"supervised": 1.0, "kd": 0.0}, {"supervised": 0.6, "kd": 0.4}, {"supervised": 0.5, "kd": 0.5}],
            "fold1": [{"supervised": 1.0, "kd": 0.0}, {"supervised": 0.8, "kd": 0.2}]}  # one epoch fewer
    for fold, dice in (("fold0", 0.2), ("fold1", 0.4)):
        root = work / fold
        _write_scores(scores_file(root, MODELS[BASELINE]), {f"{fold}_a": (dice, 3.0)})
        _write_scores(scores_file(root, MODELS[MTCMKD]), {f"{fold}_a": (dice / 2, 4.0)})
        _write_distillation_log(root, MODELS[MTCMKD], plans, logs[fold])
        _write_distillation_log(root, MODELS[mgsd], plans, logs[fold], "parameters")  # no scores: not reported
    settings = StudySettings(real_brats="cases", folds=2, target_spacing=(4.0, 4.0, 4.0))
    result = collect_report([str(work)], str(tmp_path / "r"), settings)
    summary = result["summary"]
    assert summary["per_split"][MTCMKD]["fold1"]["WT"]["dice"] == pytest.approx(0.2)
    assert list(summary["gradient_shares"]) == [MTCMKD]
    shares = summary["gradient_shares"][MTCMKD]
    assert shares["measured_at"] == "logits" and shares["splits"] == 2
    assert shares["terms"]["kd"]["mean"] == pytest.approx([0.0, 0.3])  # the epochs both splits logged
    assert shares["terms"]["kd"]["low"] == pytest.approx([0.0, 0.2])
    assert shares["terms"]["kd"]["high"] == pytest.approx([0.0, 0.4])
    md = (tmp_path / "r" / "study.md").read_text()
    assert f"| {MTCMKD} | 10.0 / 10.0 / 10.0 | 20.0 / 20.0 / 20.0 |" in md
    assert f"| {MTCMKD} (logits) | kd | 0.00 | 0.30 |" in md
    assert (tmp_path / "r" / "study_gradient_shares.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_gives_mtcmkd_kd_weights_per_source_region_and_epoch(tmp_path):
    work, plans = tmp_path / "study", "nnUNetPlans_4x4x4mm"
    regions = ["whole tumor", "tumor core", "enhancing tumor"]
    shares = [{"supervised": 1.0, "response_kd": 0.0}] * 3
    weights = {"fold0": [None, {"T2": [0.1, 0.0, 0.0], "cdsfl1": [0.03, 0.03, 0.0]},
                         {"T2": [0.2, 0.1, 0.0], "cdsfl1": [0.03, 0.03, 0.03]}],
               "fold1": [None, {"T2": [0.3, 0.0, 0.0], "cdsfl1": [0.01, 0.0, 0.0]},
                         {"T2": [0.4, 0.3, 0.0], "cdsfl1": [0.03, 0.03, 0.03]}]}
    paper = [None, {"T2": 0.05, "cdsfl1": 0.03}, {"T2": 0.07, "cdsfl1": 0.03}]  # one weight for every region
    paper_name = "ablation: MTCM-KD, the paper's weights (WT Dice, fixed total)"
    ablation = study_models(True)[paper_name]
    for fold in ("fold0", "fold1"):
        root = work / fold
        _write_scores(scores_file(root, MODELS[BASELINE]), {f"{fold}_a": (0.5, 3.0)})
        for model, kd in ((MODELS[MTCMKD], weights[fold]), (ablation, paper)):
            _write_scores(scores_file(root, model), {f"{fold}_a": (0.4, 4.0)})
            _write_distillation_log(root, model, plans, shares,
                                    extra=[{"regions": regions, "kd_weights": w} for w in kd])
    settings = StudySettings(real_brats="cases", folds=2, target_spacing=(4.0, 4.0, 4.0), ablations=True)
    summary = collect_report([str(work)], str(tmp_path / "r"), settings)["summary"]
    default = summary["kd_weights"][MTCMKD]
    assert default["regions"] == regions and default["splits"] == 2 and list(default["sources"]) == ["T2", "cdsfl1"]
    assert default["sources"]["T2"]["whole tumor"]["mean"] == pytest.approx([0.0, 0.2, 0.3])  # 0 before KD starts
    assert default["sources"]["T2"]["tumor core"]["low"] == pytest.approx([0.0, 0.0, 0.1])
    assert default["sources"]["T2"]["tumor core"]["high"] == pytest.approx([0.0, 0.0, 0.3])
    assert summary["kd_weights"][paper_name]["sources"]["T2"]["enhancing tumor"]["mean"] == \
        pytest.approx([0.0, 0.05, 0.07])
    assert BASELINE not in summary["kd_weights"]
    md = (tmp_path / "r" / "study.md").read_text()
    assert "| model | source | region | epoch 0 | epoch 1 | epoch 2 |" in md
    assert f"| {MTCMKD} | T2 | whole tumor | 0 | 0.2 | 0.3 |" in md
    assert (tmp_path / "r" / "study_kd_weights.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_shown_epochs_are_the_first_ones_and_every_fifth_up_to_the_last():
    assert shown_epochs(120) == [0, 1, 2, 5, 10, 24, 48, 71, 95, 119]
    assert shown_epochs(3) == [0, 1, 2]
    assert shown_epochs(0) == []


def test_report_contrasts_mgsd_with_modality_dropout_per_combination(tmp_path):
    work = tmp_path / "study"
    mgsd = "MGSD fed T1ce alone"
    for fold in ("fold0", "fold1"):
        root = work / fold
        cases = {f"{fold}_a": (0.4, 5.0), f"{fold}_b": (0.5, 4.0)}
        _write_scores(scores_file(root, MODELS[BASELINE]), cases)
        for name, shift in ((DROPOUT, 0.0), (mgsd, 0.05)):
            _write_scores(scores_file(root, MODELS[name]), {c: (d + shift, h) for c, (d, h) in cases.items()})
            table = {"T1ce": {"cases": {c: _metrics(d + shift, h) for c, (d, h) in cases.items()}},
                     "FLAIR": {"cases": {c: _metrics(0.8 - shift, 2.0) for c in cases}}}
            combinations_file(root, MODELS[name]).parent.mkdir(parents=True)
            combinations_file(root, MODELS[name]).write_text(json.dumps({"combinations": table}))
    settings = StudySettings(real_brats="cases", folds=2)
    result = collect_report([str(work)], str(tmp_path / "r"), settings)
    contrast = result["summary"]["contrasts"][f"{mgsd} vs {DROPOUT}"]
    assert contrast["T1ce-fed"]["WT"]["dice"]["mean"] == pytest.approx(0.05)
    assert contrast["T1ce-fed"]["WT"]["dice"]["n"] == 4
    assert contrast["combinations"]["FLAIR"]["ET"]["dice"]["mean"] == pytest.approx(-0.05)
    assert contrast["combinations"]["FLAIR"]["ET"]["dice"]["better"] == 0
    md = (tmp_path / "r" / "study.md").read_text()
    assert f"{mgsd} vs {DROPOUT}, fed T1ce alone" in md
    assert "| FLAIR | -5.0 [-5.0, -5.0]" in md
