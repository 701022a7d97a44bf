"""nnunet_kd_demo: the whole workflow on a small synthetic BraTS-like dataset, through the real commands.

generate synthetic cases -> nnunet_kd_convert_brats -> nnUNetv2_plan_and_preprocess ->
nnUNetv2_train -tr nnUNetTrainerMTCMKD -> stock nnUNetv2_predict on T1ce alone ->
nnUNetv2_train -tr nnUNetTrainerMGSD -> nnunet_kd_predict with FLAIR and T1 missing ->
nnunet_kd_evaluate on held-out cases. Uses the GPU when one is present.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nnunet_kd.cli import command
from nnunet_kd.experiments.datasets import convert_command, link_channels, plan_command
from nnunet_kd.experiments.runner import (CommandFailed, budget_variables, command_path, default_device,
                                          nnunet_environment, python_module_command, run_command)
from nnunet_kd.paths import find_dataset_folder

TRAIN_ID, HELD_OUT_ID, HELD_OUT_T1CE_ID = 990, 991, 992


def _step(name: str, cmd: List[str], env: Dict[str, str], log_dir: Path) -> None:
    """One pipeline step, its output in ``log_dir/name.log`` (CommandFailed with the log's tail on failure)."""
    run_command(cmd, env, log_file=log_dir / f"{name}.log", echo=f"[nnunet_kd_demo] {name}:")


def run_demo(workdir: str, num_cases: int = 6, num_held_out: int = 2, shape: Sequence[int] = (48, 48, 48),
             epochs: int = 2, iterations: int = 6, device: Optional[str] = None, seed: int = 0) -> dict:
    """Run the demo in ``workdir`` (created; an existing demo there is replaced) and return the scores."""
    from nnunet_kd.evaluation.evaluate import evaluate_folders
    from nnunet_kd.experiments.synthetic import generate_dataset

    work = Path(workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    logs = work / "logs"
    logs.mkdir(parents=True)
    device = device or default_device()
    env = nnunet_environment(work, folder_prefix="nnUNet_",
                             **budget_variables(epochs, iterations, 2, device, cpu_processes=2))
    print(f"[nnunet_kd_demo] working in {work} on {device}", flush=True)

    generate_dataset(str(work / "synthetic_train"), num_cases, shape=tuple(shape), seed=seed, progress=True)
    generate_dataset(str(work / "synthetic_held_out"), num_held_out, shape=tuple(shape), seed=seed + 1000,
                     start_index=num_cases + 1, progress=True)
    _step("convert", convert_command(work / "synthetic_train", TRAIN_ID), env, logs)
    _step("convert_held_out", convert_command(work / "synthetic_held_out", HELD_OUT_ID), env, logs)
    _step("convert_held_out_t1ce", convert_command(work / "synthetic_held_out", HELD_OUT_T1CE_ID,
                                                   "--modalities", "T1ce"), env, logs)
    _step("plan_and_preprocess", plan_command(TRAIN_ID, 2), env, logs)
    fold = "all" if num_cases < 5 else "0"
    raw = env["nnUNet_raw"]
    held_out = Path(find_dataset_folder(raw, HELD_OUT_ID, f"nnUNet_raw={raw}"))
    held_out_t1ce = Path(find_dataset_folder(raw, HELD_OUT_T1CE_ID, f"nnUNet_raw={raw}"))
    predictions = work / "predictions"
    model = ["-d", str(TRAIN_ID), "-c", "3d_fullres", "-f", fold, "-device", device]
    scores = {}

    def score(folder: str) -> Dict[str, Dict[str, float]]:
        return evaluate_folders(str(held_out / "labelsTr"), str(predictions / folder),
                                str(work / f"scores_{folder}.json"), num_processes=1, progress=False)["mean"]

    def train(trainer: str) -> List[str]:
        return [command_path("nnUNetv2_train"), str(TRAIN_ID), "3d_fullres", fold, "-tr", trainer, "-device", device]

    _step("train_mtcmkd", train("nnUNetTrainerMTCMKD"), env, logs)
    _step("predict_mtcmkd_t1ce_only", [command_path("nnUNetv2_predict"), "-i", str(held_out_t1ce / "imagesTr"),
                                       "-o", str(predictions / "mtcmkd_T1ce"), "-tr", "nnUNetTrainerMTCMKD"] + model,
          env, logs)
    scores["MTCM-KD student, T1ce only"] = score("mtcmkd_T1ce")

    _step("train_mgsd", train("nnUNetTrainerMGSD"), env, logs)
    link_channels(held_out / "imagesTr", [1, 3], work / "inputs_T1ce_FLAIR")
    _step("predict_mgsd_t1ce_flair", python_module_command(
        "nnunet_kd.inference.predict", "-i", str(work / "inputs_T1ce_FLAIR"), "-o",
        str(predictions / "mgsd_T1ce_FLAIR"), "-tr", "nnUNetTrainerMGSD", *model, "--available", "T1ce", "FLAIR"),
          env, logs)
    scores["MGSD, T1ce + FLAIR (T1, T2 missing)"] = score("mgsd_T1ce_FLAIR")

    report = {"device": device, "epochs": epochs, "iterations_per_epoch": iterations, "scores": scores}
    (work / "demo_report.json").write_text(json.dumps(report, indent=2))
    print("\n[nnunet_kd_demo] held-out scores (a tiny training budget: the numbers show the pipeline runs, "
          "not how well the methods work)")
    print(f"{'model and inputs':45s} {'WT Dice':>8s} {'TC Dice':>8s} {'ET Dice':>8s}")
    for name, mean in scores.items():
        print(f"{name:45s} " + " ".join(f"{mean[r]['dice']:8.3f}" for r in ("WT", "TC", "ET")))
    print(f"[nnunet_kd_demo] report: {work / 'demo_report.json'}; box plots: {work}/scores_*_WT.png")
    return report


@command(CommandFailed)
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nnunet_kd_demo``: parse the options and run the demo."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="nnunet_kd_demo_output", help="folder for all demo files "
                        "(default ./nnunet_kd_demo_output; replaced if it exists)")
    parser.add_argument("--cases", type=int, default=6, help="synthetic training cases (default 6)")
    parser.add_argument("--held-out", type=int, default=2, help="synthetic held-out cases (default 2)")
    parser.add_argument("--shape", type=int, nargs=3, default=(48, 48, 48), help="volume shape (default 48 48 48)")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs per trainer (default 2)")
    parser.add_argument("--iterations", type=int, default=6, help="iterations per epoch (default 6)")
    parser.add_argument("--device", choices=["cuda", "cpu", "mps"], default=None, help="default: cuda if available")
    args = parser.parse_args(argv)
    for name in ("cases", "held_out", "epochs", "iterations"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if min(args.shape) < 24:
        parser.error("--shape: each side must be at least 24 voxels")
    run_demo(args.workdir, args.cases, args.held_out, args.shape, args.epochs, args.iterations, args.device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
