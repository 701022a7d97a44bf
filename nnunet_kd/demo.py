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
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from nnunet_kd.paths import with_trainer_path

TRAIN_ID, HELD_OUT_ID, HELD_OUT_T1CE_ID = 990, 991, 992


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def _run(step: str, cmd: List[str], env: Dict[str, str], log_dir: Path) -> None:
    """Run one pipeline step, its output in a log file; on failure show the log's tail and stop."""
    log = log_dir / f"{step}.log"
    print(f"[nnunet_kd_demo] {step}: {' '.join(cmd)}", flush=True)
    start = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text()[-4000:]
        raise SystemExit(f"error: step '{step}' failed (exit {proc.returncode}); log: {log}\n{tail}")
    print(f"[nnunet_kd_demo]   done in {time.time() - start:.0f} s (log: {log})", flush=True)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _link_channels(images: Path, channels: Sequence[int], out: Path) -> None:
    """An input folder holding only some channel files of each case (symbolic links, nothing copied)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(images.glob("*.nii.gz")):
        if int(f.name[-len("0000.nii.gz"):-len(".nii.gz")]) in channels:
            (out / f.name).symlink_to(f.resolve())


def run_demo(workdir: str, num_cases: int = 6, num_held_out: int = 2, shape: Sequence[int] = (48, 48, 48),
             epochs: int = 2, iterations: int = 6, device: Optional[str] = None, seed: int = 0) -> dict:
    """Run the demo in ``workdir`` (created; an existing demo there is replaced) and return the scores."""
    from nnunet_kd.evaluation import evaluate_folders
    from nnunet_kd.synthetic import generate_dataset

    work = Path(workdir).resolve()
    if work.exists():
        shutil.rmtree(work)
    logs = work / "logs"
    logs.mkdir(parents=True)
    device = device or _default_device()
    env = with_trainer_path()
    env.update({"nnUNet_raw": str(work / "nnUNet_raw"), "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
                "nnUNet_results": str(work / "nnUNet_results"), "nnUNet_kd_num_epochs": str(epochs),
                "nnUNet_kd_iterations_per_epoch": str(iterations), "nnUNet_kd_val_iterations": "2",
                "nnUNet_compile": env.get("nnUNet_compile", "0")})
    if device == "cpu":
        env.setdefault("nnUNet_n_proc_DA", "2")
        env.setdefault("nnUNet_def_n_proc", "2")
    print(f"[nnunet_kd_demo] working in {work} on {device}", flush=True)

    generate_dataset(str(work / "synthetic_train"), num_cases, shape=tuple(shape), seed=seed, progress=True)
    generate_dataset(str(work / "synthetic_held_out"), num_held_out, shape=tuple(shape), seed=seed + 1000,
                     start_index=num_cases + 1, progress=True)
    convert = _bin("nnunet_kd_convert_brats")
    _run("convert", [convert, "-i", str(work / "synthetic_train"), "-d", str(TRAIN_ID)], env, logs)
    _run("convert_held_out", [convert, "-i", str(work / "synthetic_held_out"), "-d", str(HELD_OUT_ID)], env, logs)
    _run("convert_held_out_t1ce", [convert, "-i", str(work / "synthetic_held_out"), "-d", str(HELD_OUT_T1CE_ID),
                                   "--modalities", "T1ce"], env, logs)
    _run("plan_and_preprocess", [_bin("nnUNetv2_plan_and_preprocess"), "-d", str(TRAIN_ID), "-c", "3d_fullres",
                                 "-np", "2"], env, logs)
    fold = "all" if num_cases < 5 else "0"
    raw = work / "nnUNet_raw"
    held_out = next(raw.glob(f"Dataset{HELD_OUT_ID}_*"))
    held_out_t1ce = next(raw.glob(f"Dataset{HELD_OUT_T1CE_ID}_*"))
    predictions = work / "predictions"
    scores = {}

    _run("train_mtcmkd", [_bin("nnUNetv2_train"), str(TRAIN_ID), "3d_fullres", fold, "-tr", "nnUNetTrainerMTCMKD",
                          "-device", device], env, logs)
    _run("predict_mtcmkd_t1ce_only", [_bin("nnUNetv2_predict"), "-i", str(held_out_t1ce / "imagesTr"), "-o",
                                      str(predictions / "mtcmkd_T1ce"), "-d", str(TRAIN_ID), "-c", "3d_fullres",
                                      "-tr", "nnUNetTrainerMTCMKD", "-f", fold, "-device", device], env, logs)
    scores["MTCM-KD student, T1ce only"] = evaluate_folders(
        str(held_out / "labelsTr"), str(predictions / "mtcmkd_T1ce"), str(work / "scores_mtcmkd_T1ce.json"),
        num_processes=1, progress=False)["mean"]

    _run("train_mgsd", [_bin("nnUNetv2_train"), str(TRAIN_ID), "3d_fullres", fold, "-tr", "nnUNetTrainerMGSD",
                        "-device", device], env, logs)
    _link_channels(held_out / "imagesTr", [1, 3], work / "inputs_T1ce_FLAIR")
    _run("predict_mgsd_t1ce_flair", [_bin("nnunet_kd_predict"), "-i", str(work / "inputs_T1ce_FLAIR"), "-o",
                                     str(predictions / "mgsd_T1ce_FLAIR"), "-d", str(TRAIN_ID), "-c", "3d_fullres",
                                     "-tr", "nnUNetTrainerMGSD", "-f", fold, "-device", device,
                                     "--available", "T1ce", "FLAIR"], env, logs)
    scores["MGSD, T1ce + FLAIR (T1, T2 missing)"] = evaluate_folders(
        str(held_out / "labelsTr"), str(predictions / "mgsd_T1ce_FLAIR"), str(work / "scores_mgsd_T1ce_FLAIR.json"),
        num_processes=1, progress=False)["mean"]

    report = {"device": device, "epochs": epochs, "iterations_per_epoch": iterations, "scores": scores}
    (work / "demo_report.json").write_text(json.dumps(report, indent=2))
    print("\n[nnunet_kd_demo] held-out scores (a tiny training budget: the numbers show the pipeline runs, "
          "not how well the methods work)")
    print(f"{'model and inputs':45s} {'WT Dice':>8s} {'TC Dice':>8s} {'ET Dice':>8s}")
    for name, mean in scores.items():
        print(f"{name:45s} " + " ".join(f"{mean[r]['dice']:8.3f}" for r in ("WT", "TC", "ET")))
    print(f"[nnunet_kd_demo] report: {work / 'demo_report.json'}; box plots: {work}/scores_*_WT.png")
    return report


def main(argv: Optional[Sequence[str]] = None) -> None:
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


if __name__ == "__main__":
    main()
