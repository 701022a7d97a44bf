"""The distillation-effect study: which model segments best from T1ce alone, on the same data and budget?

The data are either synthetic BraTS-like cases (one fresh dataset per ``--seeds`` value) or real cases
(``--real-brats DIR``), split into ``--folds`` test folds so that every case is a test case once. For each
split the training cases are converted (all four channels, and T1ce alone) and planned, optionally at
another target spacing through nnU-Net's own planner (``--target-spacing``); then every model of
:mod:`nnunet_kd.experiments.study.design` trains with the same epochs and iterations through
``nnUNetv2_train``: stock nnU-Net on T1ce (the baseline), the MTCM-KD student (its default and the KD
variants of the reference code, RhineLT/mtcm-kd), MGSD and modality dropout fed T1ce alone, stock nnU-Net on
all four.

Every model is scored on the held-out cases (Dice, HD95 for WT, TC, ET); MGSD and modality dropout also
over all 15 modality combinations. The report pools the held-out cases of all splits and gives each model's
paired per-case differences to the baseline with a 95 % bootstrap interval and the Wilcoxon signed-rank
p-value (study.json, study.md, study_dice.png, study_paired.png), and every model's learning curve per split
(nnU-Net's validation pseudo-Dice per epoch from its checkpoint, unfinished trainings too) with whether it has
flattened (study_learning_curves.png).

Models train model by model over all splits, so an interrupted study already has its cheapest models on
every split. ``--resume`` continues in the same work dir (also a killed training, from its last epoch);
``--collect`` reports what finished so far. On a GPU, ``--parallel N`` runs N trainings at once on the one
device (separate processes, each with its share of the CPU workers).

    python -m nnunet_kd.experiments.study --real-brats BRATS2018_DIR --folds 3 --target-spacing 4 4 4 \
        --epochs 10 --iterations 25 --device cpu --workdir study_4mm --markdown study_4mm.md
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from nnunet_kd.cli import command
from nnunet_kd.evaluation.metrics import METRIC_MODES, EvaluationError
from nnunet_kd.evaluation.modes import require_official_package
from nnunet_kd.experiments.runner import CommandFailed, default_device
from nnunet_kd.experiments.study.design import (ABLATIONS, MODELS, StudyError, StudySettings, real_case_folds,
                                                study_models)
from nnunet_kd.experiments.study.report import collect_report
from nnunet_kd.experiments.study.run import run_study
from nnunet_kd.training.precision import AUTOCAST_CHOICES


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnunet_kd_study", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="kd_study_output",
                   help="folder for all study files (replaced unless --resume; only a folder the study made)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, metavar="N",
                   help="synthetic data: one dataset per seed (default 0 1 2); with --real-brats: which test "
                        "folds to run (default all)")
    p.add_argument("--cases", type=int, default=16, help="synthetic training cases per seed")
    p.add_argument("--test-cases", type=int, default=8, help="synthetic held-out cases per seed")
    p.add_argument("--shape", type=int, nargs=3, default=(40, 40, 40))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iterations", type=int, default=40, help="iterations per epoch")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("-np", "--num-processes", type=int, default=2, help="CPU workers of each nnU-Net command")
    p.add_argument("--autocast", choices=AUTOCAST_CHOICES, default="none", help="bf16: train in bfloat16 autocast "
                   "on the CPU (nnUNet_kd_autocast=bf16; needs a CPU with native bf16, AVX512-BF16 or AMX; CUDA keeps "
                   "nnU-Net's fp16 autocast); default none (fp32)")
    p.add_argument("--markdown", help="also write the report's Markdown to this file")
    p.add_argument("--toy", action="store_true", help="smallest run that exercises every step (CI)")
    p.add_argument("--real-brats", metavar="DIR", help="real cases (one BraTS release folder, converted with "
                   "the project's converter) instead of synthetic ones")
    p.add_argument("--folds", type=int, default=5, help="with --real-brats: number of test folds; every case "
                   "is a test case in one of them (default 5)")
    p.add_argument("--target-spacing", type=float, nargs=3, metavar=("Z", "Y", "X"), help="plan the 3d_fullres "
                   "configuration at this spacing in mm (nnUNetv2_plan_experiment -overwrite_target_spacing, "
                   "plans named nnUNetPlans_ZxYxXmm), e.g. 4 4 4 on a CPU")
    p.add_argument("--parallel", type=int, default=1, help="trainings at once (separate processes on the one "
                   "device, each with 1/N of the CPU workers); useful on a GPU")
    p.add_argument("--metrics", choices=METRIC_MODES, default="legacy", help="legacy: BraTS 2018-2021 case-wise "
                   "Dice and HD95 (default); lesionwise or both: also the official lesion-wise metrics in every "
                   "scores file (needs the brats-eval extra); the paired differences use the legacy metrics")
    p.add_argument("--ablations", action="store_true", help="also train the ablation variants: "
                   + "; ".join(ABLATIONS))
    p.add_argument("--only", nargs="+", metavar="TRAINER_DATASET", help="train just these models (and the "
                   "baseline), named as in the score files: "
                   + ", ".join(m.slug for m in {**MODELS, **ABLATIONS}.values()))
    p.add_argument("--resume", action="store_true", help="keep --workdir and skip what an earlier run with the "
                   "same settings finished (prepared data, scored models, combination tables); a killed "
                   "training continues from its last epoch")
    p.add_argument("--collect", nargs="+", metavar="WORKDIR", help="do not train: report on the split folders "
                   "(seedN, foldN) that earlier runs left in these work dirs, in --workdir (with --seeds: only those "
                   "seeds or folds)")
    return p


@command(StudyError, CommandFailed, EvaluationError)
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nnunet_kd_study``: parse the options, then run the study or report on earlier runs."""
    p = _parser()
    args = p.parse_args(argv)
    if args.toy:
        args.cases, args.test_cases, args.shape, args.epochs, args.iterations = 2, 1, (32, 32, 32), 1, 1
    if args.cases < 2 or args.test_cases < 1:
        p.error("--cases must be at least 2 and --test-cases at least 1")
    if args.epochs < 1 or args.iterations < 1 or args.parallel < 1 or args.num_processes < 1:
        p.error("--epochs, --iterations, --parallel and --num-processes must be at least 1")
    if args.target_spacing is not None and min(args.target_spacing) <= 0:
        p.error("--target-spacing: every spacing must be positive")
    known = [m.slug for m in study_models(args.ablations).values()]
    unknown = [slug for slug in args.only or () if slug not in known]
    if unknown:
        p.error(f"--only: unknown model(s) {', '.join(unknown)}; choose from {', '.join(known)}"
                f"{'' if args.ablations else ' (the ablation variants need --ablations)'}")
    settings = StudySettings(
        cases=args.cases, test_cases=args.test_cases, shape=tuple(args.shape), epochs=args.epochs,
        iterations=args.iterations, device=args.device or default_device(), real_brats=args.real_brats,
        folds=args.folds, target_spacing=None if args.target_spacing is None else tuple(args.target_spacing),
        num_processes=args.num_processes, parallel=args.parallel, metrics=args.metrics, ablations=args.ablations,
        only=None if args.only is None else tuple(args.only), autocast=args.autocast)
    if args.metrics != "legacy":
        require_official_package()  # before any training
    if args.collect:
        collect_report(args.collect, args.workdir, settings, args.markdown, args.seeds)
        return 0
    if args.real_brats:
        n_folds = len(real_case_folds(Path(args.real_brats), args.folds))
        splits = args.seeds if args.seeds is not None else list(range(n_folds))
        bad = [s for s in splits if not 0 <= s < n_folds]
        if bad:
            p.error(f"--seeds {' '.join(map(str, bad))}: with --real-brats the folds are 0 to {n_folds - 1}")
    else:
        splits = args.seeds if args.seeds is not None else [0, 1, 2]
    run_study(args.workdir, splits, settings, args.resume, args.markdown)
    return 0

