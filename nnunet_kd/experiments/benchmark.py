"""Training-step, memory and inference cost of the KD trainers relative to stock nnU-Net.

All trainers run in ONE process on one device, one after the other, with the real plans of a
preprocessed nnU-Net dataset (planned patch and batch size):

* compute alone: median ``train_step`` time on one FIXED batch, taken once from the trainer's own
  dataloader after ``on_train_start`` (so data and deep-supervision targets are exactly what nnU-Net
  produces) and kept on the device; ``--warmup`` untimed steps first;
* with data loading: median time of ``next(trainer.dataloader_train)`` + ``train_step``, after the
  batches the augmenter had prefetched during the compute-alone phase were drained;
* peak GPU memory (``torch.cuda.max_memory_allocated``) over the training steps; on CPU the peak
  increase of the resident set size (sampled from /proc) instead;
* inference: ``nnUNetPredictor.predict_sliding_window_return_logits`` on one preprocessed case,
  the one-channel T1ce student vs. a stock four-channel network of the same plans (initial
  weights, the default mirroring and tile step), median of ``--inference-repeats``.

Ratios to ``nnUNetTrainer`` are computed within the run and checked against the targets below.

Examples::

    python -m nnunet_kd.experiments.benchmark --toy --device cpu --steps 2 --warmup 1 --data-loading-steps 1
    python -m nnunet_kd.experiments.benchmark --real-brats /data/BraTS2021_TrainingData -o bench.json
    python -m nnunet_kd.experiments.benchmark --dataset-id 137 -o bench.json     # an already preprocessed dataset

Progress and nnU-Net's own output go to stderr; stdout gets only the result table. The exit code is
1 when a trainer or the inference failed (the error is recorded in the JSON, the others still run).

Notes:

* ``nnUNet_results`` always points into the temporary work folder (trainer logs land there), so a
  real results folder is never touched; ``--toy`` / ``--real-brats`` also put nnUNet_raw and
  nnUNet_preprocessed there. ``--work-dir`` keeps everything in a folder of your choice.
* Two settings: every trainer eagerly (``nnUNet_compile=0``; ``trainers``/``ratios``, eager against
  eager), and every trainer at nnU-Net's defaults (``nnUNet_compile`` unset: compiled exactly where
  ``nnUNetTrainer._do_i_compile`` compiles, i.e. on CUDA; the KD trainers compile all their U-Nets
  then). The ratios at the defaults (``defaults``) are the slowdown a user sees against stock
  nnU-Net, and the targets are checked on them. Where nnU-Net does not compile (CPU) the defaults
  are the eager run and are not measured twice. ``--eager-only`` skips the second setting.
* The frozen-teacher trainer gets three unimodal teacher model folders (T1, T2, FLAIR) written on the
  fly with the stock architecture of these plans and initial weights (``--frozen-teachers
  multimodal``: one four-channel teacher; ``--teacher-models``: real trained models).
* The KD trainers are timed with ``current_epoch = kd_start_epoch`` so all distillation terms run.
* ``--autocast bf16`` times every trainer in bfloat16 autocast on the CPU (``nnUNet_kd_autocast=bf16``); the
  stock row is then nnUNetTrainerBudget (stock nnU-Net with the same autocast), so the ratios stay bf16 against
  bf16. On CUDA it changes nothing (nnU-Net's fp16 autocast).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import traceback
from typing import Any, Dict, Optional, Sequence, Tuple

from nnunet_kd.atomic import make_temp_dir
from nnunet_kd.cli import command
from nnunet_kd.experiments.benchmark_measure import (bench_inference, bench_trainer, find_trainer_class,
                                                     free_device_memory, log, make_frozen_teachers)
from nnunet_kd.experiments.benchmark_report import STOCK, compute_ratios, evaluate_targets, format_table
from nnunet_kd.experiments.datasets import convert_command, plan_command
from nnunet_kd.experiments.runner import CommandFailed, default_device, nnunet_environment, run_command
from nnunet_kd.paths import env_folder, find_dataset_folder
from nnunet_kd.training.precision import (AUTOCAST_CHOICES, autocast_environment, parse_cpu_autocast,
                                          precision_description)

DEFAULT_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerMTCMKD", "nnUNetTrainerMTCMKD_FrozenTeachers", "nnUNetTrainerMGSD")
TOY_DATASET_ID = 990
REAL_BRATS_DATASET_ID = 991
_MIB = 1024.0 ** 2
#: The stock row under --autocast bf16 on the CPU: nnUNetTrainer plus the plugin's CPU autocast, nothing else.
STOCK_WITH_CPU_AUTOCAST = "nnUNetTrainerBudget"


# --------------------------------------------------------------------------- dataset preparation


def _convert_and_preprocess(source: str, dataset_id: int, num_processes: int) -> None:
    """nnunet_kd_convert_brats + nnUNetv2_plan_and_preprocess (3d_fullres) into the current environment's folders."""
    for cmd in (convert_command(source, dataset_id, "-o", os.environ["nnUNet_raw"], "-np", str(num_processes)),
                plan_command(dataset_id, num_processes, "-npfp", str(num_processes), "--no_pbar")):
        log("running: " + " ".join(cmd))
        run_command(cmd, dict(os.environ))


