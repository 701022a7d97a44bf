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

    python -m nnunet_kd.benchmark --toy --device cpu --steps 2 --warmup 1 --data-loading-steps 1
    python -m nnunet_kd.benchmark --real-brats ../shared/data/BraTS2021_sample -o bench.json
    python -m nnunet_kd.benchmark --dataset-id 137 -o bench.json     # an already preprocessed dataset

Progress and nnU-Net's own output go to stderr; stdout gets only the result table. The exit code is
1 when a trainer or the inference failed (the error is recorded in the JSON, the others still run).

Notes:

* ``nnUNet_results`` always points into the temporary work folder (trainer logs land there), so a
  real results folder is never touched; ``--toy`` / ``--real-brats`` also put nnUNet_raw and
  nnUNet_preprocessed there. ``--work-dir`` keeps everything in a folder of your choice.
* torch.compile is off unless ``--compile`` or ``nnUNet_compile`` in the environment says otherwise
  (stock nnU-Net compiles by default on CUDA); the JSON records the setting.
* The frozen-teacher trainer gets three unimodal teacher model folders (T1, T2, FLAIR) written on the
  fly with the stock architecture of these plans and initial weights (``--frozen-teachers
  multimodal``: one four-channel teacher; ``--teacher-models``: real trained models).
* The KD trainers are timed with ``current_epoch = kd_start_epoch`` so all distillation terms run.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import glob
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

STOCK = "nnUNetTrainer"
DEFAULT_TRAINERS = ("nnUNetTrainer", "nnUNetTrainerMTCMKD", "nnUNetTrainerMTCMKD_FrozenTeachers", "nnUNetTrainerMGSD")
TOY_DATASET_ID = 990
REAL_BRATS_DATASET_ID = 991
STUDENT_MODALITY = "T1ce"

#: (label, trainer, metric, upper limit of the ratio to the stock trainer / stock network).
TARGETS: Tuple[Tuple[str, str, str, float], ...] = (
    ("MTCM-KD online step", "nnUNetTrainerMTCMKD", "step_time", 4.3),
    ("MTCM-KD frozen-teacher step", "nnUNetTrainerMTCMKD_FrozenTeachers", "step_time", 2.1),
    ("MGSD step", "nnUNetTrainerMGSD", "step_time", 2.5),
    ("T1ce student inference", "inference", "inference_time", 1.05),
)

_MIB = 1024.0 ** 2


