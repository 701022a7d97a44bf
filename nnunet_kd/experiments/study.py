"""The distillation-effect study: which model segments best from T1ce alone, on the same data and budget?

For each seed, a fresh synthetic BraTS-like dataset (training and held-out test cases) is
drawn, converted and planned; then five models train with the same epochs and iterations
through ``nnUNetv2_train``:

1. stock nnU-Net on the T1ce-only dataset (``nnUNetTrainerBudget``: stock trainer, budget only),
2. the MTCM-KD student (``nnUNetTrainerMTCMKD``),
3. MGSD (``nnUNetTrainerMGSD``), fed T1ce alone at test time,
4. the modality-dropout baseline (``nnUNetTrainerModalityDropout``), fed T1ce alone,
5. stock nnU-Net on all four modalities (upper reference).

All are scored on the held-out cases with ``nnunet_kd.evaluation.evaluate`` (Dice, HD95 for WT, TC,
ET), and MGSD also over all 15 modality combinations. The mean and spread over seeds go
to JSON, a Markdown table and a bar plot.

``--ablations`` adds three variants that test the levers of docs/results.md (MTCM-KD with KD from
epoch 0, with T^2 scaling; MGSD with a lighter modality-level term). ``--resume`` continues an
interrupted or extended study in the same work dir: finished steps (prepared data, scored
models) are kept, so adding ``--ablations`` or new seeds trains only what is new.

    python -m nnunet_kd.experiments.study --workdir study_out --seeds 0 1 2 --cases 16 --test-cases 8 \
        --epochs 4 --iterations 40 --device cpu --markdown docs/results_synthetic.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_kd import brats
from nnunet_kd.atomic import atomic_write_json, atomic_write_text
from nnunet_kd.cli import command
from nnunet_kd.experiments.datasets import convert_command, link_channels, plan_command
from nnunet_kd.experiments.runner import (CommandFailed, budget_variables, command_path, default_device,
                                          nnunet_environment, python_module_command, run_command)
from nnunet_kd.paths import find_dataset_folder

REGIONS = tuple(brats.REGIONS)
#: name -> (trainer, dataset: "full" or "t1ce", how it is fed at test time)
MODELS = {
    "stock nnU-Net, T1ce-only dataset": ("nnUNetTrainerBudget", "t1ce", "t1ce_file"),
    "MTCM-KD student (T1ce)": ("nnUNetTrainerMTCMKD", "full", "t1ce_file"),
    "MGSD fed T1ce alone": ("nnUNetTrainerMGSD", "full", "available_t1ce"),
    "modality dropout fed T1ce alone": ("nnUNetTrainerModalityDropout", "full", "available_t1ce"),
    "stock nnU-Net, all four modalities (upper reference)": ("nnUNetTrainerBudget", "full", "all"),
}
#: --ablations: the levers the loss-scale analysis points at (docs/results.md), on the same data and budget.
ABLATIONS = {
    "ablation: MTCM-KD, KD from epoch 0": ("nnUNetTrainerMTCMKD_KDFromStart", "full", "t1ce_file"),
    "ablation: MTCM-KD, KD from epoch 0, scaled by T^2": ("nnUNetTrainerMTCMKD_StrongKD", "full", "t1ce_file"),
    "ablation: MGSD, modality-level weight 5, fed T1ce alone": ("nnUNetTrainerMGSD_LightModalityKD", "full",
                                                                 "available_t1ce"),
}
#: Dataset ids of one seed's folder: the training sets (all channels, T1ce only) and the held-out sets.
DATASET_IDS = {"full": 600, "t1ce": 601, "test": 602, "test_t1ce": 603}


class StudyError(ValueError):
    """Bad input to the study (settings that differ from a resumed run's, missing or incomplete folders)."""


def study_models(with_ablations: bool, only: Optional[Sequence[str]] = None) -> Dict[str, tuple]:
    """The models a study trains: name -> (trainer, dataset "full" or "t1ce", how it is fed at test time).

    ``only``: keep just these models, named by their ``TRAINER_DATASET`` slug (e.g. ``nnUNetTrainerMTCMKD_full``).
    """
    models = {**MODELS, **(ABLATIONS if with_ablations else {})}
    return {name: m for name, m in models.items() if not only or model_slug(m) in only}


def model_slug(model: tuple) -> str:
    """File-name form of a study model: ``TRAINER_DATASET``."""
    return f"{model[0]}_{model[1]}"


MGSD_SLUG = model_slug(MODELS["MGSD fed T1ce alone"])

#: Settings that change the data or the budget: a --resume run must use the same ones.
RESUME_SETTINGS = ("cases", "test_cases", "shape", "epochs", "iterations", "device", "real_brats")


@dataclass(frozen=True)
class StudySettings:
    """The data, budget and models of a study (the same for every seed)."""

    cases: int = 16
    test_cases: int = 8
    shape: Tuple[int, int, int] = (40, 40, 40)
    epochs: int = 4
    iterations: int = 40
    device: str = "cpu"
    real_brats: Optional[str] = None
    num_processes: int = 2
    ablations: bool = False
    only: Optional[Tuple[str, ...]] = None

    def models(self) -> Dict[str, tuple]:
        """The models this study trains (see :func:`study_models`)."""
        return study_models(self.ablations, self.only)

    def with_mgsd_table(self) -> bool:
        """MGSD's 15-combination table is made whenever MGSD is one of the study's models."""
        return not self.only or MGSD_SLUG in self.only

    def resume_record(self) -> dict:
        """The settings a --resume run is checked against (JSON-ready)."""
        record = {k: getattr(self, k) for k in RESUME_SETTINGS}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in record.items()}


