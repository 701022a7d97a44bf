"""nnunet_kd_demo: the whole workflow on a small synthetic BraTS-like dataset, through the real commands.

generate synthetic cases -> nnunet_kd_convert_brats -> nnUNetv2_plan_and_preprocess ->
nnUNetv2_train -tr nnUNetTrainerMTCMKD -> stock nnUNetv2_predict on T1ce alone ->
nnUNetv2_train -tr nnUNetTrainerMGSD -> nnunet_kd_predict with FLAIR and T1 missing ->
nnunet_kd_evaluate on held-out cases. Uses the GPU when one is present. At the end it prints the README's
commands (:func:`next_commands`) with the demo's dataset ids and folders, ready to paste into a shell.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from nnunet_kd.cli import command
from nnunet_kd.experiments.datasets import convert_command, link_channels, plan_command
from nnunet_kd.experiments.runner import (CommandFailed, budget_variables, command_path, default_device,
                                          nnunet_environment, python_module_command, run_command)
from nnunet_kd.paths import find_dataset_folder

TRAIN_ID, HELD_OUT_ID, HELD_OUT_T1CE_ID = 990, 991, 992
#: Written into the work folder first thing: only a folder holding it is ever deleted by a later demo.
MARKER = ".nnunet_kd_demo"
#: Sub-folder of the work folder where the printed commands write, apart from the demo's own predictions.
NEXT_OUTPUTS = "next_steps"
#: The line before the printed commands; everything after it is the commands, one per line.
NEXT_HEADER = "[nnunet_kd_demo] the README's commands on the demo's data, to paste into a shell in this environment:"


class DemoError(Exception):
    """Bad input to the demo (e.g. a --workdir the demo did not make)."""


def claim_workdir(work: Path, marker: str, tool: str, error: "type[Exception]", keep: bool = False) -> None:
    """Make ``work`` the work folder of ``tool``: create it, take over an empty folder, or, if ``marker`` is in
    it (an earlier run of ``tool`` made it), empty it, or with ``keep`` (resuming) leave it as it is.

    Anything else (a file, a link, a folder with files but no marker) raises ``error`` and is never touched.
    """
    if work.exists() or work.is_symlink():
        if not work.is_dir() or work.is_symlink():
            raise error(f"--workdir {work} exists and is not a folder")
        if (work / marker).is_file():
            if not keep:
                shutil.rmtree(work)
        elif any(work.iterdir()):
            raise error(f"--workdir {work} exists and was not made by {tool}: it holds files {tool} did not "
                        f"write and no {marker} file; it is left as it is: choose a new or empty folder")
    work.mkdir(parents=True, exist_ok=True)


def prepare_workdir(work: Path) -> None:
    """Create ``work`` (marked as the demo's) or empty it if an earlier demo made it; DemoError otherwise.

    An existing empty folder is taken over; a folder with anything in it but no marker is never touched.
    """
    claim_workdir(work, MARKER, "nnunet_kd_demo", DemoError)
    (work / MARKER).write_text("made by nnunet_kd_demo; the next demo run with this --workdir deletes "
                               "this folder\n")


def _step(name: str, cmd: List[str], env: Dict[str, str], log_dir: Path) -> None:
    """One pipeline step, its output in ``log_dir/name.log`` (CommandFailed with the log's tail on failure)."""
    run_command(cmd, env, log_file=log_dir / f"{name}.log", echo=f"[nnunet_kd_demo] {name}:")


def next_commands(work: Path, env: Mapping[str, str], fold: str, device: str) -> List[str]:
    """The shell lines the demo prints at its end, each runnable as printed after the ones before it.

    First the nnU-Net folder exports and the trainer lookup, then, on the held-out datasets: stock
    ``nnUNetv2_predict`` of the MTCM-KD student from T1ce alone, ``nnunet_kd_predict`` of MGSD from T1ce +
    FLAIR, both scored with ``nnunet_kd_evaluate``, and ``nnunet_kd_evaluate_missing`` over all 15
    combinations. Outputs go to ``work/next_steps``. ``-device`` is always given: nnU-Net's own commands
    default to cuda and stop on a machine without a GPU.
    """
    q = shlex.quote
    raw = env["nnUNet_raw"]
    held_out = Path(find_dataset_folder(raw, HELD_OUT_ID, f"nnUNet_raw={raw}"))
    held_out_t1ce = Path(find_dataset_folder(raw, HELD_OUT_T1CE_ID, f"nnUNet_raw={raw}"))
    out = work / NEXT_OUTPUTS
    labels = q(str(held_out / "labelsTr"))
    model = f"-d {TRAIN_ID} -c 3d_fullres -f {fold} -device {device}"
    mtcmkd, mgsd = out / "mtcmkd_T1ce", out / "mgsd_T1ce_FLAIR"
    lines = [f"export {var}={q(env[var])}" for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")]
    lines += [
        'eval "$(nnunet_kd_env)"',
        f"nnUNetv2_predict -i {q(str(held_out_t1ce / 'imagesTr'))} -o {q(str(mtcmkd))} -tr nnUNetTrainerMTCMKD "
        f"{model}",
        f"nnunet_kd_evaluate -r {labels} -p {q(str(mtcmkd))} -o {q(str(out / 'mtcmkd_T1ce.json'))}",
        f"nnunet_kd_predict -i {q(str(work / 'inputs_T1ce_FLAIR'))} -o {q(str(mgsd))} -tr nnUNetTrainerMGSD {model} "
        "--available T1ce FLAIR",
        f"nnunet_kd_evaluate -r {labels} -p {q(str(mgsd))} -o {q(str(out / 'mgsd_T1ce_FLAIR.json'))}",
        f"nnunet_kd_evaluate_missing -tr nnUNetTrainerMGSD {model} -i {q(str(held_out / 'imagesTr'))} "
        f"-r {labels} -o {q(str(out / 'missing_modalities'))}",
    ]
    return lines


def run_demo(workdir: str, num_cases: int = 6, num_held_out: int = 2, shape: Sequence[int] = (48, 48, 48),
             epochs: int = 2, iterations: int = 6, device: Optional[str] = None, seed: int = 0) -> dict:
    """Run the demo in ``workdir`` (created; an existing demo there is replaced) and return the scores."""
    from nnunet_kd.evaluation.evaluate import evaluate_folders
    from nnunet_kd.experiments.synthetic import generate_dataset

    work = Path(workdir).resolve()
    prepare_workdir(work)
    logs = work / "logs"
    logs.mkdir()
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

    def score(folder: str, model_name: str) -> Dict[str, Dict[str, float]]:
        return evaluate_folders(str(held_out / "labelsTr"), str(predictions / folder),
                                str(work / f"scores_{folder}.json"), num_processes=1, progress=False,
                                model=model_name)["mean"]

    def train(trainer: str) -> List[str]:
        return [command_path("nnUNetv2_train"), str(TRAIN_ID), "3d_fullres", fold, "-tr", trainer, "-device", device]

    _step("train_mtcmkd", train("nnUNetTrainerMTCMKD"), env, logs)
    _step("predict_mtcmkd_t1ce_only", [command_path("nnUNetv2_predict"), "-i", str(held_out_t1ce / "imagesTr"),
                                       "-o", str(predictions / "mtcmkd_T1ce"), "-tr", "nnUNetTrainerMTCMKD"] + model,
          env, logs)
    name = "MTCM-KD student, T1ce only"
    scores[name] = score("mtcmkd_T1ce", name)

    _step("train_mgsd", train("nnUNetTrainerMGSD"), env, logs)
    link_channels(held_out / "imagesTr", [1, 3], work / "inputs_T1ce_FLAIR")
    _step("predict_mgsd_t1ce_flair", python_module_command(
        "nnunet_kd.inference.predict", "-i", str(work / "inputs_T1ce_FLAIR"), "-o",
        str(predictions / "mgsd_T1ce_FLAIR"), "-tr", "nnUNetTrainerMGSD", *model, "--available", "T1ce", "FLAIR"),
          env, logs)
    name = "MGSD, T1ce + FLAIR (T1, T2 missing)"
    scores[name] = score("mgsd_T1ce_FLAIR", name)

    commands = next_commands(work, env, fold, device)
    report = {"device": device, "epochs": epochs, "iterations_per_epoch": iterations, "scores": scores,
              "next_commands": commands}
    (work / "demo_report.json").write_text(json.dumps(report, indent=2))
    print("\n[nnunet_kd_demo] held-out scores (a tiny training budget: the numbers show the pipeline runs, "
          "not how well the methods work)")
    print(score_table(scores))
    print(f"[nnunet_kd_demo] report: {work / 'demo_report.json'}; box plots: {work}/scores_*_WT.png")
    print(f"\n[nnunet_kd_demo] datasets: {TRAIN_ID} training, {HELD_OUT_ID} held out, {HELD_OUT_T1CE_ID} held out "
          f"T1ce only; the commands below write to {work / NEXT_OUTPUTS}")
    print(NEXT_HEADER)
    print("\n".join(commands), flush=True)
    return report


def score_table(scores: Dict[str, Dict[str, Dict[str, float]]]) -> str:
    """The console table: one row per model, Dice and HD95 (mm) for WT, TC, ET."""
    regions = ("WT", "TC", "ET")
    header = f"{'model and inputs':40s} " + " ".join(f"{r + ' Dice':>8s} {r + ' HD95':>8s}" for r in regions)
    rows = [f"{name:40s} " + " ".join(f"{mean[r]['dice']:8.3f} {mean[r]['hd95']:8.2f}" for r in regions)
            for name, mean in scores.items()]
    return "\n".join([header, *rows])


@command(CommandFailed, DemoError)
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nnunet_kd_demo``: parse the options and run the demo."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="nnunet_kd_demo_output", help="folder for all demo files "
                        "(default ./nnunet_kd_demo_output; a folder an earlier demo made is replaced, "
                        "any other non-empty folder is refused)")
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
