"""``nnunet_kd_benchmark`` (``python -m nnunet_kd.experiments.benchmark``): the options, the table on stdout,
the JSON. What it measures and how: :mod:`nnunet_kd.experiments.benchmark`."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from typing import Iterator, Optional, Sequence, TextIO

from nnunet_kd.cli import command
from nnunet_kd.experiments.benchmark.measure import log
from nnunet_kd.experiments.benchmark.report import STOCK, format_table
from nnunet_kd.experiments.benchmark.run import (DEFAULT_TRAINERS, REAL_BRATS_DATASET_ID, TOY_DATASET_ID,
                                                 BenchmarkSettings, run_benchmark)
from nnunet_kd.experiments.runner import CommandFailed
from nnunet_kd.training.precision import AUTOCAST_CHOICES


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
                   help="bf16: time the training steps in bfloat16 autocast on the CPU (nnUNet_kd_autocast=bf16; "
                        "needs a CPU with native bf16, AVX512-BF16 or AMX); "
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


def settings_from_args(args: argparse.Namespace) -> BenchmarkSettings:
    """The parsed options as settings (every field of :class:`BenchmarkSettings` is an option of the same name)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchmarkSettings)}
    values["trainers"] = tuple(values["trainers"])
    values["teacher_models"] = None if args.teacher_models is None else tuple(args.teacher_models)
    return BenchmarkSettings(**values)


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[TextIO]:
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
        result, ok = run_benchmark(settings_from_args(args), argv)
        table = format_table(result)
        print(table, file=out, flush=True)
        if args.output:
            folder = os.path.dirname(os.path.abspath(args.output))
            os.makedirs(folder, exist_ok=True)
            with open(args.output, "w") as f:
                json.dump(result, f, indent=2, default=str)
            log(f"wrote {args.output}")
    return 0 if ok else 1