def prepare_toy_dataset(work_dir: str, dataset_id: int) -> None:
    """5 synthetic BraTS 2021 cases (32^3), converted, planned and preprocessed."""
    from nnunet_kd.experiments.synthetic import generate_dataset

    src = os.path.join(work_dir, "toy_source")
    log(f"toy: generating 5 synthetic BraTS 2021 cases (32^3) in {src}")
    generate_dataset(src, 5, shape=(32, 32, 32))
    _convert_and_preprocess(src, dataset_id, 1)


def prepare_real_brats(source: str, dataset_id: int, num_processes: int) -> None:
    """A BraTS release folder, converted, planned and preprocessed (3d_fullres)."""
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--real-brats: {source} is not a folder")
    log(f"real BraTS: converting {source} and planning/preprocessing 3d_fullres (dataset {dataset_id})")
    _convert_and_preprocess(os.path.abspath(source), dataset_id, num_processes)


def dataset_folder(dataset_id: str) -> str:
    """nnUNet_preprocessed/DatasetXXX_NAME for an id or a full dataset name."""
    base = env_folder("nnUNet_preprocessed", "point it at the preprocessed datasets, or use --toy / --real-brats")
    return find_dataset_folder(base, dataset_id, f"nnUNet_preprocessed={base}")


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    """The command's options."""
    p = argparse.ArgumentParser(prog="python -m nnunet_kd.experiments.benchmark",
                                description="Step time, memory and inference cost of the KD trainers vs stock nnU-Net.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset-id", "-d", help="id or name of a dataset preprocessed in $nnUNet_preprocessed")
    src.add_argument("--toy", action="store_true",
                     help="build a tiny synthetic dataset (5 cases, 32^3) in a temporary folder (CI)")
    src.add_argument("--real-brats", metavar="PATH",
                     help="convert a BraTS release folder (e.g. BraTS2021_TrainingData) with "
                          "nnunet_kd_convert_brats and plan/preprocess it (3d_fullres) in a temporary folder")
    p.add_argument("--configuration", "-c", default="3d_fullres")
    p.add_argument("--plans", default="nnUNetPlans", help="plans identifier (default nnUNetPlans)")
    p.add_argument("--fold", default="all", help="fold the trainers are built for (default all: no split file)")
    p.add_argument("--trainers", nargs="+", default=list(DEFAULT_TRAINERS),
                   help=f"trainer classes (default: {' '.join(DEFAULT_TRAINERS)}); {STOCK} is always run first")
    p.add_argument("--steps", type=int, default=50, help="timed training steps, compute alone (default 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed warm-up steps (default 10)")
    p.add_argument("--data-loading-steps", type=int, default=20,
                   help="timed steps including next(dataloader_train) (default 20)")
    p.add_argument("--inference-repeats", type=int, default=3, help="timed sliding-window repeats (default 3)")
    p.add_argument("--inference-case", metavar="PATH_TO_CASE_PREFIX",
                   help="preprocessed case, e.g. $nnUNet_preprocessed/Dataset991_BraTS2021/nnUNetPlans_3d_fullres/"
                        "BraTS2021_00410 (default: the first case of the dataset's preprocessed folder)")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available, else cpu")
    p.add_argument("--frozen-teachers", choices=("unimodal", "multimodal"), default="unimodal",
                   help="teachers built for nnUNetTrainerMTCMKD_FrozenTeachers: 3 unimodal (T1, T2, FLAIR; "
                        "default) or one 4-channel stock model")
    p.add_argument("--teacher-models", nargs="+", metavar="PATH",
                   help="use these trained teacher models for the frozen-teacher trainer instead")
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="none",
                   help="bf16: time the training steps in bfloat16 autocast on the CPU (nnUNet_kd_autocast=bf16); "
                        "default none (fp32; CUDA always uses nnU-Net's fp16 autocast)")
    p.add_argument("--eager-only", action="store_true",
                   help="measure only eagerly (nnUNet_compile=0), not also at nnU-Net's defaults (compiled on CUDA)")
    p.add_argument("--dataset-id-for-conversion", type=int, default=None,
                   help=f"dataset id used by --toy / --real-brats (default {TOY_DATASET_ID} / {REAL_BRATS_DATASET_ID})")
    p.add_argument("--num-processes", type=int, default=4, help="processes for --real-brats preprocessing (default 4)")
    p.add_argument("--work-dir", help="folder for temporary data (default: a new temporary folder, removed at the end)")
    p.add_argument("--keep-work-dir", action="store_true", help="do not remove the temporary folder")
    p.add_argument("-o", "--output", help="write the results as JSON here")
    return p


