"""The benchmark's run: prepare the data, measure each setting in its own process, put the result together.

:func:`run_benchmark` takes a :class:`BenchmarkSettings` (``nnunet_kd_benchmark`` builds one from its options in
:mod:`nnunet_kd.experiments.benchmark.cli`). Every setting the measurement needs from the environment goes to
the subprocesses in an environment of their own; this process's ``os.environ`` is never changed.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from nnunet_kd.atomic import make_temp_dir
from nnunet_kd.experiments.benchmark.measure import find_trainer_class, log, make_frozen_teachers
from nnunet_kd.experiments.benchmark.report import STOCK, compute_ratios, evaluate_targets
from nnunet_kd.experiments.benchmark.worker import MeasureRequest, write_request
from nnunet_kd.experiments.datasets import convert_command, plan_command
from nnunet_kd.experiments.runner import default_device, nnunet_environment, python_module_command, run_command
from nnunet_kd.paths import find_dataset_folder, with_trainer_path
from nnunet_kd.training.precision import (autocast_environment, parse_cpu_autocast, precision_description,
                                         require_native_cpu_bf16)

DEFAULT_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerMTCMKD", "nnUNetTrainerMTCMKD_FrozenTeachers", "nnUNetTrainerMGSD")
TOY_DATASET_ID = 990
REAL_BRATS_DATASET_ID = 991
#: The stock row under --autocast bf16 on the CPU: nnUNetTrainer plus the plugin's CPU autocast, nothing else.
STOCK_WITH_CPU_AUTOCAST = "nnUNetTrainerBudget"


@dataclass(frozen=True)
class BenchmarkSettings:
    """What to measure and on which data (the options of ``nnunet_kd_benchmark``, same names and defaults).

    The data: exactly one of ``dataset_id`` (preprocessed in ``$nnUNet_preprocessed``), ``toy`` or
    ``real_brats`` (a BraTS release folder, converted and preprocessed in the work folder).
    """

    dataset_id: Optional[str] = None
    toy: bool = False
    real_brats: Optional[str] = None
    configuration: str = "3d_fullres"
    plans: str = "nnUNetPlans"
    #: ``all`` or a fold number.
    fold: str = "all"
    trainers: Tuple[str, ...] = DEFAULT_TRAINERS
    steps: int = 50
    warmup: int = 10
    data_loading_steps: int = 20
    inference_repeats: int = 3
    inference_case: Optional[str] = None
    skip_inference: bool = False
    #: ``cpu``, ``cuda`` or None (cuda if available).
    device: Optional[str] = None
    frozen_teachers: str = "unimodal"
    teacher_models: Optional[Tuple[str, ...]] = None
    autocast: str = "none"
    eager_only: bool = False
    dataset_id_for_conversion: Optional[int] = None
    num_processes: int = 4
    #: None: a new temporary folder, removed at the end.
    work_dir: Optional[str] = None
    keep_work_dir: bool = False


# --------------------------------------------------------------------------- dataset preparation


def _convert_and_preprocess(source: str, dataset_id: int, num_processes: int, env: Mapping[str, str]) -> None:
    """nnunet_kd_convert_brats + nnUNetv2_plan_and_preprocess (3d_fullres) into the folders ``env`` names."""
    for cmd in (convert_command(source, dataset_id, "-o", env["nnUNet_raw"], "-np", str(num_processes)),
                plan_command(dataset_id, num_processes, "-npfp", str(num_processes), "--no_pbar")):
        log("running: " + " ".join(cmd))
        run_command(cmd, dict(env))


def prepare_toy_dataset(work_dir: str, dataset_id: int, env: Mapping[str, str]) -> None:
    """5 synthetic BraTS 2021 cases (32^3), converted, planned and preprocessed."""
    from nnunet_kd.experiments.synthetic import generate_dataset

    src = os.path.join(work_dir, "toy_source")
    log(f"toy: generating 5 synthetic BraTS 2021 cases (32^3) in {src}")
    generate_dataset(src, 5, shape=(32, 32, 32))
    _convert_and_preprocess(src, dataset_id, 1, env)


def prepare_real_brats(source: str, dataset_id: int, num_processes: int, env: Mapping[str, str]) -> None:
    """A BraTS release folder, converted, planned and preprocessed (3d_fullres)."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--real-brats: {source} is not a folder")
    log(f"real BraTS: converting {source} and planning/preprocessing 3d_fullres (dataset {dataset_id})")
    _convert_and_preprocess(os.path.abspath(source), dataset_id, num_processes, env)


