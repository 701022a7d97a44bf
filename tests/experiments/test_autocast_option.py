"""--autocast of nnunet_kd_study and of the benchmark: passed to the trainings' environment and recorded."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_kd.experiments.benchmark import cli as benchmark_cli
from nnunet_kd.experiments.benchmark import report as benchmark_report
from nnunet_kd.experiments.benchmark import run as benchmark_run
from nnunet_kd.experiments.study import cli as study_cli
from nnunet_kd.experiments.study import run as study
from nnunet_kd.experiments.study.design import StudyError, StudySettings
from nnunet_kd.training import precision
from nnunet_kd.training.precision import AUTOCAST_ENV, cpu_has_native_bf16

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def fake_study(monkeypatch):
    """run_study with its steps replaced by recorders: the environment every step gets, nothing trained."""
    envs = []
    monkeypatch.setattr(study, "prepare_split", lambda root, split, settings, env: envs.append(env))
    monkeypatch.setattr(study, "train_and_score", lambda root, model, settings, env: envs.append(env))
    monkeypatch.setattr(study, "collect_split", lambda *a: {})
    monkeypatch.setattr(study, "write_report", lambda *a: {})
    return envs


@pytest.mark.parametrize("choice,expected", [("bf16", "bf16"), ("none", "")])
def test_study_passes_autocast_to_every_step_and_records_it(fake_study, native_bf16, monkeypatch, tmp_path, choice,
                                                           expected):
    monkeypatch.setenv(AUTOCAST_ENV, "bf16" if choice == "none" else "")  # the caller's value does not leak
    study.run_study(str(tmp_path / "work"), [0], StudySettings(autocast=choice))
    assert fake_study and all(env[AUTOCAST_ENV] == expected for env in fake_study)
    assert json.loads((tmp_path / "work" / study.WORKDIR_MARKER).read_text())["autocast"] == choice


def test_study_resume_treats_older_work_dirs_as_fp32(fake_study, native_bf16, tmp_path):
    work = tmp_path / "work"
    study.run_study(str(work), [0], StudySettings())
    record = json.loads((work / study.WORKDIR_MARKER).read_text())
    del record["autocast"]  # as written before --autocast existed
    (work / study.WORKDIR_MARKER).write_text(json.dumps(record))
    study.run_study(str(work), [0], StudySettings(), resume=True)
    (work / study.WORKDIR_MARKER).write_text(json.dumps(record))
    with pytest.raises(StudyError, match="autocast was 'none', now 'bf16'"):
        study.run_study(str(work), [0], StudySettings(autocast="bf16"), resume=True)


def test_study_and_benchmark_refuse_emulated_bf16_before_writing(fake_study, monkeypatch, tmp_path):
    """On a CPU without native bfloat16, --autocast bf16 stops both before any folder is made (on CUDA it is
    nnU-Net's own autocast: allowed)."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(StudyError, match="--autocast bf16: this CPU has no native bfloat16"):
        study.run_study(str(tmp_path / "work"), [0], StudySettings(autocast="bf16", device="cpu"))
    with pytest.raises(ValueError, match="--autocast bf16: this CPU has no native bfloat16.*--autocast none"):
        benchmark_run.run_benchmark(benchmark_run.BenchmarkSettings(toy=True, device="cpu", autocast="bf16",
                                                                    work_dir=str(tmp_path / "bench")))
    assert not fake_study and list(tmp_path.iterdir()) == []
    study.run_study(str(tmp_path / "work"), [0], StudySettings(autocast="bf16", device="cuda"))
    assert fake_study


def test_study_command_line(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(study_cli, "run_study", lambda workdir, splits, settings, *a: seen.append(settings))
    assert study_cli.main(["--autocast", "bf16", "--device", "cpu", "--workdir", str(tmp_path / "w")]) == 0
    assert study_cli.main(["--device", "cpu", "--workdir", str(tmp_path / "w")]) == 0
    assert [s.autocast for s in seen] == ["bf16", "none"]
    with pytest.raises(SystemExit):
        study_cli._parser().parse_args(["--autocast", "fp16"])


def test_benchmark_stock_row_gets_the_same_autocast():
    assert benchmark_cli._parser().parse_args(["--toy"]).autocast == "none"
    assert benchmark_cli.settings_from_args(benchmark_cli._parser().parse_args(["--toy"])).autocast == "none"
    assert benchmark_run.stock_trainer("bf16", "cpu") == benchmark_run.STOCK_WITH_CPU_AUTOCAST
    assert benchmark_run.stock_trainer("bf16", "cuda") == benchmark_report.STOCK  # CUDA keeps nnU-Net's own autocast
    assert benchmark_run.stock_trainer("none", "cpu") == benchmark_report.STOCK


@pytest.mark.slow
def test_benchmark_toy_run_in_bf16(tmp_path):
    out = tmp_path / "OUT.json"
    env = dict(os.environ, nnUNet_n_proc_DA="1", nnUNet_compile="0", OMP_NUM_THREADS="2")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_kd_teachers", AUTOCAST_ENV):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "nnunet_kd.experiments.benchmark", "--toy", "--steps", "1", "--warmup", "0",
           "--data-loading-steps", "1", "--skip-inference", "--device", "cpu", "--trainers", "nnUNetTrainer",
           "nnUNetTrainerMGSD", "--autocast", "bf16", "--work-dir", str(tmp_path / "work"), "-o", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if not cpu_has_native_bf16():  # refused before anything is prepared (emulated bf16: ~60 times slower)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-5000:]
        assert "error: --autocast bf16: this CPU has no native bfloat16" in proc.stderr
        assert not (tmp_path / "work").exists() and not out.exists()
        return
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "autocast: bf16 (stock row: nnUNetTrainerBudget)" in proc.stdout
    result = json.loads(out.read_text())
    assert result["meta"]["autocast"] == "bf16" and result["meta"]["stock_measured_as"] == "nnUNetTrainerBudget"
    line = "precision: bf16 autocast on the CPU (nnUNet_kd_autocast=bf16)"
    assert result["meta"]["precision"] == line
    stock = result["trainers"]["nnUNetTrainer"]
    assert stock["class"].endswith(".nnUNetTrainerBudget") and stock["precision"] == line and stock["loss_finite"]
    assert result["trainers"]["nnUNetTrainerMGSD"]["precision"] == line