def run_benchmark(args: argparse.Namespace, argv: Sequence[str]) -> Tuple[Dict[str, Any], bool]:
    """Prepare data, run all measurements; returns (result, all_ok)."""
    work_dir = args.work_dir or make_temp_dir(tempfile.gettempdir(), "nnunet_kd_benchmark_")
    os.makedirs(work_dir, exist_ok=True)
    work_dir = os.path.abspath(work_dir)
    log(f"work dir {work_dir}")
    # Environment first: nnU-Net reads its folders from here; the trainers write their logs to nnUNet_results.
    env = nnunet_environment(work_dir, folder_prefix="nnUNet_")
    folders = ["nnUNet_results"] + (["nnUNet_raw", "nnUNet_preprocessed"] if args.toy or args.real_brats else [])
    for var in folders:
        os.environ[var] = env[var]
        os.makedirs(env[var], exist_ok=True)
    os.environ["nnUNet_extTrainer"] = env["nnUNet_extTrainer"]

    try:
        if args.toy:
            dataset_id = str(args.dataset_id_for_conversion or TOY_DATASET_ID)
            prepare_toy_dataset(work_dir, int(dataset_id))
        elif args.real_brats:
            dataset_id = str(args.dataset_id_for_conversion or REAL_BRATS_DATASET_ID)
            prepare_real_brats(args.real_brats, int(dataset_id), args.num_processes)
        else:
            dataset_id = args.dataset_id
        return _measure(args, argv, work_dir, dataset_id)
    finally:
        if not args.keep_work_dir and not args.work_dir:
            shutil.rmtree(work_dir, ignore_errors=True)
        elif args.keep_work_dir:
            log(f"kept work dir {work_dir}")


