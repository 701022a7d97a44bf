"""The demo and the distillation-effect study run end to end at toy size (CI keeps them working)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_kd.experiments.demo import NEXT_HEADER, NEXT_OUTPUTS
from nnunet_kd.experiments.study.design import BASELINE



def test_demo_runs_mtcmkd_and_mgsd(tmp_path, bin_path, nnunet_env, run_cmd):
    env = nnunet_env(tmp_path)
    work = tmp_path / "demo"
    proc = run_cmd([bin_path("nnunet_kd_demo"), "--workdir", str(work), "--cases", "2", "--held-out", "1",
                    "--shape", "32", "32", "32", "--epochs", "1", "--iterations", "1", "--device", "cpu"], env)
    report = json.loads((work / "demo_report.json").read_text())
    assert set(report["scores"]) == {"MTCM-KD student, T1ce only", "MGSD, T1ce + FLAIR (T1, T2 missing)"}
    for scores in report["scores"].values():
        assert set(scores) == {"WT", "TC", "ET"} and all(0 <= scores[r]["dice"] <= 1 for r in scores)
    assert len(list((work / "predictions" / "mtcmkd_T1ce").glob("*.nii.gz"))) == 1
    assert len(list((work / "predictions" / "mgsd_T1ce_FLAIR").glob("*.nii.gz"))) == 1
    # The T1ce-only prediction came from one-channel inputs through stock nnUNetv2_predict.
    assert all(p.name.endswith("_0000.nii.gz") for p in (work / "nnUNet_raw").glob("Dataset992_*/imagesTr/*"))
    assert "held-out scores" in proc.stdout and "WT HD95" in proc.stdout
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        assert f"export {var}={work / var}" in proc.stdout
    assert (work / ".nnunet_kd_demo").is_file()

    # The commands printed at the end run as printed, one after the other, in a shell where only the virtual
    # environment is active: the nnU-Net folders and the trainer lookup come from the printed lines alone.
    printed = proc.stdout.split(NEXT_HEADER + "\n", 1)[1].strip().splitlines()
    assert printed == report["next_commands"]
    assert printed[3] == 'eval "$(nnunet_kd_env)"'
    assert [c.split()[0] for c in printed[4:]] == ["nnUNetv2_predict", "nnunet_kd_evaluate", "nnunet_kd_predict",
                                                   "nnunet_kd_evaluate", "nnunet_kd_evaluate_missing"]
    assert all("-device cpu" in c for c in printed if "predict" in c or "missing" in c)
    shell_env = {k: v for k, v in env.items()
                 if k not in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_extTrainer")}
    shell_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + shell_env.get("PATH", os.defpath)
    run_cmd(["bash", "-e", "-c", "\n".join(printed)], shell_env, timeout=1500)

    out = work / NEXT_OUTPUTS
    labels = sorted((work / "nnUNet_raw").glob("Dataset991_*/labelsTr/*.nii.gz"))
    assert len(labels) == 1
    for folder, name in (("mtcmkd_T1ce", "MTCM-KD student, T1ce only"),
                         ("mgsd_T1ce_FLAIR", "MGSD, T1ce + FLAIR (T1, T2 missing)")):
        predictions = sorted((out / folder).glob("*.nii.gz"))
        assert [p.name for p in predictions] == [p.name for p in labels]  # one segmentation per held-out case
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(predictions[0])))
        assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(labels[0]))).shape
        assert set(np.unique(seg).tolist()) <= {0, 1, 2, 3}
        scored = json.loads((out / f"{folder}.json").read_text())
        assert list(scored["cases"]) == [labels[0].name[:-len(".nii.gz")]]
        for region in ("WT", "TC", "ET"):
            assert 0 <= scored["mean"][region]["dice"] <= 1 and scored["mean"][region]["hd95"] >= 0
            # the same model on the same inputs as the demo's own prediction: the same score
            assert scored["mean"][region]["dice"] == pytest.approx(report["scores"][name][region]["dice"], abs=1e-6)
    missing = json.loads((out / "missing_modalities" / "missing_modalities.json").read_text())
    assert len(missing["combinations"]) == 15 and "T1ce+FLAIR" in missing["combinations"]
    for entry in missing["combinations"].values():
        assert all(0 <= entry["mean"][r]["dice"] <= 1 for r in ("WT", "TC", "ET"))


def test_study_on_synthetic_data_resume_and_collect(tmp_path, bin_path, nnunet_env, run_cmd):
    env = nnunet_env(tmp_path)
    work = tmp_path / "study"
    study = [bin_path("python"), "-m", "nnunet_kd.experiments.study"]
    run_cmd(study + ["--toy", "--seeds", "0", "--workdir", str(work), "--device", "cpu", "-np", "1",
                     "--only", "nnUNetTrainerModalityDropout_full", "--metrics", "both"], env, timeout=1500)
    result = json.loads((work / "study.json").read_text())
    summary = result["summary"]
    assert list(summary["models"]) == [BASELINE, "modality dropout fed T1ce alone"]
    for entry in summary["models"].values():
        assert entry["n"] == 1 and all(0 <= entry["mean"][r]["dice"] <= 1 for r in ("WT", "TC", "ET"))
    assert len(summary["combinations"]["modality dropout fed T1ce alone"]) == 15
    assert list(summary["paired"]) == ["modality dropout fed T1ce alone"]
    # --metrics both: the official lesion-wise metrics beside the legacy ones in every scores file
    scored = json.loads((work / "seed0" / "scores_nnUNetTrainerBudget_t1ce.json").read_text())
    assert scored["metrics"] == "both" and scored["lesionwise"] and scored["cases"]
    assert (work / "study_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "modality dropout over all 15 modality combinations" in (work / "study.md").read_text()

    # --resume with other settings is refused and leaves the work dir as it was.
    scores = sorted((work / "seed0").glob("scores_*.json"))
    stamps = [f.stat().st_mtime_ns for f in scores]
    proc = run_cmd(study + ["--seeds", "0", "--workdir", str(work), "--cases", "2", "--test-cases", "1",
                            "--shape", "32", "32", "32", "--epochs", "2", "--iterations", "1", "--device", "cpu",
                            "--resume"], env, check=False)
    assert proc.returncode == 1 and "epochs was 1, now 2" in proc.stderr and "Traceback" not in proc.stderr
    assert [f.stat().st_mtime_ns for f in scores] == stamps

    # --resume --ablations --only: trains just the one new model asked for; the finished ones are kept.
    run_cmd(study + ["--toy", "--seeds", "0", "--workdir", str(work), "--device", "cpu", "-np", "1", "--resume",
                     "--ablations", "--only", "nnUNetTrainerMTCMKD_KDFromStart_full"], env, timeout=1500)
    assert [f.stat().st_mtime_ns for f in scores] == stamps
    trained = sorted(f.name[len("train_"):-len(".log")] for f in (work / "seed0" / "logs").glob("train_*.log"))
    assert trained == sorted(["nnUNetTrainerBudget_t1ce", "nnUNetTrainerModalityDropout_full",
                              "nnUNetTrainerMTCMKD_KDFromStart_full"])

    # --collect reports on what finished, here every model the settings name.
    report = tmp_path / "report"
    run_cmd(study + ["--toy", "--ablations", "--collect", str(work), "--workdir", str(report)], env)
    collected = json.loads((report / "study.json").read_text())["summary"]
    assert set(collected["models"]) == {BASELINE, "modality dropout fed T1ce alone",
                                        "ablation: MTCM-KD, KD from epoch 0"}
    assert "MGSD fed T1ce alone" in collected["incomplete"]

    # A work dir the study did not make is never replaced.
    own = tmp_path / "thesis"
    own.mkdir()
    (own / "chapter1.tex").write_text("precious")
    proc = run_cmd(study + ["--toy", "--workdir", str(own)], env, check=False)
    assert proc.returncode == 1 and "did not write" in proc.stderr
    assert (own / "chapter1.tex").read_text() == "precious"

    proc = run_cmd(study + ["--toy", "--only", "nnUNetTrainerMTCMKD_KDFromStart_full"], env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown model(s) nnUNetTrainerMTCMKD_KDFromStart_full" in proc.stderr and "need --ablations" in proc.stderr


def test_study_on_real_cases_in_folds_at_a_target_spacing(tmp_path, bin_path, nnunet_env, run_cmd, real_brats2018):
    """The real-data study at toy size: 2 real cases, 2 folds, planned at 6 mm through nnU-Net's planner."""
    release = tmp_path / "two_cases"
    release.mkdir()
    for case in sorted(real_brats2018.iterdir())[:2]:
        (release / case.name).symlink_to(case)
    env = nnunet_env(tmp_path)
    work = tmp_path / "study"
    run_cmd([bin_path("python"), "-m", "nnunet_kd.experiments.study", "--real-brats", str(release), "--folds", "2",
             "--target-spacing", "6", "6", "6", "--epochs", "1", "--iterations", "2", "--device", "cpu", "-np", "1",
             "--workdir", str(work), "--only", "nnUNetTrainerMTCMKD_full"], env,
            timeout=1500)
    result = json.loads((work / "study.json").read_text())
    assert result["splits"] == ["fold0", "fold1"]
    summary = result["summary"]
    assert list(summary["models"]) == [BASELINE, "MTCM-KD student (T1ce)"]
    assert all(entry["n"] == 2 for entry in summary["models"].values())  # every case is a test case once
    for fold in ("fold0", "fold1"):
        tested = json.loads((work / fold / "scores_nnUNetTrainerBudget_t1ce.json").read_text())["cases"]
        assert len(tested) == 1
        plans = json.loads(next((work / fold / "preprocessed").glob("Dataset600_*/nnUNetPlans_6x6x6mm.json"))
                           .read_text())
        assert plans["configurations"]["3d_fullres"]["spacing"] == [6.0, 6.0, 6.0]
    paired = summary["paired"]["MTCM-KD student (T1ce)"]["WT"]["dice"]
    assert paired["n"] == 2 and paired["low"] <= paired["mean"] <= paired["high"]
    assert (work / "study_paired.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the report finds each split's distillation_log.json: epoch 0 is the supervised loss alone
    shares = summary["gradient_shares"]["MTCM-KD student (T1ce)"]
    assert shares["splits"] == 2 and set(shares["terms"]) == {"supervised", "response_kd", "cdsfl_kd"}
    assert shares["terms"]["supervised"]["mean"] == pytest.approx([1.0])
    assert (work / "study_gradient_shares.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (work / "study.md").read_text()
    assert "Paired per-case differences" in md and "target spacing 6x6x6 mm" in md and "commit" in md
    assert "Mean Dice per split" in md and "share of the gradient per epoch" in md