def dataset_folder(dataset_id: str, env: Mapping[str, str]) -> str:
    """``env``'s nnUNet_preprocessed/DatasetXXX_NAME for an id or a full dataset name."""
    base = env.get("nnUNet_preprocessed")
    if not base:
        raise ValueError("nnUNet_preprocessed is not set; point it at the preprocessed datasets, or use --toy / "
                         "--real-brats")
    if not os.path.isdir(base):
        raise ValueError(f"nnUNet_preprocessed={base!r} is not a folder")
    return find_dataset_folder(base, dataset_id, f"nnUNet_preprocessed={base}")


# --------------------------------------------------------------------------- the run


def benchmark_environment(work_dir: str, own_data: bool) -> Dict[str, str]:
    """This process's environment plus what the measurement needs: nnUNet_results in ``work_dir`` (trainer logs
    land there, never in a real results folder), with ``own_data`` (--toy, --real-brats) nnUNet_raw and
    nnUNet_preprocessed too, and the plugin's trainers on nnUNet_extTrainer. The folders are created."""
    folders = nnunet_environment(work_dir, folder_prefix="nnUNet_")
    own = ["nnUNet_results"] + (["nnUNet_raw", "nnUNet_preprocessed"] if own_data else [])
    env = {**with_trainer_path(), **{var: folders[var] for var in own}}
    for var in own:
        os.makedirs(env[var], exist_ok=True)
    return env


def run_benchmark(settings: BenchmarkSettings, argv: Sequence[str] = ()) -> Tuple[Dict[str, Any], bool]:
    """Prepare the data and run all measurements; returns (result, all_ok). ``argv``: the command line's
    options, recorded in the result."""
    if parse_cpu_autocast(settings.autocast) is not None and (settings.device or default_device()) == "cpu":
        require_native_cpu_bf16(f"--autocast {settings.autocast}", "Use --autocast none (float32) on this CPU.")
    work_dir = settings.work_dir or make_temp_dir(tempfile.gettempdir(), "nnunet_kd_benchmark_")
    os.makedirs(work_dir, exist_ok=True)
    work_dir = os.path.abspath(work_dir)
    log(f"work dir {work_dir}")
    env = benchmark_environment(work_dir, settings.toy or bool(settings.real_brats))
    try:
        if settings.toy:
            dataset_id = str(settings.dataset_id_for_conversion or TOY_DATASET_ID)
            prepare_toy_dataset(work_dir, int(dataset_id), env)
        elif settings.real_brats:
            dataset_id = str(settings.dataset_id_for_conversion or REAL_BRATS_DATASET_ID)
            prepare_real_brats(settings.real_brats, int(dataset_id), settings.num_processes, env)
        else:
            dataset_id = str(settings.dataset_id)
        return _measure(settings, argv, work_dir, dataset_id, env)
    finally:
        if not settings.keep_work_dir and not settings.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif settings.keep_work_dir:
            log(f"kept work dir {work_dir}")


def stock_trainer(autocast: str, device_type: str) -> str:
    """The trainer measured as the stock row: with --autocast bf16 on the CPU, stock nnU-Net needs the plugin's
    autocast too (nnUNetTrainer has none there)."""
    cpu_autocast = device_type == "cpu" and parse_cpu_autocast(autocast) is not None
    return STOCK_WITH_CPU_AUTOCAST if cpu_autocast else STOCK