def log(msg: str) -> None:
    print(f"[benchmark {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- dataset preparation


def _run(cmd: Sequence[str], env: Dict[str, str]) -> None:
    log("running: " + " ".join(cmd))
    sys.stdout.flush()
    sys.stderr.flush()
    result = subprocess.run(list(cmd), env=env, stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno())
    if result.returncode != 0:
        raise RuntimeError(f"command failed with exit code {result.returncode}: {' '.join(cmd)}")


def _convert_and_preprocess(source: str, dataset_id: int, raw: str, num_processes: int) -> None:
    """nnunet_kd_convert_brats + nnUNetv2_plan_and_preprocess (3d_fullres) into the current environment's folders."""
    env = dict(os.environ)
    _run([sys.executable, "-m", "nnunet_kd.convert_brats", "-i", source, "-d", str(dataset_id), "-o", raw,
          "-np", str(num_processes)], env)
    _run([sys.executable, "-m", "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints",
          "-d", str(dataset_id), "-c", "3d_fullres", "-np", str(num_processes), "-npfp", str(num_processes),
          "--no_pbar"], env)


def prepare_toy_dataset(work_dir: str, dataset_id: int) -> None:
    from nnunet_kd.synthetic import generate_dataset

    src = os.path.join(work_dir, "toy_source")
    log(f"toy: generating 5 synthetic BraTS 2021 cases (32^3) in {src}")
    generate_dataset(src, 5, shape=(32, 32, 32))
    _convert_and_preprocess(src, dataset_id, os.environ["nnUNet_raw"], 1)


def prepare_real_brats(source: str, dataset_id: int, num_processes: int) -> None:
    if not os.path.isdir(source):
        raise FileNotFoundError(f"--real-brats: {source} is not a folder")
    log(f"real BraTS: converting {source} and planning/preprocessing 3d_fullres (dataset {dataset_id})")
    _convert_and_preprocess(os.path.abspath(source), dataset_id, os.environ["nnUNet_raw"], num_processes)


def dataset_folder(dataset_id: str) -> str:
    """nnUNet_preprocessed/DatasetXXX_NAME for an id or a full dataset name."""
    base = os.environ.get("nnUNet_preprocessed")
    if not base:
        raise RuntimeError("nnUNet_preprocessed is not set: point it at the preprocessed datasets, or use --toy / "
                           "--real-brats")
    if str(dataset_id).startswith("Dataset"):
        folder = os.path.join(base, str(dataset_id))
        if os.path.isdir(folder):
            return folder
        raise FileNotFoundError(f"{folder} does not exist")
    matches = sorted(glob.glob(os.path.join(base, f"Dataset{int(dataset_id):03d}_*")))
    if len(matches) != 1:
        raise FileNotFoundError(f"expected one preprocessed dataset Dataset{int(dataset_id):03d}_* in {base}, "
                                f"found {len(matches)}")
    return matches[0]


# --------------------------------------------------------------------------- measuring helpers


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _median(values: Sequence[float]) -> Optional[float]:
    return float(statistics.median(values)) if values else None


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class RSSPeak:
    """Peak resident set size of this process while active (sampled every few ms from /proc).

    Falls back to the increase of ``ru_maxrss`` (process high-water mark) where /proc is unavailable."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start = self.peak = None
        self._stop = threading.Event()
        self._thread = None
        self._maxrss0 = 0

    def __enter__(self):
        self.start = _rss_bytes()
        self._maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if self.start is not None:
            self.peak = self.start
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            value = _rss_bytes()
            if value is not None and value > self.peak:
                self.peak = value
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            value = _rss_bytes()
            if value is not None:
                self.peak = max(self.peak, value)

    def delta_mib(self) -> Optional[float]:
        if self.start is not None:
            return round((self.peak - self.start) / _MIB, 1)
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss0
        return round(grown_kib / 1024.0, 1)


def _to_device(batch: dict, device) -> dict:
    out = dict(batch)
    out["data"] = batch["data"].to(device)
    target = batch["target"]
    out["target"] = [t.to(device) for t in target] if isinstance(target, (list, tuple)) else target.to(device)
    return out


def _time_steps(fn: Callable[[], Any], n: int, device) -> List[float]:
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _shutdown_dataloaders(trainer) -> None:
    for name in ("dataloader_train", "dataloader_val"):
        dl = getattr(trainer, name, None)
        if dl is not None and hasattr(dl, "_finish"):
            try:
                dl._finish()
            except Exception as e:  # noqa: BLE001 - best effort clean-up
                log(f"warning: could not shut down {name}: {e}")
        setattr(trainer, name, None)


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- trainers


def find_trainer_class(name: str):
    import importlib

    for module in ("nnunetv2.training.nnUNetTrainer.nnUNetTrainer", "nnunet_kd.trainers.nnUNetTrainerMTCMKD",
                   "nnunet_kd.trainers.nnUNetTrainerMGSD", "nnunet_kd.trainers.nnUNetTrainerBudget"):
        cls = getattr(importlib.import_module(module), name, None)
        if cls is not None:
            return cls
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    import nnunetv2

    cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"), name,
                                      "nnunetv2.training.nnUNetTrainer")
    if cls is None:
        raise ValueError(f"trainer class {name} not found in nnunetv2 or nnunet_kd.trainers")
    return cls


def make_frozen_teachers(work_dir: str, plans: dict, dataset_json: dict, configuration: str, kind: str,
                         mirror_axes) -> Tuple[List[str], str]:
    """Teacher model folders (plans.json, dataset.json, fold_all/checkpoint_final.pth) holding stock nnU-Net
    networks of these plans with their initial (random) weights: exactly what a trained teacher costs."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_kd.brats import channel_indices
    from nnunet_kd.model_folder import subset_dataset_json, subset_plans

    names = dataset_json["channel_names"]
    groups = [["T1"], ["T2"], ["FLAIR"]] if kind == "unimodal" else [["T1", "T1ce", "T2", "FLAIR"]]
    paths = []
    for mods in groups:
        channels = channel_indices(names, mods)
        model_dir = os.path.join(work_dir, "teachers", f"teacher_{'+'.join(mods)}")
        fold_dir = os.path.join(model_dir, "fold_all")
        os.makedirs(fold_dir, exist_ok=True)
        sub_plans = subset_plans(plans, channels)
        sub_json = subset_dataset_json(dataset_json, channels)
        with open(os.path.join(model_dir, "plans.json"), "w") as f:
            json.dump(sub_plans, f, indent=2)
        with open(os.path.join(model_dir, "dataset.json"), "w") as f:
            json.dump(sub_json, f, indent=2)
        pm = PlansManager(sub_plans)
        cm = pm.get_configuration(configuration)
        net = nnUNetTrainer.build_network_architecture(pm, cm, len(channels),
                                                       pm.get_label_manager(sub_json).num_segmentation_heads, False)
        torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": configuration, "fold": "all"}, "current_epoch": 1,
                    "inference_allowed_mirroring_axes": mirror_axes},
                   os.path.join(fold_dir, "checkpoint_final.pth"))
        paths.append(model_dir)
    desc = ("3 unimodal stock nnU-Net teachers (T1, T2, FLAIR)" if kind == "unimodal"
            else "1 stock 4-channel nnU-Net teacher (T1, T1ce, T2, FLAIR)")
    return paths, desc + ", planned like this dataset, initial weights (weights do not change the cost)"