def _mgsd_table_file(root: Path) -> Path:
    """Where a seed's MGSD 15-combination table is written."""
    return root / "mgsd_missing" / "missing_modalities.json"


def _step(name: str, cmd: List[str], env: Dict[str, str], log_dir: Path) -> None:
    """One step of a seed, its output in ``log_dir/name.log`` (CommandFailed with the log's tail on failure)."""
    run_command(cmd, env, log_file=log_dir / f"{name}.log", echo=f"[study] {name}:")


def _seed_run(work: Path, seed: int, settings: StudySettings, budget: Dict[str, str]) -> dict:
    from nnunet_kd.evaluation.evaluate import evaluate_folders
    from nnunet_kd.evaluation.missing_modalities import evaluate_missing_modalities

    root = work / f"seed{seed}"
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = nnunet_environment(root, **budget)
    ids = DATASET_IDS
    prepared = root / "prepared.done"
    if not prepared.exists():
        _prepare_seed(root, seed, settings, env, logs)
        atomic_write_text(str(prepared), "data converted, planned and preprocessed\n")
    raw = env["nnUNet_raw"]
    test = Path(find_dataset_folder(raw, ids["test"], f"nnUNet_raw={raw}"))
    test_t1ce = Path(find_dataset_folder(raw, ids["test_t1ce"], f"nnUNet_raw={raw}"))
    device = settings.device
    for model in settings.models().values():
        trainer, dataset, feed = model
        slug = model_slug(model)
        scores = root / f"scores_{slug}.json"
        if scores.exists():  # left by an earlier run of this study (--resume)
            continue
        dataset_id = str(ids[dataset])
        _step(f"train_{slug}", [command_path("nnUNetv2_train"), dataset_id, "3d_fullres", "all", "-tr", trainer,
                                "-device", device], env, logs)
        out = root / "predictions" / slug
        common = ["-o", str(out), "-d", dataset_id, "-c", "3d_fullres", "-tr", trainer, "-f", "all",
                  "-device", device, "-npp", "1", "-nps", "1"]
        if feed == "available_t1ce":
            _step(f"predict_{slug}", python_module_command(
                "nnunet_kd.inference.predict", "-i", str(root / "inputs_T1ce_numbered"), "--available", "T1ce",
                *common), env, logs)
        else:
            images = test_t1ce / "imagesTr" if feed == "t1ce_file" else test / "imagesTr"
            _step(f"predict_{slug}", [command_path("nnUNetv2_predict"), "-i", str(images)] + common, env, logs)
        evaluate_folders(str(test / "labelsTr"), str(out), str(scores), num_processes=1, progress=False)
    if settings.with_mgsd_table() and not _mgsd_table_file(root).exists():
        os.environ.update({k: env[k] for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")})
        results = env["nnUNet_results"]
        evaluate_missing_modalities(
            model_folder=os.path.join(find_dataset_folder(results, ids["full"], f"nnUNet_results={results}"),
                                      "nnUNetTrainerMGSD__nnUNetPlans__3d_fullres"),
            images_folder=str(test / "imagesTr"), labels_folder=str(test / "labelsTr"),
            output_folder=str(_mgsd_table_file(root).parent), folds=("all",), device=device, num_processes=1,
            num_processes_export=1)
    return collect_seed(root, settings)


def _prepare_seed(root: Path, seed: int, settings: StudySettings, env: Dict[str, str], logs: Path) -> None:
    """Training and test cases for one seed, converted to nnU-Net datasets; the training sets planned."""
    from nnunet_kd.experiments.synthetic import generate_dataset

    ids = DATASET_IDS
    for partial in ("train_src", "test_src", "raw", "preprocessed", "inputs_T1ce_numbered"):
        shutil.rmtree(root / partial, ignore_errors=True)  # from an interrupted preparation
    if settings.real_brats:
        _split_real_cases(Path(settings.real_brats), seed, root)
    else:
        generate_dataset(str(root / "train_src"), settings.cases, shape=tuple(settings.shape), seed=1000 * seed)
        generate_dataset(str(root / "test_src"), settings.test_cases, shape=tuple(settings.shape),
                         seed=1000 * seed + 500, start_index=settings.cases + 1)
    _step("convert_full", convert_command(root / "train_src", ids["full"]), env, logs)
    _step("convert_t1ce", convert_command(root / "train_src", ids["t1ce"], "--modalities", "T1ce"), env, logs)
    _step("convert_test", convert_command(root / "test_src", ids["test"]), env, logs)
    _step("convert_test_t1ce", convert_command(root / "test_src", ids["test_t1ce"], "--modalities", "T1ce"),
          env, logs)
    for kind in ("full", "t1ce"):
        _step(f"plan_{kind}", plan_command(ids[kind], settings.num_processes), env, logs)
    raw = env["nnUNet_raw"]
    test = Path(find_dataset_folder(raw, ids["test"], f"nnUNet_raw={raw}"))
    link_channels(test / "imagesTr", [1], root / "inputs_T1ce_numbered")


def _split_real_cases(release: Path, rotation: int, root: Path) -> None:
    """Real cases for one rotation: case number ``rotation`` (sorted) is held out, the rest train (links only)."""
    cases = sorted(d for d in release.iterdir() if d.is_dir())
    if not 2 <= len(cases) or rotation >= len(cases):
        raise StudyError(f"--real-brats {release}: rotation {rotation} needs at least {rotation + 1} case "
                         f"folders (and 2 in all); found {len(cases)}")
    for sub, chosen in (("train_src", [c for i, c in enumerate(cases) if i != rotation]),
                        ("test_src", [cases[rotation]])):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for case in chosen:
            (root / sub / case.name).symlink_to(case.resolve())


def collect_seed(root: Path, settings: StudySettings) -> dict:
    """One seed's mean scores, read back from the score files its run wrote."""
    models = {}
    for name, model in settings.models().items():
        models[name] = json.loads((root / f"scores_{model_slug(model)}.json").read_text())["mean"]
    combinations = {}
    if settings.with_mgsd_table():
        missing = json.loads(_mgsd_table_file(root).read_text())
        combinations = {c: v["mean"] for c, v in missing["combinations"].items()}
    return {"models": models, "mgsd_combinations": combinations}


def summarise(per_seed: List[dict]) -> dict:
    """Mean and standard deviation over seeds of every model's and every combination's mean Dice / HD95."""
    def stats(values: List[float]) -> Dict[str, float]:
        arr = np.asarray(values, dtype=float)
        return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0}

    out = {"models": {}, "mgsd_combinations": {}}
    for group in ("models", "mgsd_combinations"):
        for name in per_seed[0][group]:
            out[group][name] = {r: {m: stats([s[group][name][r][m] for s in per_seed]) for m in ("dice", "hd95")}
                                for r in REGIONS}
    return out


def markdown_table(summary: dict, group: str, first_column: str) -> str:
    lines = [f"| {first_column} | WT Dice | TC Dice | ET Dice | WT HD95 | TC HD95 | ET HD95 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, regions in summary[group].items():
        dice = [f"{100 * regions[r]['dice']['mean']:.1f} ± {100 * regions[r]['dice']['std']:.1f}" for r in REGIONS]
        hd = [f"{regions[r]['hd95']['mean']:.1f} ± {regions[r]['hd95']['std']:.1f}" for r in REGIONS]
        lines.append(f"| {name} | " + " | ".join(dice + hd) + " |")
    return "\n".join(lines)


def plot_models(summary: dict, png: str) -> None:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    matplotlib.rcParams.update({"font.size": 8})
    fig = Figure(figsize=(9, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    names = list(summary["models"])
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        means = [100 * summary["models"][name][r]["dice"]["mean"] for r in REGIONS]
        stds = [100 * summary["models"][name][r]["dice"]["std"] for r in REGIONS]
        ax.bar(np.arange(3) + i * width, means, width, yerr=stds, capsize=2, label=name)
    ax.set_xticks(np.arange(3) + width * (len(names) - 1) / 2, REGIONS)
    ax.set_ylabel("Dice (%) on held-out cases, mean ± sd over seeds")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def run_study(workdir: str, seeds: Sequence[int], settings: StudySettings, resume: bool = False,
              markdown: Optional[str] = None) -> dict:
    """Train and score the study's models for every seed in ``workdir``; write and return the report.

    ``resume``: keep ``workdir`` and skip what an earlier run with the same settings finished.
    ``markdown``: also write the Markdown tables to this file.
    """
    work = Path(workdir).resolve()
    record = settings.resume_record()
    settings_file = work / "study_settings.json"
    if resume and settings_file.exists():
        earlier = json.loads(settings_file.read_text())
        changed = {k: (earlier.get(k), v) for k, v in record.items() if earlier.get(k) != v}
        if changed:
            raise StudyError(f"--resume: {workdir} was run with other settings: " + ", ".join(
                f"{k} was {old!r}, now {new!r}" for k, (old, new) in changed.items()))
    elif work.exists() and not resume:
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_json(record, str(settings_file))
    budget = budget_variables(settings.epochs, settings.iterations, max(1, settings.iterations // 5),
                              settings.device, settings.num_processes)
    start = time.time()
    per_seed = []
    for seed in seeds:
        print(f"[study] {'held-out case' if settings.real_brats else 'seed'} {seed}", flush=True)
        per_seed.append(_seed_run(work, seed, settings, budget))
    return write_report(work, list(seeds), per_seed, settings, time.time() - start, markdown)


def write_report(work: Path, seeds: List[int], per_seed: List[dict], settings: StudySettings,
                 wall_time_s: float, markdown: Optional[str] = None) -> dict:
    """study.json, study.md (and ``markdown``), study_dice.png from the seeds' scores."""
    s = settings
    summary = summarise(per_seed)
    result = {"date": date.today().isoformat(), "device": s.device, "host": platform.node(),
              "command": " ".join(sys.argv), "seeds": list(seeds), "cases": s.cases,
              "test_cases": s.test_cases, "shape": list(s.shape), "epochs": s.epochs,
              "iterations_per_epoch": s.iterations, "ablations": s.ablations,
              "only": None if s.only is None else list(s.only), "wall_time_s": wall_time_s,
              "per_seed": per_seed, "summary": summary}
    atomic_write_json(result, str(work / "study.json"))
    plot_models(summary, str(work / "study_dice.png"))
    data = (f"real cases in {s.real_brats}; rotations {list(seeds)} (each holds out that case and trains on "
            f"the others)" if s.real_brats else
            f"seeds {list(seeds)}; {s.cases} training and {s.test_cases} held-out synthetic cases of "
            f"{'x'.join(map(str, s.shape))} voxels per seed")
    md = (f"{data[0].upper() + data[1:]}; {s.epochs} epochs x {s.iterations} "
          f"iterations per model; device {s.device}"
          f"{f'; {wall_time_s:.0f} s' if np.isfinite(wall_time_s) else ''}.\n\n"
          "Held-out cases, T1ce-only input unless stated (Dice %, HD95 mm; mean ± sd over seeds):\n\n"
          + markdown_table(summary, "models", "model") + "\n")
    if summary["mgsd_combinations"]:
        md += ("\nMGSD over all 15 modality combinations:\n\n"
               + markdown_table(summary, "mgsd_combinations", "available modalities") + "\n")
    atomic_write_text(str(work / "study.md"), md)
    if markdown:
        atomic_write_text(markdown, md)
    print(md)
    return result


def collect_report(workdirs: Sequence[str], workdir: str, settings: StudySettings,
                   markdown: Optional[str] = None) -> dict:
    """Report in ``workdir`` over the seed folders several runs left in ``workdirs`` (e.g. seeds run in
    parallel on different machines)."""
    seed_dirs = sorted(d for w in workdirs for d in Path(w).resolve().glob("seed*") if d.is_dir())
    if not seed_dirs:
        raise StudyError(f"no seedN folders in {' '.join(workdirs)}")
    try:
        per_seed = [collect_seed(d, settings) for d in seed_dirs]
    except FileNotFoundError as e:
        raise StudyError(f"incomplete seed folder: {e.filename} is missing") from None
    work = Path(workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    seeds = [int(d.name[len("seed"):]) for d in seed_dirs]
    return write_report(work, seeds, per_seed, settings, float("nan"), markdown)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="kd_study_output", help="folder for all study files (replaced)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cases", type=int, default=16, help="synthetic training cases per seed")
    p.add_argument("--test-cases", type=int, default=8, help="synthetic held-out cases per seed")
    p.add_argument("--shape", type=int, nargs=3, default=(40, 40, 40))
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--iterations", type=int, default=40, help="iterations per epoch")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.add_argument("-np", "--num-processes", type=int, default=2)
    p.add_argument("--markdown", help="also write the Markdown tables to this file")
    p.add_argument("--toy", action="store_true", help="smallest run that exercises every step (CI)")
    p.add_argument("--real-brats", metavar="DIR", help="real cases (one BraTS release folder) instead of "
                   "synthetic ones: each --seeds value N holds out case N and trains on the others "
                   "(e.g. --seeds 0 1 2 3 rotates over 4 cases)")
    p.add_argument("--ablations", action="store_true", help="also train the ablation variants (MTCM-KD with KD "
                   "from epoch 0, with T^2 scaling; MGSD with a lighter modality-level term)")
    p.add_argument("--only", nargs="+", metavar="TRAINER_DATASET", help="train just these models, named as in "
                   "the score files: " + ", ".join(model_slug(m) for m in {**MODELS, **ABLATIONS}.values()))
    p.add_argument("--resume", action="store_true", help="keep --workdir and skip what an earlier run with the "
                   "same settings finished (prepared data, scored models, the MGSD combination table)")
    p.add_argument("--collect", nargs="+", metavar="WORKDIR", help="do not train: combine the seed folders "
                   "(seedN) that earlier runs left in these work dirs into one report in --workdir")
    return p


@command(StudyError, CommandFailed)
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nnunet_kd_study``: parse the options, then run the study or collect earlier runs into one report."""
    p = _parser()
    args = p.parse_args(argv)
    if args.toy:
        args.cases, args.test_cases, args.shape, args.epochs, args.iterations = 2, 1, (32, 32, 32), 1, 1
    if args.cases < 2 or args.test_cases < 1:
        p.error("--cases must be at least 2 and --test-cases at least 1")
    known = [model_slug(m) for m in study_models(args.ablations).values()]
    unknown = [slug for slug in args.only or () if slug not in known]
    if unknown:
        p.error(f"--only: unknown model(s) {', '.join(unknown)}; choose from {', '.join(known)}"
                f"{'' if args.ablations else ' (the ablation variants need --ablations)'}")
    settings = StudySettings(
        cases=args.cases, test_cases=args.test_cases, shape=tuple(args.shape), epochs=args.epochs,
        iterations=args.iterations, device=args.device or default_device(), real_brats=args.real_brats,
        num_processes=args.num_processes, ablations=args.ablations,
        only=None if args.only is None else tuple(args.only))
    if args.collect:
        collect_report(args.collect, args.workdir, settings, args.markdown)
    else:
        run_study(args.workdir, args.seeds, settings, args.resume, args.markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