def _teachers(settings: BenchmarkSettings, trainers: Sequence[str], work_dir: str, plans: dict, dataset_json: dict,
              spatial_dims: int) -> Tuple[Dict[str, str], Optional[str]]:
    """The frozen-teacher trainer's teachers, if a trainer freezes them: (its environment, a description)."""
    if not any(getattr(find_trainer_class(t), "freeze_teachers", False) for t in trainers):
        return {}, None
    if settings.teacher_models:
        paths = [os.path.abspath(p) for p in settings.teacher_models]
        desc = "given trained models: " + ", ".join(settings.teacher_models)
    else:
        paths, desc = make_frozen_teachers(work_dir, plans, dataset_json, settings.configuration,
                                           settings.frozen_teachers, list(range(spatial_dims)))
    log(f"frozen teachers: {desc}")
    return {"nnUNet_kd_teachers": os.pathsep.join(paths)}, desc


def _run_worker(request: MeasureRequest, env: Mapping[str, str], work_dir: str, name: str) -> Dict[str, Any]:
    """One setting measured in its own process (:mod:`~nnunet_kd.experiments.benchmark.worker`) under ``env``."""
    request_file = os.path.join(work_dir, f"measure_{name}_request.json")
    result_file = os.path.join(work_dir, f"measure_{name}_result.json")
    write_request(request, request_file)
    run_command(python_module_command("nnunet_kd.experiments.benchmark.worker", request_file, result_file),
                dict(env))
    with open(result_file) as f:
        return json.load(f)


def _run_setting(request: MeasureRequest, env: Mapping[str, str], work_dir: str, name: str) -> Dict[str, Any]:
    """One setting: on a GPU every trainer in one process (its peak memory is reset per trainer); on the CPU each
    trainer in a process of its own, since resident memory that one trainer freed would be reused by the next
    and hide the later trainers' memory. Merged into the worker's result form (the inference runs beside stock,
    whose mirror axes it uses). A setting measured only where nnU-Net compiles asks one process first."""
    if request.device == "cuda" or len(request.trainers) <= 1 or not request.measure_trainers:
        return _run_worker(request, env, work_dir, name)
    if request.only_if_compiled:
        probe = _run_worker(replace(request, measure_trainers=False), env, work_dir, f"{name}_probe")
        if not probe["compiles"]:
            return probe
        request = replace(request, only_if_compiled=False)
    runs = [_run_worker(replace(request, trainers=(trainer,), inference=request.inference and trainer == STOCK),
                        env, work_dir, f"{name}_{trainer}") for trainer in request.trainers]
    merged = dict(runs[0], trainers={}, ok=all(r["ok"] for r in runs), inference=None)
    for run in runs:
        merged["trainers"].update(run["trainers"])
        merged["inference"] = merged["inference"] or run["inference"]
    return merged


