"""The benchmark's report: ratios to the stock trainer, the targets they are checked against, and the
text table printed on stdout."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

from nnunet_kd.experiments.benchmark.measure import STUDENT_MODALITY

STOCK = "nnUNetTrainer"

#: (label, trainer, metric, upper limit of the ratio to the stock trainer / stock network).
TARGETS: Tuple[Tuple[str, str, str, float], ...] = (
    ("MTCM-KD online step", "nnUNetTrainerMTCMKD", "step_time", 4.3),
    ("MTCM-KD frozen-teacher step", "nnUNetTrainerMTCMKD_FrozenTeachers", "step_time", 2.1),
    ("MGSD step", "nnUNetTrainerMGSD", "step_time", 2.5),
    ("T1ce student inference", "inference", "inference_time", 1.05),
)


def _ratio(a, b) -> Optional[float]:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return float(a) / float(b)
    return None


def compute_ratios(trainers: Dict[str, Dict[str, Any]]) -> Dict[str, Dict[str, Optional[float]]]:
    """Each trainer's step times and memory divided by the stock trainer's (None where either is missing)."""
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


def evaluate_targets(ratios: Dict[str, Dict[str, Optional[float]]],
                     inference: Optional[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Every :data:`TARGETS` entry with its value and PASS, MISS or n/a (and the ratio with data loading)."""
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


def _defaults_lines(result: Dict[str, Any], mem_key: str, mem_ratio_key: str) -> List[str]:
    """The ratios against stock nnU-Net at its defaults (compiled where nnU-Net compiles)."""
    defaults = result.get("defaults")
    if not defaults:
        return []
    if not defaults.get("compiled"):
        return ["", "at nnU-Net's defaults nothing is compiled on this device: the ratios above are also the "
                    "ratios to stock nnU-Net at its defaults"]
    if not defaults.get("measured"):
        return ["", "not measured at nnU-Net's defaults (compiled) (--eager-only): the ratios above are eager "
                    "against eager"]
    lines = ["", "at nnU-Net's defaults (every network compiled, as nnU-Net compiles its own):"]
    return lines + _trainer_rows(defaults["trainers"], defaults["ratios"], mem_key, mem_ratio_key)


def _trainer_rows(trainers: Dict[str, Dict[str, Any]], ratios: Dict[str, Dict[str, Optional[float]]],
                  mem_key: str, mem_ratio_key: str) -> List[str]:
    """One table row per trainer: step time, step time with data loading, memory, each with its ratio."""
    lines = []
    for name, r in trainers.items():
        if "error" in r:
            lines.append(f"{name:<38} ERROR: {r['error'].splitlines()[-1][:80]}")
            continue
        q = ratios.get(name, {})
        lines.append(f"{name:<38} {_fmt(r.get('step_time_median_s')):>9} {_fmt(q.get('step_time'), 2):>8} "
                     f"{_fmt(r.get('step_time_with_data_loading_median_s')):>10} "
                     f"{_fmt(q.get('step_time_with_data_loading'), 2):>8} {_fmt(r.get(mem_key), 1):>14} "
                     f"{_fmt(q.get(mem_ratio_key), 2):>8}")
    return lines


def format_table(result: Dict[str, Any]) -> str:
    """The text table printed on stdout: device and run facts, the trainers' rows, the inference, the targets."""
    meta = result["meta"]
    lines = [
        f"nnunet-kd benchmark  device: {meta['device_name']} ({meta['device']})  torch {meta['torch_version']}  "
        f"nnunetv2 {meta['nnunetv2_version']}  compile: {meta['nnUNet_compile']}  "
        f"autocast: {meta.get('autocast', 'none')}"  # results written before --autocast existed lack the keys
        + (f" (stock row: {meta['stock_measured_as']})" if meta.get("stock_measured_as", STOCK) != STOCK else ""),
        f"dataset {meta['dataset']}  {meta['configuration']}  patch {meta['patch_size']}  batch {meta['batch_size']}  "
        f"fold {meta['fold']}  steps {meta['steps']} (+{meta['warmup']} warm-up)  data-loading steps "
        f"{meta['data_loading_steps']}  nnUNet_n_proc_DA={meta['nnUNet_n_proc_DA']}",
        f"frozen teachers: {meta['frozen_teachers']}",
    ]
    mem_key = "peak_gpu_memory_mib" if meta["device"] == "cuda" else "peak_rss_increase_mib"
    mem_ratio_key = "peak_gpu_memory" if meta["device"] == "cuda" else "peak_rss_increase"
    mem_title = "peak GPU MiB" if meta["device"] == "cuda" else "peak dRSS MiB"
    header = f"{'trainer':<38} {'step s':>9} {'x stock':>8} {'step+DL s':>10} {'x stock':>8} {mem_title:>14} {'x stock':>8}"
    lines += ["", "eager against eager (nnUNet_compile=0 for every trainer):", header, "-" * len(header)]
    lines += _trainer_rows(result["trainers"], result["ratios"], mem_key, mem_ratio_key)
    lines += _defaults_lines(result, mem_key, mem_ratio_key)
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
    basis = "at nnU-Net's defaults" if "ratios" in result.get("defaults", {}) else "eager against eager"
    lines.append(f"targets (ratio to stock nnUNetTrainer {basis}, compute alone; [with data loading]):")
    for t in result["targets"]:
        extra = ""
        if "with_data_loading_value" in t:
            extra = f"  [{_fmt(t['with_data_loading_value'], 2)}x {t['with_data_loading_status']}]"
        lines.append(f"  {t['target']:<30} <= {t['limit']:<4}x: {_fmt(t['value'], 2):>6}x  {t['status']}{extra}")
    if meta["device"] != "cuda" or meta.get("toy"):
        lines.append("  (CPU and/or toy-size run: the ratios are not representative of the targets)")
    return "\n".join(lines)


