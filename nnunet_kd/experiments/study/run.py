"""The study's steps: prepare each split's data, train and score every model on it, then report.

:func:`run_study` is what ``nnunet_kd_study`` runs (:mod:`nnunet_kd.experiments.study.cli` parses the options);
every nnU-Net command runs as a subprocess with the split's own environment, so this process's environment
is never changed.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nnunet_kd.atomic import atomic_write_json, atomic_write_text
from nnunet_kd.experiments.datasets import convert_command, link_channels, planning_commands, plans_name_for
from nnunet_kd.experiments.demo import claim_workdir
from nnunet_kd.experiments.runner import (budget_variables, command_path, nnunet_environment, python_module_command,
                                          run_command)
from nnunet_kd.experiments.study.collect import collect_split, combinations_file, model_folder, scores_file
from nnunet_kd.experiments.study.design import (DATASET_IDS, RESUME_DEFAULTS, StudyError, StudyModel, StudySettings,
                                                real_case_folds)
from nnunet_kd.experiments.study.report import write_report
from nnunet_kd.paths import find_dataset_folder
from nnunet_kd.training.precision import autocast_environment, parse_cpu_autocast, require_native_cpu_bf16

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


def _teacher_environment(root: Path, model: StudyModel, settings: StudySettings, plans: str) -> Dict[str, str]:
    """``nnUNet_kd_teachers`` for a model that distils from another model of the split (empty when none)."""
    if model.teacher is None:
        return {}
    teacher = settings.models()[model.teacher]
    folder = model_folder(root, teacher, plans)
    if folder is None or not (folder / "checkpoint_final.pth").is_file():
        raise StudyError(f"{model.slug} distils from {teacher.slug}, which has no finished training in {root}: "
                         f"train it first (run the study with it, or without --only)")
    return {"nnUNet_kd_teachers": str(folder)}


def train_and_score(root: Path, model: StudyModel, settings: StudySettings, env: Dict[str, str]) -> None:
    """Train one model on one split, predict its held-out cases and score them (skipping what is done)."""
    from nnunet_kd.evaluation.modes import evaluate_with_metrics

    logs, slug, device = root / "logs", model.slug, settings.device
    dataset_id = str(DATASET_IDS[model.dataset])
    plans = plans_name_for(settings.target_spacing)
    env = {**env, **_teacher_environment(root, model, settings, plans)}
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
    if parse_cpu_autocast(settings.autocast) is not None and settings.device == "cpu":
        require_native_cpu_bf16(f"--autocast {settings.autocast}", "Use --autocast none (float32) on this CPU.",
                                StudyError)
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
    models = list(settings.models().values())
    # models that distil from another model of the study train once every teacher has finished
    for phase in ([m for m in models if m.teacher is None], [m for m in models if m.teacher is not None]):
        with ThreadPoolExecutor(max_workers=max(1, settings.parallel)) as pool:
            futures = [pool.submit(train_and_score, roots[split], model, settings,
                                   _worker_environment(envs[split], settings)) for model in phase for split in splits]
            for future in futures:
                future.result()
    plans = plans_name_for(settings.target_spacing)
    per_split = {root.name: collect_split(root, settings.models(), plans) for root in roots.values()}
    return write_report(work, per_split, settings, time.time() - start, markdown)
