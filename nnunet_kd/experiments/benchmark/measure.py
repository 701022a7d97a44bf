"""The benchmark's measurements: training-step time and peak memory of one trainer on a fixed batch and with
nnU-Net's data loading, and sliding-window inference time of the T1ce student against a stock network.

Called in the measuring process (:mod:`nnunet_kd.experiments.benchmark.worker`), whose environment
:mod:`nnunet_kd.experiments.benchmark.run` sets up; nothing here changes the environment.
"""
from __future__ import annotations

import datetime
import functools
import gc
import json
import os
import resource
import statistics
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from nnunet_kd.brats import channel_index, channel_indices, channel_names_of
from nnunet_kd.paths import trainer_dir
from nnunet_kd.training.precision import precision_description

if TYPE_CHECKING:
    import torch

STUDENT_MODALITY = "T1ce"
_MIB = 1024.0 ** 2


def log(msg: str) -> None:
    """A progress line on stderr."""
    print(f"[benchmark {datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


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

    ``baseline``: the resident bytes the peak is compared with (default: those on entering), e.g. read before a
    trainer was built so that its weights, optimiser state and teachers count. Falls back to the increase of
    ``ru_maxrss`` (process high-water mark) where /proc is unavailable."""

    def __init__(self, interval: float = 0.005, baseline: Optional[int] = None):
        self.interval = interval
        self.baseline = baseline
        self.start = self.peak = None
        self._stop = threading.Event()
        self._thread = None
        self._maxrss0 = 0

    def __enter__(self):
        self.start = self.baseline if self.baseline is not None else _rss_bytes()
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
        """The peak's rise over the start, MiB."""
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


def free_device_memory(device: torch.device) -> None:
    """Collect garbage and, on a GPU, return the cached memory."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- trainers


@functools.lru_cache(maxsize=None)
def find_trainer_class(name: str) -> type:
    """The trainer class ``name`` as nnUNetv2_train finds it (nnU-Net's trainers, then ``nnUNet_extTrainer``),
    else among the plugin's trainers: without setting ``nnUNet_extTrainer`` in this process."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except RuntimeError:  # not nnU-Net's, and nnUNet_extTrainer does not name the plugin's folder
        pass
    found = recursive_find_python_class(trainer_dir(), name, "nnunet_kd.trainers")
    if found is None:
        raise ValueError(f"trainer class {name} not found in nnunetv2 or nnunet_kd.trainers")
    return found


def make_frozen_teachers(work_dir: str, plans: dict, dataset_json: dict, configuration: str, kind: str,
                         mirror_axes: Sequence[int]) -> Tuple[List[str], str]:
    """Teacher model folders (plans.json, dataset.json, fold_all/checkpoint_final.pth) holding stock nnU-Net
    networks of these plans with their initial (random) weights: exactly what a trained teacher costs."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_kd.training.channel_subset import subset_dataset_json, subset_plans

    names = channel_names_of(dataset_json)
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


def bench_trainer(name: str, plans_file: str, dataset_json: dict, configuration: str, fold: Union[int, str],
                  device: torch.device, steps: int, warmup: int, dl_steps: int) -> Dict[str, Any]:
    """Step time (compute alone and with data loading), peak memory and setup facts of one trainer."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    cls = find_trainer_class(name)
    plans = load_json(plans_file)
    plans["continue_training"] = False
    res: Dict[str, Any] = {"class": f"{cls.__module__}.{cls.__name__}"}
    rss_before_setup = _rss_bytes()  # CPU memory counts from here: weights, optimiser state, teachers, steps
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
        res["precision"] = precision_description(device, getattr(trainer, "cpu_autocast_dtype", None))
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
        with RSSPeak(baseline=rss_before_setup) as rss:
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


def bench_inference(plans_file: str, dataset_json: dict, configuration: str, device: torch.device,
                    case: Optional[str], repeats: int, mirror_axes: Optional[Sequence[int]]) -> Dict[str, Any]:
    """Sliding-window inference time on one preprocessed case: the one-channel T1ce student against a stock
    network on all channels, both built from these plans with initial weights (median of ``repeats``)."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_kd.training.channel_subset import subset_dataset_json, subset_plans

    plans = load_json(plans_file)
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    preprocessed_folder = os.path.join(os.path.dirname(plans_file), cm.data_identifier)
    data, ident, case_path = _load_preprocessed_case(preprocessed_folder, case)
    channel_names = channel_names_of(dataset_json)
    n_channels = len(channel_names)
    if data.shape[0] != n_channels:
        raise ValueError(f"case {case_path} has {data.shape[0]} channels, dataset.json names {n_channels}")
    student_channel = channel_index(channel_names, STUDENT_MODALITY)
    if mirror_axes is None:
        mirror_axes = tuple(range(len(cm.patch_size)))
    mirror_axes = tuple(int(a) for a in mirror_axes)
    heads = pm.get_label_manager(dataset_json).num_segmentation_heads

    student_json = subset_dataset_json(dataset_json, [student_channel])
    student_pm = PlansManager(subset_plans(plans, [student_channel]))
    student_cm = student_pm.get_configuration(configuration)
    student_class = find_trainer_class("nnUNetTrainerMTCMKD")
    models = {
        "stock_4ch": (nnUNetTrainer.build_network_architecture(pm, cm, n_channels, heads, False),
                      pm, cm, dataset_json, list(range(n_channels))),
        "student_t1ce": (student_class.build_network_architecture(student_pm, student_cm, 1, heads, False),
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
    free_device_memory(device)
    return res


