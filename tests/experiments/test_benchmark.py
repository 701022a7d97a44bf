"""nnunet_kd.experiments.benchmark: the --toy CPU run end to end (as CI runs it), the settings' processes and
their environments, and the report helpers."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest

from nnunet_kd.experiments.benchmark import cli as benchmark_cli
from nnunet_kd.experiments.benchmark import report as benchmark_report
from nnunet_kd.experiments.benchmark import run as benchmark_run
from nnunet_kd.experiments.benchmark import worker as benchmark_worker
from nnunet_kd.training.precision import AUTOCAST_ENV

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    out = out_dir / "OUT.json"
    env = dict(os.environ, nnUNet_n_proc_DA="1", nnUNet_compile="0", OMP_NUM_THREADS="2")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_kd_teachers"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "nnunet_kd.experiments.benchmark", "--toy", "--steps", "2", "--warmup", "1",
           "--data-loading-steps", "1", "--inference-repeats", "1", "--device", "cpu",
           "--work-dir", str(out_dir / "work"), "-o", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    return proc, out, out_dir


def test_toy_run_succeeds(toy_run):
    proc, out, _ = toy_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert out.is_file()
    # stdout carries only the table; nnU-Net's chatter and progress go to stderr.
    assert "nnunet-kd benchmark" in proc.stdout
    assert "Please cite" not in proc.stdout
    assert "[benchmark" in proc.stderr


def test_toy_json_structure(toy_run):
    proc, out, _ = toy_run
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    meta = result["meta"]
    for key in ("device", "device_name", "torch_version", "date", "command_line", "patch_size", "batch_size",
                "frozen_teachers"):
        assert meta.get(key) not in (None, ""), key
    assert meta["device"] == "cpu"
    assert "--toy" in meta["command_line"]
    assert len(meta["patch_size"]) == 3 and meta["batch_size"] >= 1

    assert list(result["trainers"]) == list(benchmark_run.DEFAULT_TRAINERS)
    for name, r in result["trainers"].items():
        assert "error" not in r, f"{name}: {r.get('error')}"
        assert r["step_time_median_s"] > 0, name
        assert r["step_time_with_data_loading_median_s"] > 0, name
        assert len(r["step_times_s"]) == 2 and len(r["step_times_with_data_loading_s"]) == 1
        assert r["peak_gpu_memory_mib"] == "n/a"
        assert r["batch_data_shape"][0] == meta["batch_size"]
        assert r["batch_data_shape"][2:] == meta["patch_size"]
        assert r["loss_finite"], name

    ratios = result["ratios"]
    assert set(ratios) == set(result["trainers"])
    assert ratios["nnUNetTrainer"]["step_time"] == pytest.approx(1.0)
    for name, q in ratios.items():
        assert q["step_time"] > 0 and q["step_time_with_data_loading"] > 0, name

    inf = result["inference"]
    assert "error" not in inf, inf.get("error")
    for key in ("stock_4ch", "student_t1ce"):
        assert inf[key]["time_median_s"] > 0
    assert inf["stock_4ch"]["input_shape"][0] == 4
    assert inf["student_t1ce"]["input_shape"][0] == 1
    assert inf["student_t1ce"]["channels"] == [1]  # T1ce, found by name
    assert inf["stock_4ch"]["output_shape"] == inf["student_t1ce"]["output_shape"]
    assert inf["ratio_student_to_stock"] > 0

    # nnU-Net does not compile on CPU: its defaults are the eager run, measured once.
    assert result["defaults"] == {"compiled": False, "measured": False, "ratios": ratios}
    assert meta["stock_compiles_by_default"] is False
    assert result["targets"] == result["targets_eager"]
    assert "nothing is compiled on this device" in proc.stdout
    targets = {t["target"]: t for t in result["targets"]}
    assert len(targets) == len(benchmark_report.TARGETS)
    for t in targets.values():
        assert t["status"] in ("PASS", "MISS")
        assert t["value"] > 0


def test_toy_run_cleans_up_nothing_it_was_told_to_keep(toy_run):
    # --work-dir given: the folder is kept (the caller owns it); the trainers' outputs went there.
    _, _, out_dir = toy_run
    assert (out_dir / "work" / "nnUNet_results").is_dir()
    assert (out_dir / "work" / "teachers").is_dir()


def _fake_result(device="cuda"):
    trainers = {
        "nnUNetTrainer": {"step_time_median_s": 0.2, "step_time_with_data_loading_median_s": 0.25,
                          "peak_gpu_memory_mib": 1000.0, "peak_rss_increase_mib": 10.0},
        "nnUNetTrainerMTCMKD": {"step_time_median_s": 0.9, "step_time_with_data_loading_median_s": 0.95,
                                "peak_gpu_memory_mib": 3000.0, "peak_rss_increase_mib": 20.0},
        "nnUNetTrainerMTCMKD_FrozenTeachers": {"step_time_median_s": 0.44,
                                               "step_time_with_data_loading_median_s": 0.5,
                                               "peak_gpu_memory_mib": 1500.0, "peak_rss_increase_mib": 5.0},
    }
    inference = {"stock_4ch": {"time_median_s": 2.0}, "student_t1ce": {"time_median_s": 2.2},
                 "ratio_student_to_stock": 1.1, "tile_step_size": 0.5, "mirror_axes": [0, 1, 2],
                 "case": "/x/BraTS2021_00001", "case_shape": [4, 10, 10, 10], "repeats": 3}
    return trainers, inference


def test_ratios_and_targets():
    trainers, inference = _fake_result()
    ratios = benchmark_report.compute_ratios(trainers)
    assert ratios["nnUNetTrainerMTCMKD"]["step_time"] == pytest.approx(4.5)
    assert ratios["nnUNetTrainerMTCMKD"]["peak_gpu_memory"] == pytest.approx(3.0)
    assert ratios["nnUNetTrainerMTCMKD_FrozenTeachers"]["step_time"] == pytest.approx(2.2)
    targets = {t["trainer"]: t for t in benchmark_report.evaluate_targets(ratios, inference)}
    assert targets["nnUNetTrainerMTCMKD"]["status"] == "MISS"  # 4.5 > 4.3
    assert targets["nnUNetTrainerMTCMKD"]["with_data_loading_status"] == "PASS"  # 3.8
    assert targets["nnUNetTrainerMTCMKD_FrozenTeachers"]["status"] == "MISS"  # 2.2 > 2.1
    assert targets["nnUNetTrainerMGSD"]["status"] == "n/a"  # not run
    assert targets["inference"]["status"] == "MISS"  # 1.1 > 1.05
    inference["ratio_student_to_stock"] = 1.0
    targets = {t["trainer"]: t for t in benchmark_report.evaluate_targets(ratios, inference)}
    assert targets["inference"]["status"] == "PASS"


def test_ratio_ignores_non_numbers():
    ratios = benchmark_report.compute_ratios({"nnUNetTrainer": {"peak_gpu_memory_mib": "n/a"},
                                       "X": {"peak_gpu_memory_mib": "n/a"}})
    assert ratios["X"]["peak_gpu_memory"] is None


def test_table_lists_trainers_errors_and_targets():
    trainers, inference = _fake_result()
    trainers["nnUNetTrainerMGSD"] = {"error": "Traceback ...\ntorch.OutOfMemoryError: CUDA out of memory"}
    ok = {k: v for k, v in trainers.items() if "error" not in v}
    ratios = benchmark_report.compute_ratios(ok)
    result = {"meta": {"device": "cuda", "device_name": "NVIDIA H100", "torch_version": "2", "nnunetv2_version": "2.8.1",
                       "nnUNet_compile": "0", "dataset": "Dataset991_BraTS2021", "configuration": "3d_fullres",
                       "patch_size": [128, 128, 128], "batch_size": 2, "fold": "all", "steps": 50, "warmup": 10,
                       "data_loading_steps": 20, "nnUNet_n_proc_DA": None, "frozen_teachers": "3 unimodal",
                       "toy": False},
              "trainers": trainers, "ratios": ratios, "inference": inference,
              "targets": benchmark_report.evaluate_targets(ratios, inference)}
    table = benchmark_report.format_table(result)
    assert "NVIDIA H100" in table and "[128, 128, 128]" in table
    assert "nnUNetTrainerMGSD" in table and "OutOfMemoryError" in table
    assert "MISS" in table and "4.50" in table
    assert "not representative" not in table


def test_table_reports_ratios_at_nnunet_defaults_beside_eager():
    trainers, inference = _fake_result()
    compiled = {k: dict(v, step_time_median_s=v["step_time_median_s"] / 2) for k, v in trainers.items()}
    compiled["nnUNetTrainer"]["step_time_median_s"] = 0.05  # stock gains more from compiling than the KD trainers
    ratios, ratios_compiled = benchmark_report.compute_ratios(trainers), benchmark_report.compute_ratios(compiled)
    assert ratios_compiled["nnUNetTrainerMTCMKD"]["step_time"] == pytest.approx(9.0)
    result = {"meta": {"device": "cuda", "device_name": "NVIDIA H100", "torch_version": "2", "nnunetv2_version": "2.8.1",
                       "nnUNet_compile": "0 / unset", "dataset": "D", "configuration": "3d_fullres",
                       "patch_size": [128, 128, 128], "batch_size": 2, "fold": "all", "steps": 50, "warmup": 10,
                       "data_loading_steps": 20, "nnUNet_n_proc_DA": None, "frozen_teachers": "-", "toy": False},
              "trainers": trainers, "ratios": ratios, "inference": inference,
              "defaults": {"compiled": True, "measured": True, "trainers": compiled, "ratios": ratios_compiled},
              "targets": benchmark_report.evaluate_targets(ratios_compiled, inference)}
    table = benchmark_report.format_table(result)
    eager_part, defaults_part = table.split("at nnU-Net's defaults (every network compiled")
    assert "4.50" in eager_part and "9.00" in defaults_part.split("inference")[0]
    assert "targets (ratio to stock nnUNetTrainer at nnU-Net's defaults" in table


def test_stock_compile_decision_is_nnunets(monkeypatch):
    import torch

    monkeypatch.setenv("nnUNet_compile", "1")
    assert benchmark_worker.nnunet_compiles(torch.device("cpu")) is False  # nnU-Net never compiles on CPU
    assert benchmark_worker.nnunet_compiles(torch.device("cuda", 0)) is True
    assert os.environ["nnUNet_compile"] == "1"  # the caller's setting is left as it was
    # the defaults setting's process has no nnUNet_compile: nnU-Net's default is to compile on CUDA
    monkeypatch.delenv("nnUNet_compile")
    assert benchmark_worker.nnunet_compiles(torch.device("cuda", 0)) is True
    assert benchmark_worker.nnunet_compiles(torch.device("cpu")) is False


def test_cli_requires_a_data_source(capsys):
    with pytest.raises(SystemExit):
        benchmark_cli._parser().parse_args(["--steps", "2"])
    with pytest.raises(SystemExit):
        benchmark_cli.main(["--toy", "--steps", "0"])


def test_every_option_is_a_setting():
    args = benchmark_cli._parser().parse_args(["--toy", "--teacher-models", "a", "b",
                                               "--trainers", "nnUNetTrainerMGSD"])
    settings = benchmark_cli.settings_from_args(args)
    assert settings.toy and settings.teacher_models == ("a", "b") and settings.trainers == ("nnUNetTrainerMGSD",)
    assert set(vars(args)) - set(dataclasses.asdict(settings)) == {"output"}  # -o is the command's, not the run's


def _preprocessed_dataset(folder):
    """A preprocessed-dataset folder with just the plans and dataset.json the benchmark reads itself."""
    folder.mkdir(parents=True)
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {}, "_kw_requires_import": []}
    plans = {"dataset_name": folder.name, "plans_name": "nnUNetPlans", "configurations": {"3d_fullres": {
        "data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [32, 32, 32], "batch_size": 2,
        "spacing": [1.0, 1.0, 1.0], "architecture": arch}}}
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    channels = {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    (folder / "dataset.json").write_text(json.dumps({"channel_names": channels}))


def test_each_setting_runs_in_its_own_environment_and_ours_is_left_alone(tmp_path, monkeypatch, native_bf16):
    _preprocessed_dataset(tmp_path / "preprocessed" / "Dataset123_X")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    monkeypatch.setenv("nnUNet_compile", "1")
    monkeypatch.delenv(AUTOCAST_ENV, raising=False)
    calls = []

    def fake_worker(request, env, work_dir, name):
        calls.append((name, request, dict(env)))
        trainers = {"nnUNetTrainer": {"step_time_median_s": 0.1}} if request.measure_trainers else {}
        return {"facts": {"device_name": "cpu", "device_memory_gib": None, "torch_num_threads": 1,
                          "nnUNet_n_proc_DA": 1}, "compiles": name == "defaults", "trainers": trainers, "ok": True,
                "inference": None}

    monkeypatch.setattr(benchmark_run, "_run_worker", fake_worker)
    # torch, nnU-Net and blosc2 set variables of their own on first import (KMP_*, TORCHINDUCTOR_CACHE_DIR, ...):
    # import them first, so that only what the benchmark itself does to the environment is compared.
    import blosc2  # noqa: F401
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer  # noqa: F401
    before = dict(os.environ)
    work = tmp_path / "work"
    settings = benchmark_run.BenchmarkSettings(dataset_id="123", trainers=("nnUNetTrainer",), device="cpu",
                                               autocast="bf16", skip_inference=True, work_dir=str(work))
    result, ok = benchmark_run.run_benchmark(settings, ["-d", "123"])
    assert dict(os.environ) == before
    (eager, eager_request, eager_env), (defaults, defaults_request, defaults_env) = calls
    assert (eager, defaults) == ("eager", "defaults")
    assert eager_env["nnUNet_compile"] == "0" and "nnUNet_compile" not in defaults_env
    for env in (eager_env, defaults_env):
        assert env[AUTOCAST_ENV] == "bf16"
        assert env["nnUNet_results"] == str(work / "nnUNet_results")  # never a real results folder
        assert env["nnUNet_preprocessed"] == str(tmp_path / "preprocessed")  # a given dataset is read in place
        assert "nnunet_kd" in env["nnUNet_extTrainer"]
    assert eager_request.stock_as == benchmark_run.STOCK_WITH_CPU_AUTOCAST and not eager_request.inference
    assert defaults_request.only_if_compiled and defaults_request.measure_trainers
    assert ok and result["meta"]["stock_compiles_by_default"] is True
    assert result["defaults"]["measured"]
    assert result["defaults"]["trainers"] == {"nnUNetTrainer": {"step_time_median_s": 0.1}}
    assert result["meta"]["precision"] == "precision: bf16 autocast on the CPU (nnUNet_kd_autocast=bf16)"


def _fake_worker_recording(calls, compiles: bool):
    def fake_worker(request, env, work_dir, name):
        calls.append((name, request))
        trainers = ({t: {"step_time_median_s": 0.1, "peak_rss_increase_mib": 1.0} for t in request.trainers}
                    if request.measure_trainers and (compiles or not request.only_if_compiled) else {})
        return {"facts": {"device_name": "cpu"}, "compiles": compiles, "trainers": trainers, "ok": True,
                "inference": {"ratio_student_to_stock": 1.0} if request.inference else None}
    return fake_worker


def _request(device: str, **changes):
    request = benchmark_worker.MeasureRequest(
        trainers=("nnUNetTrainer", "nnUNetTrainerMGSD", "nnUNetTrainerMTCMKD"), stock_as="nnUNetTrainer",
        plans_file="p.json", dataset_json_file="d.json", configuration="3d_fullres", fold=0, device=device,
        steps=1, warmup=0, data_loading_steps=1, inference=True)
    return dataclasses.replace(request, **changes)


def test_on_the_cpu_each_trainer_is_measured_in_a_process_of_its_own(monkeypatch, tmp_path):
    # Resident memory freed by one trainer would be reused by the next in the same process.
    calls = []
    monkeypatch.setattr(benchmark_run, "_run_worker", _fake_worker_recording(calls, compiles=False))
    merged = benchmark_run._run_setting(_request("cpu"), {}, str(tmp_path), "eager")
    assert [name for name, _ in calls] == ["eager_nnUNetTrainer", "eager_nnUNetTrainerMGSD",
                                           "eager_nnUNetTrainerMTCMKD"]
    assert [r.trainers for _, r in calls] == [("nnUNetTrainer",), ("nnUNetTrainerMGSD",), ("nnUNetTrainerMTCMKD",)]
    assert [r.inference for _, r in calls] == [True, False, False]  # beside stock, whose mirror axes it uses
    assert list(merged["trainers"]) == ["nnUNetTrainer", "nnUNetTrainerMGSD", "nnUNetTrainerMTCMKD"]
    assert merged["inference"] == {"ratio_student_to_stock": 1.0} and merged["ok"]

    # nnU-Net's defaults on the CPU (no compilation): one process asks, nothing is measured twice.
    calls.clear()
    probe = benchmark_run._run_setting(_request("cpu", inference=False, only_if_compiled=True), {}, str(tmp_path),
                                       "defaults")
    assert [name for name, _ in calls] == ["defaults_probe"] and probe["trainers"] == {}


def test_on_a_gpu_the_trainers_share_one_process(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(benchmark_run, "_run_worker", _fake_worker_recording(calls, compiles=True))
    merged = benchmark_run._run_setting(_request("cuda"), {}, str(tmp_path), "eager")
    assert [name for name, _ in calls] == ["eager"] and len(merged["trainers"]) == 3


def test_resident_memory_counts_from_the_given_baseline():
    from nnunet_kd.experiments.benchmark.measure import RSSPeak, _rss_bytes

    baseline = _rss_bytes()
    if baseline is None:
        pytest.skip("no /proc/self/statm here")
    block = bytearray(64 * 1024 * 1024)  # allocated before the window opens, as a trainer's weights are
    block[::4096] = b"x" * len(block[::4096])  # touch every page so it is resident
    with RSSPeak(baseline=baseline) as counted:
        pass
    with RSSPeak() as window_only:
        pass
    assert counted.delta_mib() >= 60
    assert window_only.delta_mib() < 16
    del block
