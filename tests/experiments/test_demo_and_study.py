"""The demo and the distillation-effect study run end to end at toy size (CI keeps them working)."""
from __future__ import annotations

import json



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


def test_study_runs_at_toy_size(tmp_path, bin_path, nnunet_env, run_cmd):
    env = nnunet_env(tmp_path)
    work = tmp_path / "study"
    study = [bin_path("python"), "-m", "nnunet_kd.experiments.study"]
    run_cmd(study + ["--toy", "--seeds", "0", "--workdir", str(work), "--device", "cpu", "-np", "1"], env,
            timeout=1500)
    result = json.loads((work / "study.json").read_text())
    models = result["summary"]["models"]
    assert len(models) == 5 and any("MTCM-KD" in m for m in models) and any("MGSD" in m for m in models)
    assert len(result["summary"]["mgsd_combinations"]) == 15
    for regions in models.values():
        assert all(0 <= regions[r]["dice"]["mean"] <= 1 for r in ("WT", "TC", "ET"))
    assert (work / "study_dice.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MGSD over all 15 modality combinations" in (work / "study.md").read_text()

    # --resume with other settings is refused and leaves the work dir as it was.
    scores = sorted((work / "seed0").glob("scores_*.json"))
    stamps = [f.stat().st_mtime_ns for f in scores]
    proc = run_cmd(study + ["--seeds", "0", "--workdir", str(work), "--cases", "2", "--test-cases", "1",
                            "--shape", "32", "32", "32", "--epochs", "2", "--iterations", "1", "--device", "cpu",
                            "--resume"], env, check=False)
    assert proc.returncode != 0 and "epochs was 1, now 2" in proc.stderr and "Traceback" not in proc.stderr
    assert [f.stat().st_mtime_ns for f in scores] == stamps

    # --resume --ablations --only: trains just the one new model asked for; the finished ones are kept.
    run_cmd(study + ["--toy", "--seeds", "0", "--workdir", str(work), "--device", "cpu", "-np", "1", "--resume",
                     "--ablations", "--only", "nnUNetTrainerMTCMKD_StrongKD_full", "nnUNetTrainerMGSD_full"], env,
            timeout=1500)
    assert [f.stat().st_mtime_ns for f in scores] == stamps
    trained = sorted(f.name[len("train_"):-len(".log")] for f in (work / "seed0" / "logs").glob("train_*.log"))
    assert trained == sorted(["nnUNetTrainerBudget_t1ce", "nnUNetTrainerBudget_full", "nnUNetTrainerMGSD_full",
                              "nnUNetTrainerMTCMKD_full", "nnUNetTrainerModalityDropout_full",
                              "nnUNetTrainerMTCMKD_StrongKD_full"])
    result = json.loads((work / "study.json").read_text())
    assert list(result["summary"]["models"]) == ["MGSD fed T1ce alone",
                                                 "ablation: MTCM-KD, KD from epoch 0, scaled by T^2"]
    assert len(result["summary"]["mgsd_combinations"]) == 15

    proc = run_cmd(study + ["--toy", "--only", "nnUNetTrainerMTCMKD_StrongKD_full"], env, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "unknown model(s) nnUNetTrainerMTCMKD_StrongKD_full" in proc.stderr and "need --ablations" in proc.stderr