def bench_trainer(name: str, plans_file: str, dataset_json: dict, configuration: str, fold, device,
                  steps: int, warmup: int, dl_steps: int) -> Dict[str, Any]:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    cls = find_trainer_class(name)
    plans = load_json(plans_file)
    plans["continue_training"] = False
    res: Dict[str, Any] = {"class": f"{cls.__module__}.{cls.__name__}"}
    t0 = time.perf_counter()
    trainer = cls(plans=plans, configuration=configuration, fold=fold, dataset_json=json.loads(json.dumps(dataset_json)),
                  device=device)
    try:
        trainer.initialize()
        trainer.on_train_start()
        trainer.on_train_epoch_start()
        if hasattr(trainer, "kd_start_epoch"):
            # The distillation terms start after epoch 0: time the steady-state step with them on.
            trainer.current_epoch = max(trainer.current_epoch, int(trainer.kd_start_epoch))
        res["setup_time_s"] = round(time.perf_counter() - t0, 2)
        res["batch_size"] = int(trainer.batch_size)
        res["num_parameters_trainable"] = int(sum(
            p.numel() for opt in _optimizers(trainer) for g in opt.param_groups for p in g["params"]))
        res["inference_allowed_mirroring_axes"] = ([int(a) for a in trainer.inference_allowed_mirroring_axes]
                                                   if trainer.inference_allowed_mirroring_axes is not None else None)
        batch = _to_device(next(trainer.dataloader_train), device)
        res["batch_data_shape"] = list(batch["data"].shape)
        log(f"{name}: set up in {res['setup_time_s']} s, batch {res['batch_data_shape']}; "
            f"{warmup} warm-up + {steps} timed steps (compute alone)")

        if device.type == "cuda":
            torch.cuda.synchronize(device)
            res["memory_allocated_before_mib"] = round(torch.cuda.memory_allocated(device) / _MIB, 1)
            torch.cuda.reset_peak_memory_stats(device)
        with RSSPeak() as rss:
            losses = []
            for _ in range(warmup):
                losses.append(trainer.train_step(batch)["loss"])
            times = _time_steps(lambda: losses.append(trainer.train_step(batch)["loss"]), steps, device)
            res["step_times_s"] = [round(t, 5) for t in times]
            res["step_time_median_s"] = _median(times)
            res["step_time_mean_s"] = float(sum(times) / len(times)) if times else None
            if device.type == "cuda":
                res["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / _MIB, 1)
                res["peak_gpu_memory_reserved_mib"] = round(torch.cuda.max_memory_reserved(device) / _MIB, 1)
            else:
                res["peak_gpu_memory_mib"] = "n/a"
            res["final_loss"] = float(losses[-1]) if losses else None

            # With nnU-Net's data loading. Drain the batches the augmenter prefetched meanwhile, so the timed
            # steps see the pipeline's steady state rather than a full cache.
            dl = trainer.dataloader_train
            drain = int(getattr(dl, "num_cached", 0) or 0) + int(getattr(dl, "num_processes", 0) or 0)
            for _ in range(drain):
                next(dl)
            res["data_loading_drained_batches"] = drain
            log(f"{name}: compute-alone median {res['step_time_median_s']:.4f} s; {dl_steps} steps with data "
                f"loading (drained {drain} prefetched batches)")
            waits: List[float] = []

            def step_with_loading():
                _sync(device)
                t = time.perf_counter()
                b = next(dl)
                waits.append(time.perf_counter() - t)
                trainer.train_step(b)

            dl_times = _time_steps(step_with_loading, dl_steps, device)
        res["step_times_with_data_loading_s"] = [round(t, 5) for t in dl_times]
        res["step_time_with_data_loading_median_s"] = _median(dl_times)
        res["data_loading_wait_median_s"] = _median(waits)
        res["peak_rss_increase_mib"] = rss.delta_mib()
        if device.type == "cuda":
            res["peak_gpu_memory_incl_data_loading_mib"] = round(torch.cuda.max_memory_allocated(device) / _MIB, 1)
        res["loss_finite"] = bool(all(map(lambda v: float(v) == float(v) and abs(float(v)) != float("inf"),
                                          losses)))
    finally:
        _shutdown_dataloaders(trainer)
        del trainer
    return res  # the caller frees the device memory once this frame (trainer, fixed batch) is gone


def _optimizers(trainer) -> list:
    out = []
    for attr in ("optimizer", "teacher_optimizer", "aux_optimizer"):
        opt = getattr(trainer, attr, None)
        if opt is not None:
            out.append(opt)
    return out


# --------------------------------------------------------------------------- inference


def _load_preprocessed_case(preprocessed_folder: str, case: Optional[str]):
    """(data as float32 numpy (C, *spatial), identifier, path prefix) of one preprocessed case."""
    import numpy as np
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    if case:
        folder, ident = os.path.split(os.path.abspath(case) if os.sep in case else os.path.join(preprocessed_folder,
                                                                                               case))
        for ending in (".b2nd", ".npz", ".npy", ".pkl"):
            if ident.endswith(ending):
                ident = ident[: -len(ending)]
        if ident.endswith("_seg"):
            ident = ident[:-4]
    else:
        folder, ident = preprocessed_folder, None
    cls = infer_dataset_class(folder)
    if ident is None:
        identifiers = cls.get_identifiers(folder)
        if not identifiers:
            raise FileNotFoundError(f"no preprocessed cases in {folder}")
        ident = sorted(identifiers)[0]
    dataset = cls(folder, [ident])
    data = dataset.load_case(ident)[0]
    return np.ascontiguousarray(np.asarray(data[:], dtype=np.float32)), ident, os.path.join(folder, ident)


def bench_inference(plans_file: str, dataset_json: dict, configuration: str, device, case: Optional[str],
                    repeats: int, mirror_axes) -> Dict[str, Any]:
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_kd.brats import channel_index
    from nnunet_kd.model_folder import subset_dataset_json, subset_plans
    from nnunet_kd.trainers.nnUNetTrainerMTCMKD import nnUNetTrainerMTCMKD
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    plans = load_json(plans_file)
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    preprocessed_folder = os.path.join(os.path.dirname(plans_file), cm.data_identifier)
    data, ident, case_path = _load_preprocessed_case(preprocessed_folder, case)
    n_channels = len(dataset_json["channel_names"])
    if data.shape[0] != n_channels:
        raise ValueError(f"case {case_path} has {data.shape[0]} channels, dataset.json names {n_channels}")
    student_channel = channel_index(dataset_json["channel_names"], STUDENT_MODALITY)
    if mirror_axes is None:
        mirror_axes = tuple(range(len(cm.patch_size)))
    mirror_axes = tuple(int(a) for a in mirror_axes)
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads

    student_json = subset_dataset_json(dataset_json, [student_channel])
    student_pm = PlansManager(subset_plans(plans, [student_channel]))
    student_cm = student_pm.get_configuration(configuration)
    models = {
        "stock_4ch": (nnUNetTrainer.build_network_architecture(pm, cm, n_channels, heads, False),
                      pm, cm, dataset_json, list(range(n_channels))),
        "student_t1ce": (nnUNetTrainerMTCMKD.build_network_architecture(student_pm, student_cm, 1, heads, False),
                         student_pm, student_cm, student_json, [student_channel]),
    }
    full = torch.from_numpy(data)
    predictors, inputs = {}, {}
    for key, (net, m_pm, m_cm, m_json, channels) in models.items():
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                    perform_everything_on_device=True, device=device, verbose=False,
                                    allow_tqdm=False)
        predictor.manual_initialization(net.to(device), m_pm, m_cm, None, m_json, "nnUNetTrainer", mirror_axes)
        predictors[key] = predictor
        inputs[key] = full[channels].contiguous()

    def run(key):
        with torch.no_grad():
            out = predictors[key].predict_sliding_window_return_logits(inputs[key])
        return tuple(out.shape)

    log(f"inference: case {ident} {list(data.shape)}, patch {list(cm.patch_size)}, mirroring {list(mirror_axes)}, "
        f"1 warm-up + {repeats} repeats each (alternating)")
    out_shape = {}
    for key in predictors:
        out_shape[key] = run(key)  # warm-up (cudnn autotuning, allocator)
    times = {key: [] for key in predictors}
    for _ in range(repeats):
        for key in predictors:
            times[key].extend(_time_steps(lambda: run(key), 1, device))
    res: Dict[str, Any] = {
        "case": case_path, "case_shape": list(data.shape), "patch_size": list(cm.patch_size),
        "tile_step_size": 0.5, "use_gaussian": True, "mirror_axes": list(mirror_axes), "repeats": repeats,
        "weights": "initial (random); weights do not change the cost",
    }
    for key in predictors:
        res[key] = {"channels": models[key][4], "input_shape": list(inputs[key].shape),
                    "output_shape": list(out_shape[key]), "times_s": [round(t, 5) for t in times[key]],
                    "time_median_s": _median(times[key])}
    res["student_t1ce"]["modality"] = STUDENT_MODALITY
    res["ratio_student_to_stock"] = res["student_t1ce"]["time_median_s"] / res["stock_4ch"]["time_median_s"]
    del predictors, models, inputs, full
    _free(device)
    return res


