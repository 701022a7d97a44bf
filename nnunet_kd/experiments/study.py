"""The distillation-effect study: which model segments best from T1ce alone, on the same data and budget?

The data are either synthetic BraTS-like cases (one fresh dataset per ``--seeds`` value) or real cases
(``--real-brats DIR``), split into ``--folds`` test folds so that every case is a test case once. For each
split the training cases are converted (all four channels, and T1ce alone) and planned, optionally at
another target spacing through nnU-Net's own planner (``--target-spacing``); then every model of
:mod:`nnunet_kd.experiments.study_design` trains with the same epochs and iterations through
``nnUNetv2_train``: stock nnU-Net on T1ce (the baseline), the MTCM-KD student (its default and the
reference's KD variants), MGSD and modality dropout fed T1ce alone, stock nnU-Net on all four.

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
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nnunet_kd.atomic import atomic_write_json, atomic_write_text
from nnunet_kd.cli import command
from nnunet_kd.evaluation.metrics import EvaluationError
from nnunet_kd.evaluation.metrics import METRIC_MODES
from nnunet_kd.evaluation.modes import require_official_package
from nnunet_kd.experiments.datasets import convert_command, link_channels, planning_commands, plans_name_for
from nnunet_kd.experiments.demo import claim_workdir
from nnunet_kd.experiments.runner import (CommandFailed, budget_variables, command_path, default_device,
                                          nnunet_environment, python_module_command, run_command)
from nnunet_kd.experiments.study_design import (ABLATIONS, DATASET_IDS, MODELS, RESUME_DEFAULTS, StudyError,
                                                StudyModel, StudySettings, real_case_folds, study_models)
from nnunet_kd.experiments.study_report import (collect_report, collect_split, combinations_file, scores_file,
                                                write_report)
from nnunet_kd.paths import find_dataset_folder
from nnunet_kd.training.precision import AUTOCAST_CHOICES, autocast_environment

#: Marks a work dir as the study's own, so that only such a folder is ever replaced.
WORKDIR_MARKER = "study_settings.json"


def _step(name: str, cmd: List[str], env: Dict[str, str], log_dir: Path) -> None:
    """One step of a split, its output in ``log_dir/name.log`` (CommandFailed with the log's tail on failure)."""
    run_command(cmd, env, log_file=log_dir / f"{name}.log", echo=f"[study] {name}:")


def _dataset_folder(env: Dict[str, str], kind: str) -> Path:
    raw = env["nnUNet_raw"]
    return Path(find_dataset_folder(raw, DATASET_IDS[kind], f"nnUNet_raw={raw}"))


def prepare_split(root: Path, split: int, settings: StudySettings, env: Dict[str, str]) -> None:
    """Training and held-out cases of one split, converted to nnU-Net datasets; the training sets planned."""
    logs = root / "logs"
    if (root / "prepared.done").exists():
        return
    for partial in ("train_src", "test_src", "raw", "preprocessed", "inputs_T1ce_numbered"):
        shutil.rmtree(root / partial, ignore_errors=True)  # the study's own, from an interrupted preparation
    logs.mkdir(parents=True, exist_ok=True)
    if settings.real_brats:
        folds = real_case_folds(Path(settings.real_brats), settings.folds)
        _link_cases(root / "train_src", [c for f, fold in enumerate(folds) if f != split for c in fold])
        _link_cases(root / "test_src", folds[split])
    else:
        from nnunet_kd.experiments.synthetic import generate_dataset

        generate_dataset(str(root / "train_src"), settings.cases, shape=tuple(settings.shape), seed=1000 * split)
        generate_dataset(str(root / "test_src"), settings.test_cases, shape=tuple(settings.shape),
                         seed=1000 * split + 500, start_index=settings.cases + 1)
    ids = DATASET_IDS
    _step("convert_full", convert_command(root / "train_src", ids["full"]), env, logs)
    _step("convert_t1ce", convert_command(root / "train_src", ids["t1ce"], "--modalities", "T1ce"), env, logs)
    _step("convert_test", convert_command(root / "test_src", ids["test"]), env, logs)
    _step("convert_test_t1ce", convert_command(root / "test_src", ids["test_t1ce"], "--modalities", "T1ce"),
          env, logs)
    for kind in ("full", "t1ce"):
        for i, cmd in enumerate(planning_commands(ids[kind], settings.num_processes, settings.target_spacing)):
            _step(f"plan_{kind}_{i}", cmd, env, logs)
    link_channels(_dataset_folder(env, "test") / "imagesTr", [1], root / "inputs_T1ce_numbered")
    atomic_write_text(str(root / "prepared.done"), "data converted, planned and preprocessed\n")


def _link_cases(folder: Path, cases: Sequence[Path]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        (folder / case.name).symlink_to(case.resolve())


def train_and_score(root: Path, model: StudyModel, settings: StudySettings, env: Dict[str, str]) -> None:
    """Train one model on one split, predict its held-out cases and score them (skipping what is done)."""
    from nnunet_kd.evaluation.modes import evaluate_with_metrics

    logs, slug, device = root / "logs", model.slug, settings.device
    dataset_id = str(DATASET_IDS[model.dataset])
    plans = plans_name_for(settings.target_spacing)
    test = _dataset_folder(env, "test")
    select = ["-d", dataset_id, "-c", "3d_fullres", "-tr", model.trainer, "-p", plans, "-f", "all",
              "-device", device, "-npp", "1", "-nps", "1"]
    if not scores_file(root, model).exists():
        # --c continues a killed training from its last checkpoint (nnU-Net starts afresh when there is none)
        _step(f"train_{slug}", [command_path("nnUNetv2_train"), dataset_id, "3d_fullres", "all", "-tr",
                                model.trainer, "-p", plans, "-device", device, "--c"], env, logs)
        out = root / "predictions" / slug
        if model.feed == "available_t1ce":
            _step(f"predict_{slug}", python_module_command(
                "nnunet_kd.inference.predict", "-i", str(root / "inputs_T1ce_numbered"), "--available", "T1ce",
                "-o", str(out), *select), env, logs)
        else:
            images = (_dataset_folder(env, "test_t1ce") if model.feed == "t1ce_file" else test) / "imagesTr"
            _step(f"predict_{slug}", [command_path("nnUNetv2_predict"), "-i", str(images), "-o", str(out),
                                      *select], env, logs)
        evaluate_with_metrics(str(test / "labelsTr"), str(out), str(scores_file(root, model)),
                              metrics="legacy" if settings.metrics == "legacy" else "both", num_processes=1,
                              progress=False, model=model.slug)
    if model.combinations and not combinations_file(root, model).exists():
        _step(f"combinations_{slug}", python_module_command(
            "nnunet_kd.evaluation.missing_modalities", "-i", str(test / "imagesTr"), "-r", str(test / "labelsTr"),
            "-o", str(combinations_file(root, model).parent), "-np", "1",
            "--metrics", "legacy" if settings.metrics == "legacy" else "both", *select), env, logs)


def _worker_environment(env: Dict[str, str], settings: StudySettings) -> Dict[str, str]:
    """With --parallel N, each training gets 1/N of the CPU workers (unless the environment sets them)."""
    if settings.parallel <= 1:
        return env
    share = str(max(1, (os.cpu_count() or 2) // settings.parallel))
    return {**env, **{k: os.environ.get(k, share) for k in ("nnUNet_n_proc_DA", "nnUNet_def_n_proc")}}


def run_study(workdir: str, splits: Sequence[int], settings: StudySettings, resume: bool = False,
              markdown: Optional[str] = None) -> dict:
    """Train and score the study's models on every split in ``workdir``; write and return the report.

    ``resume``: keep ``workdir`` and skip what an earlier run with the same settings finished.
    ``markdown``: also write the report's Markdown to this file.
    """
    work = Path(workdir).resolve()
    record = settings.resume_record()
    settings_file = work / WORKDIR_MARKER
    if resume and settings_file.is_file():
        earlier = {**RESUME_DEFAULTS, **json.loads(settings_file.read_text())}
        changed = {k: (earlier.get(k), v) for k, v in record.items() if earlier.get(k) != v}
        if changed:
            raise StudyError(f"--resume: {workdir} was run with other settings: " + ", ".join(
                f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items()))
    # only the study's own folder (or a new or empty one) is kept with --resume or replaced without
    claim_workdir(work, WORKDIR_MARKER, "nnunet_kd_study", StudyError, keep=resume)
    atomic_write_json(record, str(settings_file))
    budget = {**budget_variables(settings.epochs, settings.iterations, max(1, settings.iterations // 5),
                                 settings.device, settings.num_processes, save_every=1),
              **autocast_environment(settings.autocast)}
    start = time.time()
    roots = {split: work / settings.split_folder(split) for split in splits}
    envs = {split: nnunet_environment(root, **budget) for split, root in roots.items()}
    for split, root in roots.items():
        print(f"[study] preparing {root.name}", flush=True)
        prepare_split(root, split, settings, envs[split])
    jobs = [(split, model) for model in settings.models().values() for split in splits]
    with ThreadPoolExecutor(max_workers=max(1, settings.parallel)) as pool:
        futures = [pool.submit(train_and_score, roots[split], model, settings,
                               _worker_environment(envs[split], settings)) for split, model in jobs]
        for future in futures:
            future.result()
    plans = plans_name_for(settings.target_spacing)
    per_split = {root.name: collect_split(root, settings.models(), plans) for root in roots.values()}
    return write_report(work, per_split, settings, time.time() - start, markdown)


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
                   "on the CPU (nnUNet_kd_autocast=bf16; CUDA keeps nnU-Net's fp16 autocast); default none (fp32)")
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


if __name__ == "__main__":
    raise SystemExit(main())