def _measure(args, argv, work_dir: str, dataset_id: str) -> Tuple[Dict[str, Any], bool]:
    """Every trainer, then the inference, on the preprocessed dataset ``dataset_id``; (result, all_ok)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    import nnunetv2

    device_type = args.device or default_device()
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch.cuda.is_available() is False")
    device = torch.device(device_type, 0) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        # As nnUNetv2_train does.
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
        torch.set_num_threads(1)
        device_name = torch.cuda.get_device_name(device)
        device_memory_gib = round(torch.cuda.get_device_properties(device).total_memory / 1024 ** 3, 1)
    else:
        device_name = _cpu_name()
        device_memory_gib = None

    folder = dataset_folder(dataset_id)
    plans_file = os.path.join(folder, args.plans + ".json")
    plans = load_json(plans_file)
    dataset_json = load_json(os.path.join(folder, "dataset.json"))
    if args.configuration not in plans["configurations"]:
        raise ValueError(f"configuration {args.configuration} not in {plans_file}")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(plans).get_configuration(args.configuration)
    fold = args.fold if args.fold == "all" else int(args.fold)
    os.environ.update(autocast_environment(args.autocast))  # the trainers, built in this process, read it

    trainers = [STOCK] + [t for t in args.trainers if t != STOCK]
    teacher_desc = None
    if any(getattr(find_trainer_class(t), "freeze_teachers", False) for t in trainers):
        if args.teacher_models:
            os.environ["nnUNet_kd_teachers"] = os.pathsep.join(os.path.abspath(p) for p in args.teacher_models)
            teacher_desc = "given trained models: " + ", ".join(args.teacher_models)
        else:
            axes = list(range(len(cm.patch_size)))
            paths, teacher_desc = make_frozen_teachers(work_dir, plans, dataset_json, args.configuration,
                                                       args.frozen_teachers, axes)
            os.environ["nnUNet_kd_teachers"] = os.pathsep.join(paths)
        log(f"frozen teachers: {teacher_desc}")

    meta = {
        "command_line": shlex.join(["python", "-m", "nnunet_kd.experiments.benchmark"] + list(argv)),
        "sys_argv": list(sys.argv), "cwd": os.getcwd(),
        "environment": {k: os.environ.get(k) for k in ("nnUNet_n_proc_DA", "OMP_NUM_THREADS",
                                                        "CUDA_VISIBLE_DEVICES", "nnUNet_preprocessed")},
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "device": device.type, "device_name": device_name, "device_memory_gib": device_memory_gib,
        "torch_version": torch.__version__, "cuda_version": torch.version.cuda,
        "nnunetv2_version": getattr(nnunetv2, "__version__", None) or _dist_version("nnunetv2"),
        "python_version": platform.python_version(), "hostname": platform.node(),
        "dataset": os.path.basename(folder), "configuration": args.configuration, "plans": args.plans,
        "fold": fold, "patch_size": list(cm.patch_size), "batch_size": int(cm.batch_size),
        "spacing": list(cm.spacing), "network": cm.network_arch_class_name,
        "steps": args.steps, "warmup": args.warmup, "data_loading_steps": args.data_loading_steps,
        "nnUNet_compile": "0 (trainers, ratios); unset (defaults)", "nnUNet_n_proc_DA": _n_proc_da(),
        "stock_compiles_by_default": stock_compiles_by_default(device),
        "torch_num_threads": torch.get_num_threads(), "toy": bool(args.toy), "real_brats": args.real_brats,
        "frozen_teachers": teacher_desc, "autocast": args.autocast,
        "precision": precision_description(device, parse_cpu_autocast(args.autocast)),
        "stock_measured_as": _stock_trainer(args, device),
        "kd_active": "KD trainers are timed with current_epoch = kd_start_epoch, i.e. with all distillation terms",
        "cpu_memory_note": "on CPU peak_rss_increase_mib is the rise of the process's resident memory during the "
                           "steps; memory freed by an earlier trainer and reused shows as no increase",
        "compute_alone": "one real batch from the trainer's dataloader, kept on the device, reused for every step",
    }
    result: Dict[str, Any] = {"meta": meta, "trainers": {}, "ratios": {}, "inference": None, "targets": []}
    os.environ["nnUNet_compile"] = "0"
    result["trainers"], ok, mirror_axes = _bench_trainers(trainers, plans_file, dataset_json, args, fold, device)
    os.environ.pop("nnUNet_compile")
    defaults: Dict[str, Any] = {"compiled": meta["stock_compiles_by_default"], "measured": False}
    if defaults["compiled"] and not args.eager_only:
        defaults["trainers"], ok_defaults, _ = _bench_trainers(trainers, plans_file, dataset_json, args, fold, device)
        defaults["measured"], ok = True, ok and ok_defaults
    if not args.skip_inference:
        log("=== inference")
        try:
            result["inference"] = bench_inference(plans_file, dataset_json, args.configuration, device,
                                                  args.inference_case, args.inference_repeats, mirror_axes)
        except Exception:  # noqa: BLE001
            ok = False
            tb = traceback.format_exc()
            log(f"inference FAILED:\n{tb}")
            result["inference"] = {"error": tb}
    result["ratios"] = compute_ratios({k: v for k, v in result["trainers"].items() if "error" not in v})
    if defaults["measured"]:
        defaults["ratios"] = compute_ratios({k: v for k, v in defaults["trainers"].items() if "error" not in v})
    elif not defaults["compiled"]:  # nnU-Net does not compile here: its defaults are the eager run
        defaults["ratios"] = result["ratios"]
    result["defaults"] = defaults
    result["targets_eager"] = evaluate_targets(result["ratios"], result["inference"])
    result["targets"] = (evaluate_targets(defaults["ratios"], result["inference"]) if "ratios" in defaults
                         else result["targets_eager"])
    return result, ok


def stock_compiles_by_default(device) -> bool:
    """nnU-Net's own decision (``nnUNetTrainer._do_i_compile``) for this device with nnUNet_compile unset."""
    from types import SimpleNamespace

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    saved = os.environ.pop("nnUNet_compile", None)
    try:
        return bool(nnUNetTrainer._do_i_compile(SimpleNamespace(device=device, print_to_log_file=log)))
    finally:
        if saved is not None:
            os.environ["nnUNet_compile"] = saved