# --------------------------------------------------------------------------- report


def _ratio(a, b) -> Optional[float]:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return float(a) / float(b)
    return None


def compute_ratios(trainers: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Optional[float]]]:
    stock = trainers.get(STOCK, {})
    out = {}
    for name, r in trainers.items():
        out[name] = {
            "step_time": _ratio(r.get("step_time_median_s"), stock.get("step_time_median_s")),
            "step_time_with_data_loading": _ratio(r.get("step_time_with_data_loading_median_s"),
                                                  stock.get("step_time_with_data_loading_median_s")),
            "peak_gpu_memory": _ratio(r.get("peak_gpu_memory_mib"), stock.get("peak_gpu_memory_mib")),
            "peak_rss_increase": _ratio(r.get("peak_rss_increase_mib"), stock.get("peak_rss_increase_mib")),
        }
    return out


def evaluate_targets(ratios: Dict[str, Dict[str, Optional[float]]], inference: Optional[Dict[str, Any]]):
    out = []
    for label, who, metric, limit in TARGETS:
        if who == "inference":
            value = inference.get("ratio_student_to_stock") if inference else None
            secondary = None
        else:
            value = ratios.get(who, {}).get(metric)
            secondary = ratios.get(who, {}).get("step_time_with_data_loading")
        status = "n/a" if value is None else ("PASS" if value <= limit else "MISS")
        entry = {"target": label, "trainer": who, "metric": f"{metric} ratio to stock", "limit": limit,
                 "value": value, "status": status}
        if secondary is not None:
            entry["with_data_loading_value"] = secondary
            entry["with_data_loading_status"] = "PASS" if secondary <= limit else "MISS"
        out.append(entry)
    return out