def _measure(settings: BenchmarkSettings, argv: Sequence[str], work_dir: str, dataset_id: str,
             env: Dict[str, str]) -> Tuple[Dict[str, Any], bool]:
    """Every trainer, then the inference, on the preprocessed dataset ``dataset_id``; (result, all_ok).

    Two settings, each in a process of its own: every trainer eagerly (``nnUNet_compile=0``) plus the inference,
    then every trainer at nnU-Net's defaults (``nnUNet_compile`` unset), measured only where nnU-Net compiles.
    """
    import nnunetv2
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    device_type = settings.device or default_device()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False")
    folder = dataset_folder(dataset_id, env)
    plans_file = os.path.join(folder, settings.plans + ".json")
    plans = load_json(plans_file)
    dataset_json = load_json(os.path.join(folder, "dataset.json"))
    if settings.configuration not in plans["configurations"]:
        raise ValueError(f"configuration {settings.configuration} not in {plans_file}")
    cm = PlansManager(plans).get_configuration(settings.configuration)
    fold = settings.fold if settings.fold == "all" else int(settings.fold)

    trainers = (STOCK,) + tuple(t for t in settings.trainers if t != STOCK)
    teacher_env, teacher_desc = _teachers(settings, trainers, work_dir, plans, dataset_json, len(cm.patch_size))
    env = {**env, **autocast_environment(settings.autocast), **teacher_env}  # the trainers read these
    stock_as = stock_trainer(settings.autocast, device_type)
    eager_request = MeasureRequest(
        trainers=trainers, stock_as=stock_as, plans_file=plans_file,
        dataset_json_file=os.path.join(folder, "dataset.json"), configuration=settings.configuration, fold=fold,
        device=device_type, steps=settings.steps, warmup=settings.warmup,
        data_loading_steps=settings.data_loading_steps, inference=not settings.skip_inference,
        inference_case=settings.inference_case, inference_repeats=settings.inference_repeats)
    eager_env = {**env, "nnUNet_compile": "0"}
    eager = _run_setting(eager_request, eager_env, work_dir, "eager")
    defaults_request = replace(eager_request, measure_trainers=not settings.eager_only, only_if_compiled=True,
                               inference=False)
    defaults_run = _run_setting(defaults_request, {k: v for k, v in env.items() if k != "nnUNet_compile"}, work_dir,
                               "defaults")
    ok = eager["ok"] and defaults_run["ok"]

    facts = eager["facts"]
    meta = {
        "command_line": shlex.join(["python", "-m", "nnunet_kd.experiments.benchmark"] + list(argv)),
        "sys_argv": list(sys.argv), "cwd": os.getcwd(),
        "environment": {k: eager_env.get(k) for k in ("nnUNet_n_proc_DA", "OMP_NUM_THREADS",
                                                       "CUDA_VISIBLE_DEVICES", "nnUNet_preprocessed")},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device_type, "device_name": facts["device_name"], "device_memory_gib": facts["device_memory_gib"],
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "nnunetv2_version": getattr(nnunetv2, "__version__", None) or _dist_version("nnunetv2"),
        "python_version": platform.python_version(), "hostname": platform.node(),
        "dataset": os.path.basename(folder), "configuration": settings.configuration, "plans": settings.plans,
        "fold": fold, "patch_size": list(cm.patch_size), "batch_size": int(cm.batch_size),
        "spacing": list(cm.spacing), "network": cm.network_arch_class_name,
        "steps": settings.steps, "warmup": settings.warmup, "data_loading_steps": settings.data_loading_steps,
        "nnUNet_compile": "0 (trainers, ratios); unset (defaults)", "nnUNet_n_proc_DA": facts["nnUNet_n_proc_DA"],
        "stock_compiles_by_default": defaults_run["compiles"],
        "torch_num_threads": facts["torch_num_threads"], "toy": bool(settings.toy), "real_brats": settings.real_brats,
        "frozen_teachers": teacher_desc, "autocast": settings.autocast,
        "precision": precision_description(torch.device(device_type), parse_cpu_autocast(settings.autocast), env),
        "stock_measured_as": stock_as,
        "kd_active": "KD trainers are timed with current_epoch = kd_start_epoch, i.e. with all distillation terms",
        "cpu_memory_note": "on CPU peak_rss_increase_mib is the rise of the process's resident memory from before "
                           "the trainer was built to the peak of its steps (weights, optimiser state, teachers, "
                           "activations), each trainer in a process of its own",
        "compute_alone": "one real batch from the trainer's dataloader, kept on the device, reused for every step",
    }
    result: Dict[str, Any] = {"meta": meta, "trainers": eager["trainers"], "ratios": {},
                              "inference": eager["inference"], "targets": []}
    defaults: Dict[str, Any] = {"compiled": defaults_run["compiles"],
                                "measured": defaults_run["compiles"] and not settings.eager_only}
    result["ratios"] = compute_ratios({k: v for k, v in result["trainers"].items() if "error" not in v})
    if defaults["measured"]:
        defaults["trainers"] = defaults_run["trainers"]
        defaults["ratios"] = compute_ratios({k: v for k, v in defaults["trainers"].items() if "error" not in v})
    elif not defaults["compiled"]:  # nnU-Net does not compile here: its defaults are the eager run
        defaults["ratios"] = result["ratios"]
    result["defaults"] = defaults
    result["targets_eager"] = evaluate_targets(result["ratios"], result["inference"])
    result["targets"] = (evaluate_targets(defaults["ratios"], result["inference"]) if "ratios" in defaults
                         else result["targets_eager"])
    return result, ok


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None
