"""One setting of the benchmark, measured in a process of its own.

nnU-Net and the plugin's trainers read their settings from the process environment (nnU-Net's folders,
``nnUNet_compile``, ``nnUNet_kd_autocast``, ``nnUNet_kd_teachers``), so
:func:`nnunet_kd.experiments.benchmark.run.run_benchmark` runs each setting as

    python -m nnunet_kd.experiments.benchmark.worker REQUEST.json RESULT.json

with that setting's environment, instead of changing its own. ``REQUEST.json`` holds a
:class:`MeasureRequest`; ``RESULT.json`` gets what :func:`measure_setting` returns.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import traceback
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from nnunet_kd.experiments.benchmark.measure import bench_inference, bench_trainer, free_device_memory, log
from nnunet_kd.experiments.benchmark.report import STOCK

_MIB = 1024.0 ** 2


@dataclass(frozen=True)
class MeasureRequest:
    """What one measuring process does, in the environment it was started with."""

    #: The rows to measure, the stock row (:data:`STOCK`) first.
    trainers: Tuple[str, ...]
    #: The trainer measured for the stock row (nnUNetTrainerBudget under the plugin's CPU autocast).
    stock_as: str
    plans_file: str
    dataset_json_file: str
    configuration: str
    fold: Union[int, str]
    #: ``cpu`` or ``cuda`` (device 0).
    device: str
    steps: int
    warmup: int
    data_loading_steps: int
    #: False: only report whether nnU-Net compiles here (``--eager-only``).
    measure_trainers: bool = True
    #: Measure the trainers only where nnU-Net compiles in this environment (the defaults setting: where it does
    #: not, the defaults are the eager run, not measured twice).
    only_if_compiled: bool = False
    inference: bool = False
    inference_case: Optional[str] = None
    inference_repeats: int = 3


def nnunet_compiles(device) -> bool:
    """nnU-Net's own decision (``nnUNetTrainer._do_i_compile``) for ``device`` under this process's environment:
    in the defaults setting, whose environment has no ``nnUNet_compile``, whether nnU-Net compiles by default."""
    from types import SimpleNamespace

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return bool(nnUNetTrainer._do_i_compile(SimpleNamespace(device=device, print_to_log_file=log)))


def _bench_trainers(request: MeasureRequest, dataset_json: dict, device) -> Tuple[Dict[str, Any], bool, Any]:
    """Each trainer in turn; (results by trainer, all_ok, the stock trainer's inference mirror axes)."""
    import torch

    results: Dict[str, Any] = {}
    ok, mirror_axes = True, None
    for name in request.trainers:
        log(f"=== {name} (nnUNet_compile={os.environ.get('nnUNet_compile', 'unset')})")
        try:
            measured = request.stock_as if name == STOCK else name
            r = bench_trainer(measured, request.plans_file, dataset_json, request.configuration, request.fold,
                              device, request.steps, request.warmup, request.data_loading_steps)
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


def _device_facts(device) -> Dict[str, Any]:
    """The device and the threads of this process; on CUDA set up as nnUNetv2_train does."""
    import torch

    facts: Dict[str, Any] = {"device_name": _cpu_name(), "device_memory_gib": None}
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = False
        torch.backends.cudnn.benchmark = True
        torch.set_num_threads(1)
        facts["device_name"] = torch.cuda.get_device_name(device)
        facts["device_memory_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 1024 ** 3, 1)
    facts["torch_num_threads"] = torch.get_num_threads()
    facts["nnUNet_n_proc_DA"] = _n_proc_da()
    return facts


def measure_setting(request: MeasureRequest) -> Dict[str, Any]:
    """The trainers (and, if asked, the inference) under this process's environment.

    Returns ``{"facts": {...}, "compiles": bool, "trainers": {name: result}, "ok": bool, "inference": dict or
    None}``; ``trainers`` is empty when nothing was measured, ``ok`` False when a trainer or the inference failed.
    """
    import torch

    device = torch.device(request.device, 0) if request.device == "cuda" else torch.device("cpu")
    out: Dict[str, Any] = {"facts": _device_facts(device), "compiles": nnunet_compiles(device), "trainers": {},
                           "ok": True, "inference": None}
    with open(request.dataset_json_file) as f:
        dataset_json = json.load(f)
    mirror_axes = None
    if request.measure_trainers and (out["compiles"] or not request.only_if_compiled):
        out["trainers"], out["ok"], mirror_axes = _bench_trainers(request, dataset_json, device)
    if request.inference:
        log("=== inference")
        try:
            out["inference"] = bench_inference(request.plans_file, dataset_json, request.configuration, device,
                                               request.inference_case, request.inference_repeats, mirror_axes)
        except Exception:  # noqa: BLE001
            out["ok"] = False
            tb = traceback.format_exc()
            log(f"inference FAILED:\n{tb}")
            out["inference"] = {"error": tb}
    return out


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


def write_request(request: MeasureRequest, path: str) -> None:
    """``REQUEST.json`` for :func:`main`."""
    with open(path, "w") as f:
        json.dump(dataclasses.asdict(request), f, indent=2)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``worker REQUEST.json RESULT.json``: measure the request, write the result; 0 even when a trainer failed
    (the result says so), non-zero only when the process itself failed."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        print("usage: python -m nnunet_kd.experiments.benchmark.worker REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    with open(args[0]) as f:
        fields = json.load(f)
    request = MeasureRequest(**{**fields, "trainers": tuple(fields["trainers"])})
    result = measure_setting(request)
    with open(args[1], "w") as f:
        json.dump(result, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