def _fmt(v, nd=4) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return f"{v:.{nd}f}"


def format_table(result: Dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        f"nnunet-kd benchmark  device: {meta['device_name']} ({meta['device']})  torch {meta['torch_version']}  "
        f"nnunetv2 {meta['nnunetv2_version']}  compile: {meta['nnUNet_compile']}",
        f"dataset {meta['dataset']}  {meta['configuration']}  patch {meta['patch_size']}  batch {meta['batch_size']}  "
        f"fold {meta['fold']}  steps {meta['steps']} (+{meta['warmup']} warm-up)  data-loading steps "
        f"{meta['data_loading_steps']}  nnUNet_n_proc_DA={meta['nnUNet_n_proc_DA']}",
        f"frozen teachers: {meta['frozen_teachers']}",
    ]
    mem_key = "peak_gpu_memory_mib" if meta["device"] == "cuda" else "peak_rss_increase_mib"
    mem_ratio_key = "peak_gpu_memory" if meta["device"] == "cuda" else "peak_rss_increase"
    mem_title = "peak GPU MiB" if meta["device"] == "cuda" else "peak dRSS MiB"
    header = f"{'trainer':<38} {'step s':>9} {'x stock':>8} {'step+DL s':>10} {'x stock':>8} {mem_title:>14} {'x stock':>8}"
    lines += ["", header, "-" * len(header)]
    for name, r in result["trainers"].items():
        if "error" in r:
            lines.append(f"{name:<38} ERROR: {r['error'].splitlines()[-1][:80]}")
            continue
        q = result["ratios"].get(name, {})
        lines.append(f"{name:<38} {_fmt(r.get('step_time_median_s')):>9} {_fmt(q.get('step_time'), 2):>8} "
                     f"{_fmt(r.get('step_time_with_data_loading_median_s')):>10} "
                     f"{_fmt(q.get('step_time_with_data_loading'), 2):>8} {_fmt(r.get(mem_key), 1):>14} "
                     f"{_fmt(q.get(mem_ratio_key), 2):>8}")
    inf = result.get("inference")
    lines.append("")
    if inf and "error" not in inf:
        lines.append(f"inference (sliding window, step {inf['tile_step_size']}, mirroring {inf['mirror_axes']}, "
                     f"case {os.path.basename(inf['case'])} {inf['case_shape']}, median of {inf['repeats']}): "
                     f"stock 4-ch {_fmt(inf['stock_4ch']['time_median_s'])} s, student {STUDENT_MODALITY} "
                     f"{_fmt(inf['student_t1ce']['time_median_s'])} s, ratio {_fmt(inf['ratio_student_to_stock'], 3)}")
    elif inf:
        lines.append(f"inference: ERROR: {inf['error'].splitlines()[-1][:100]}")
    lines.append("")
    lines.append("targets (ratio to stock nnUNetTrainer, compute alone; [with data loading]):")
    for t in result["targets"]:
        extra = ""
        if "with_data_loading_value" in t:
            extra = f"  [{_fmt(t['with_data_loading_value'], 2)}x {t['with_data_loading_status']}]"
        lines.append(f"  {t['target']:<30} <= {t['limit']:<4}x: {_fmt(t['value'], 2):>6}x  {t['status']}{extra}")
    if meta["device"] != "cuda" or meta.get("toy"):
        lines.append("  (CPU and/or toy-size run: the ratios are not representative of the targets)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nnunet_kd.benchmark",
                                description="Step time, memory and inference cost of the KD trainers vs stock nnU-Net.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset-id", "-d", help="id or name of a dataset preprocessed in $nnUNet_preprocessed")
    src.add_argument("--toy", action="store_true",
                     help="build a tiny synthetic dataset (5 cases, 32^3) in a temporary folder (CI)")
    src.add_argument("--real-brats", metavar="PATH",
                     help="convert a BraTS release folder (e.g. ../shared/data/BraTS2021_sample) with "
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
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the networks (nnUNet_compile=1); default: nnUNet_compile from the "
                        "environment, else 0")
    p.add_argument("--dataset-id-for-conversion", type=int, default=None,
                   help=f"dataset id used by --toy / --real-brats (default {TOY_DATASET_ID} / {REAL_BRATS_DATASET_ID})")
    p.add_argument("--num-processes", type=int, default=4, help="processes for --real-brats preprocessing (default 4)")
    p.add_argument("--work-dir", help="folder for temporary data (default: a new temporary folder, removed at the end)")
    p.add_argument("--keep-work-dir", action="store_true", help="do not remove the temporary folder")
    p.add_argument("-o", "--output", help="write the results as JSON here")
    return p