def _stock_trainer(args, device) -> str:
    """The trainer measured as the stock row: with --autocast bf16 on the CPU, stock nnU-Net needs the plugin's
    autocast too (nnUNetTrainer has none there)."""
    cpu_autocast = device.type == "cpu" and parse_cpu_autocast(args.autocast) is not None
    return STOCK_WITH_CPU_AUTOCAST if cpu_autocast else STOCK


def _bench_trainers(trainers, plans_file: str, dataset_json: dict, args, fold, device):
    """Each trainer in turn under the current nnUNet_compile; (results by trainer, all_ok, stock mirror axes)."""
    import torch

    results: Dict[str, Any] = {}
    ok, mirror_axes = True, None
    for name in trainers:
        log(f"=== {name} (nnUNet_compile={os.environ.get('nnUNet_compile', 'unset')})")
        try:
            measured = _stock_trainer(args, device) if name == STOCK else name
            r = bench_trainer(measured, plans_file, dataset_json, args.configuration, fold, device,
                              args.steps, args.warmup, args.data_loading_steps)
            if name == STOCK:
                mirror_axes = r.get("inference_allowed_mirroring_axes")
        except Exception:  # noqa: BLE001 - report and go on with the other trainers
            ok = False
            tb = traceback.format_exc()
            log(f"{name} FAILED:\n{tb}")
            r = {"error": tb}
        free_device_memory(device)
        if device.type == "cuda":
            # Should be ~0: anything left here would inflate the next trainer's peak memory.
            r["memory_allocated_after_cleanup_mib"] = round(torch.cuda.memory_allocated(device) / _MIB, 1)
        results[name] = r
    return results, ok, mirror_axes


def _n_proc_da() -> Optional[int]:
    """Data-augmentation worker processes nnU-Net uses here (nnUNet_n_proc_DA or its hostname table)."""
    try:
        from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

        return int(get_allowed_n_proc_DA())
    except Exception:  # noqa: BLE001
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _dist_version(name: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


@contextlib.contextmanager
def _stdout_to_stderr():
    """Send everything written to fd 1 (nnU-Net's prints, worker processes) to stderr; yield the real stdout."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    real = os.fdopen(os.dup(saved), "w")
    try:
        yield real
    finally:
        sys.stdout.flush()
        real.close()
        os.dup2(saved, 1)
        os.close(saved)


@command(ValueError, CommandFailed)
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nnunet_kd_benchmark``: run the measurements, print the table; exit 1 when a trainer or the inference failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    for opt in ("steps", "data_loading_steps", "inference_repeats"):
        if getattr(args, opt) < 1:
            _parser().error(f"--{opt.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        _parser().error("--warmup must be >= 0")
    with _stdout_to_stderr() as out:
        result, ok = run_benchmark(args, argv)
        table = format_table(result)
        print(table, file=out, flush=True)
        if args.output:
            folder = os.path.dirname(os.path.abspath(args.output))
            os.makedirs(folder, exist_ok=True)
            with open(args.output, "w") as f:
                json.dump(result, f, indent=2, default=str)
            log(f"wrote {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