def run_benchmark(args: argparse.Namespace, argv: Sequence[str]) -> Tuple[Dict[str, Any], bool]:
    """Prepare data, run all measurements; returns (result, all_ok)."""
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="nnunet_kd_benchmark_")
    os.makedirs(work_dir, exist_ok=True)
    work_dir = os.path.abspath(work_dir)
    log(f"work dir {work_dir}")
    # Environment first: nnU-Net reads its folders from here.
    if args.toy or args.real_brats:
        for var, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed")):
            os.environ[var] = os.path.join(work_dir, sub)
            os.makedirs(os.environ[var], exist_ok=True)
    os.environ["nnUNet_results"] = os.path.join(work_dir, "nnUNet_results")  # trainers write logs here
    os.makedirs(os.environ["nnUNet_results"], exist_ok=True)
    if args.compile:
        os.environ["nnUNet_compile"] = "1"
    else:
        os.environ.setdefault("nnUNet_compile", "0")
    from nnunet_kd.paths import with_trainer_path

    os.environ["nnUNet_extTrainer"] = with_trainer_path()["nnUNet_extTrainer"]

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
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    import nnunetv2

    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
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
        "command_line": shlex.join(["python", "-m", "nnunet_kd.benchmark"] + list(argv)),
        "sys_argv": list(sys.argv), "cwd": os.getcwd(),
        "environment": {k: os.environ.get(k) for k in ("nnUNet_n_proc_DA", "nnUNet_compile", "OMP_NUM_THREADS",
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
        "nnUNet_compile": os.environ.get("nnUNet_compile"), "nnUNet_n_proc_DA": _n_proc_da(),
        "torch_num_threads": torch.get_num_threads(), "toy": bool(args.toy), "real_brats": args.real_brats,
        "frozen_teachers": teacher_desc,
        "kd_active": "KD trainers are timed with current_epoch = kd_start_epoch, i.e. with all distillation terms",
        "cpu_memory_note": "on CPU peak_rss_increase_mib is the rise of the process's resident memory during the "
                           "steps; memory freed by an earlier trainer and reused shows as no increase",
        "compute_alone": "one real batch from the trainer's dataloader, kept on the device, reused for every step",
    }
    result: Dict[str, Any] = {"meta": meta, "trainers": {}, "ratios": {}, "inference": None, "targets": []}
    ok = True
    mirror_axes = None
    for name in trainers:
        log(f"=== {name}")
        try:
            r = bench_trainer(name, plans_file, dataset_json, args.configuration, fold, device,
                              args.steps, args.warmup, args.data_loading_steps)
            if name == STOCK:
                mirror_axes = r.get("inference_allowed_mirroring_axes")
        except Exception:  # noqa: BLE001 - report and go on with the other trainers
            ok = False
            tb = traceback.format_exc()
            log(f"{name} FAILED:\n{tb}")
            r = {"error": tb}
        _free(device)
        if device.type == "cuda":
            # Should be ~0: anything left here would inflate the next trainer's peak memory.
            r["memory_allocated_after_cleanup_mib"] = round(torch.cuda.memory_allocated(device) / _MIB, 1)
        result["trainers"][name] = r
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
    result["targets"] = evaluate_targets(result["ratios"], result["inference"])
    return result, ok


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


def main(argv: Optional[Sequence[str]] = None) -> int:
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
    sys.exit(main())
