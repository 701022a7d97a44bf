"""Evaluation of a model under every combination of missing MRI modalities.

Command line::

    nnunet_kd_evaluate_missing -d 137 -c 3d_fullres -tr nnUNetTrainerMGSD -f 0 -i IMAGES -r LABELS -o OUT \\
        [-p plans] [-m MODEL_FOLDER] [-chk ...] [-device ...] [--labels nnunet|brats2021|brats2023] [-np N]
        [--metrics legacy|lesionwise|both] [--cohort GLI-2024]

``IMAGES`` holds every channel of every case (``CASE_0000`` .. ``CASE_0003``). For each of the
``2**M - 1`` non-empty modality combinations (15 for T1, T1ce, T2, FLAIR; order and names of
:func:`nnunet_kd.brats.modality_combinations`, e.g. ``T1ce+FLAIR``) the cases are predicted from only
those channels (the others zero-filled after normalisation, see :mod:`nnunet_kd.inference`; the file
subset is passed in memory, nothing is copied), with one network loaded once. Outputs in ``OUT``:

* ``predictions/<combination>/CASE.nii.gz``
* ``missing_modalities.json``: ``{"combinations": {combo: {"modalities", "mean", "cases"}},
  "mean_over_combinations": {region: {"dice", "hd95"}}, ...}``
* ``missing_modalities.csv``: columns combination, region, dice, hd95 (per combination and region,
  then the ``mean`` rows: the mean over combinations)
* ``missing_modalities_dice.png`` and ``missing_modalities_hd95.png``: heat maps of the
  combinations x (WT, TC, ET) table plus the mean row.

Dice and HD95 follow :mod:`nnunet_kd.evaluation.metrics` (BraTS 2018-2021 conventions). With ``--metrics
lesionwise`` or ``both`` each combination also gets ``"lesionwise"`` (:mod:`nnunet_kd.evaluation.modes`, the
official BraTS-evaluation package) and ``missing_modalities_lesionwise.csv`` its means; ``lesionwise`` alone
skips the legacy outputs.
"""
from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from nnunet_kd.atomic import atomic_write_json
from nnunet_kd.brats import (REGIONS, channel_names_of, display_name, modality_combinations, modality_label,
                             modality_order)
from nnunet_kd.cli import command
from nnunet_kd.evaluation.evaluate import default_num_processes, evaluate_pairs, list_cases, read_segmentation
from nnunet_kd.evaluation.metrics import (EvaluationError, add_labels_argument, add_metrics_arguments, label_mapping,
                                          mean_metrics, mean_over_combinations, to_nnunet_labels)
from nnunet_kd.evaluation.modes import (check_mode, lesionwise_pairs, require_official_package, resolve_cohort,
                                       write_lesionwise_table)
from nnunet_kd.evaluation.plots import plot_heatmap
from nnunet_kd.evaluation.tables import write_region_table
from nnunet_kd.inference.inputs import FilesByChannel, PredictionError, find_cases
from nnunet_kd.inference.models import load_predictor, model_dataset_json
from nnunet_kd.inference.predict import Job, add_model_arguments, device_from_args, model_from_args, run_jobs

if TYPE_CHECKING:  # torch and nnU-Net are imported only when a network is loaded
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

OUTPUT_STEM = "missing_modalities"
MEAN_ROW = "mean"

Combination = Tuple[str, List[int]]  # (name such as T1ce+FLAIR, channels)


def _safe_folder_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "+-_." else "_" for ch in name)


# --------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------
def _complete_cases(images_folder: str, channel_names: Mapping[int, str],
                    file_ending: str) -> Dict[str, FilesByChannel]:
    """The cases of ``images_folder``; PredictionError unless each has every channel of the dataset."""
    cases = find_cases(images_folder, file_ending)
    for case, files in sorted(cases.items()):
        absent = [c for c in channel_names if c not in files]
        if absent:
            raise PredictionError(
                f"case {case} lacks "
                + ", ".join(f"{display_name(channel_names[c])} ({case}_{c:04d}{file_ending})" for c in absent)
                + f" in {images_folder!r}; the missing-modality evaluation needs every channel of every case"
            )
        extra = sorted(set(files) - set(channel_names))
        if extra:
            raise PredictionError(f"case {case}: channel {extra[0]:04d} is not in the model's dataset "
                                  f"({modality_label(channel_names, channel_names)})")
    return cases


def _references(labels_folder: str, cases: Sequence[str]) -> Dict[str, str]:
    """``{case: reference file}`` for every case; EvaluationError naming the cases without one."""
    refs = list_cases(labels_folder, "reference folder")
    no_ref = sorted(set(cases) - set(refs))
    if no_ref:
        raise EvaluationError(f"no reference segmentation in {labels_folder!r} for {len(no_ref)} case(s): "
                              + ", ".join(f"{c} (expected {c}.nii.gz)" for c in no_ref))
    return {c: refs[c] for c in sorted(cases)}


def _references_in_nnunet_labels(ref_files: Mapping[str, str], labels: str, folder: str) -> Dict[str, str]:
    """References as nnU-Net label files (predictions are always in nnU-Net labels).

    For ``labels == 'nnunet'`` the originals are used; otherwise converted label maps are written to
    ``folder`` so that :func:`nnunet_kd.evaluation.evaluate.evaluate_pairs` scores both in one convention.
    """
    if labels == "nnunet":
        return dict(ref_files)
    import SimpleITK as sitk

    os.makedirs(folder, exist_ok=True)
    out = {}
    for case, path in sorted(ref_files.items()):
        image, array = read_segmentation(path)
        new = sitk.GetImageFromArray(to_nnunet_labels(array, path, labels))
        new.CopyInformation(image)
        target = os.path.join(folder, case + ".nii.gz")
        sitk.WriteImage(new, target, True)
        out[case] = target
    return out


def _select_combinations(channel_names: Mapping[int, str], names: Optional[Sequence[str]]) -> List[Combination]:
    """Every combination, or those named in ``names`` (case-insensitive), in the standard order."""
    combos = modality_combinations(channel_names)
    if names is None:
        return combos
    known = {name.lower() for name, _ in combos}
    unknown = [c for c in names if c.lower() not in known]
    if unknown:
        raise PredictionError(f"unknown combination(s) {', '.join(unknown)}; known: "
                              + ", ".join(n for n, _ in combos))
    wanted = {c.lower() for c in names}
    return [(n, ch) for n, ch in combos if n.lower() in wanted]


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------
def write_combinations_csv(results: Mapping, path: str) -> str:
    """Columns combination, region, dice, hd95; per combination and region, then the ``mean`` rows."""
    rows = [(combo, entry["mean"]) for combo, entry in results["combinations"].items()]
    rows.append((MEAN_ROW, results["mean_over_combinations"]))
    return write_region_table(path, "combination", rows)


def write_outputs(results: Mapping, output_folder: str, plots: bool = True) -> List[str]:
    """JSON, CSV and (if ``plots``) the Dice and HD95 heat maps; returns the paths written."""
    stem = os.path.join(output_folder, OUTPUT_STEM)
    atomic_write_json(results, stem + ".json")
    written = [stem + ".json"]
    combos = results["combinations"]
    if any("lesionwise" in e for e in combos.values()):
        written.append(write_lesionwise_table(stem + "_lesionwise.csv", "combination",
                                              [(c, e["lesionwise"]["mean"]) for c, e in combos.items()]))
    if "mean_over_combinations" not in results:  # lesion-wise only
        return written
    written.append(write_combinations_csv(results, stem + ".csv"))
    if plots:
        written.append(plot_heatmap(results, "dice", stem + "_dice.png"))
        written.append(plot_heatmap(results, "hd95", stem + "_hd95.png"))
    return written


# --------------------------------------------------------------------------------------
# the evaluation
# --------------------------------------------------------------------------------------
def _predict_combinations(predictor: "nnUNetPredictor", cases: Mapping[str, FilesByChannel],
                          combos: Sequence[Combination], folders: Mapping[str, str], num_processes_export: int,
                          num_processes_preprocessing: int, progress: bool, verbose: bool) -> None:
    """One pass over all combinations and cases: one network, one export pool."""
    from tqdm import tqdm

    jobs: List[Job] = []
    combo_of_job: List[str] = []
    for name, channels in combos:
        for case in sorted(cases):
            jobs.append((case, {c: cases[case][c] for c in channels}, os.path.join(folders[name], case)))
            combo_of_job.append(name)
    with tqdm(total=len(combos), desc="modality combinations", unit="combination", disable=not progress) as bar:
        state = {"current": None}

        def on_item(index: int, job: Job) -> None:
            name = combo_of_job[index]
            if name != state["current"]:
                if state["current"] is not None:
                    bar.update(1)
                state["current"] = name
                bar.set_postfix_str(name)

        run_jobs(predictor, jobs, False, num_processes_export, num_processes_preprocessing, on_item=on_item,
                 quiet=not verbose)
        if state["current"] is not None:
            bar.update(1)


def evaluate_missing_modalities(
    model_folder: str,
    images_folder: str,
    labels_folder: str,
    output_folder: str,
    folds: Optional[Sequence[Union[int, str]]] = (0,),
    checkpoint_name: str = "checkpoint_final.pth",
    device: Optional[Union[str, "torch.device"]] = None,
    tile_step_size: float = 0.5,
    use_mirroring: bool = True,
    labels: str = "nnunet",
    num_processes: Optional[int] = None,
    num_processes_export: int = 3,
    num_processes_preprocessing: int = 3,
    combinations: Optional[Sequence[str]] = None,
    plots: bool = True,
    progress: bool = True,
    verbose: bool = False,
    predictor: Optional["nnUNetPredictor"] = None,
    metrics: str = "legacy",
    cohort: Optional[str] = None,
) -> Dict:
    """Predict and score every non-empty modality combination; returns the ``missing_modalities.json`` content.

    ``images_folder`` holds all channels of each case; ``labels_folder`` the references
    (``CASE.nii.gz``, convention ``labels``). ``num_processes``: evaluation workers (default
    min(4, CPUs)); ``num_processes_export``: nnU-Net's segmentation export processes.
    ``combinations``: restrict to these names (e.g. ``["T1ce+FLAIR"]``), default all.
    The network is loaded once (or pass ``predictor`` from :func:`nnunet_kd.inference.models.load_predictor`).
    ``metrics`` / ``cohort``: as in :func:`nnunet_kd.evaluation.modes.evaluate_with_metrics`.
    Raises PredictionError / EvaluationError on bad input.
    """
    from tqdm import tqdm

    label_mapping(labels)  # unknown convention -> EvaluationError before any work
    official = resolve_cohort(cohort, labels_folder) if check_mode(metrics) != "legacy" else None
    if official is not None:
        require_official_package()
    dataset_json, folds = model_dataset_json(model_folder, folds, checkpoint_name, predictor)
    channel_names = channel_names_of(dataset_json)
    file_ending = dataset_json["file_ending"]
    cases = _complete_cases(images_folder, channel_names, file_ending)
    refs = _references(labels_folder, list(cases))
    combos = _select_combinations(channel_names, combinations)

    if predictor is None:  # inputs are fine: load the network once for every combination
        predictor = load_predictor(model_folder, folds, checkpoint_name, device, tile_step_size, use_mirroring,
                                   verbose, allow_tqdm=False)
    pred_root = os.path.join(output_folder, "predictions")
    folders = {name: os.path.join(pred_root, _safe_folder_name(name)) for name, _ in combos}
    _predict_combinations(predictor, cases, combos, folders, num_processes_export, num_processes_preprocessing,
                          progress, verbose)

    legacy = metrics != "lesionwise"
    if legacy:
        ref_nnunet = _references_in_nnunet_labels(refs, labels, os.path.join(output_folder, "references_nnunet"))
    results_by_combo: Dict[str, Dict] = {}
    n_eval = default_num_processes() if num_processes is None else int(num_processes)
    for name, channels in tqdm(combos, desc="evaluating", unit="combination", disable=not progress):
        entry: Dict = {"modalities": [display_name(channel_names[c]) for c in channels], "channels": list(channels)}
        predictions = {case: os.path.join(folders[name], case + file_ending) for case in refs}
        if legacy:
            pairs = {case: (predictions[case], ref_nnunet[case]) for case in refs}
            case_metrics = evaluate_pairs(pairs, labels="nnunet", num_processes=n_eval, progress=False)
            entry.update({"mean": mean_metrics(case_metrics), "cases": case_metrics})
        if official is not None:
            pairs = {case: (predictions[case], refs[case]) for case in refs}
            entry["lesionwise"] = lesionwise_pairs(pairs, official, "nnunet", labels, n_eval)
        results_by_combo[name] = entry
    results = {
        "combinations": results_by_combo,
        **({"mean_over_combinations": mean_over_combinations(results_by_combo)} if legacy else {}),
        "metrics": metrics,
        "labels": labels,
        "num_cases": len(refs),
        "modalities": [display_name(channel_names[c]) for c in modality_order(channel_names)],
        "predictions": os.path.abspath(pred_root),
    }
    write_outputs(results, output_folder, plots=plots)
    return results


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet_kd_evaluate_missing",
        description="Predict and score (Dice, HD95 of WT, TC, ET) every non-empty combination of available MRI "
                    "modalities; missing channels are zero-filled after normalisation.",
    )
    p.add_argument("-i", required=True, help="folder with every channel of every case (CASE_0000 .. CASE_0003)")
    p.add_argument("-r", required=True, help="folder with the reference segmentations (CASE.nii.gz)")
    p.add_argument("-o", required=True, help="output folder")
    add_model_arguments(p)
    add_labels_argument(p, "label convention of the references")
    p.add_argument("-np", type=int, default=default_num_processes(),
                   help="evaluation worker processes (default min(4, CPUs))")
    p.add_argument("--combinations", nargs="+", metavar="COMBO",
                   help="evaluate only these combinations (e.g. T1ce+FLAIR); default all")
    p.add_argument("--no-plots", action="store_true", help="skip the heat maps")
    add_metrics_arguments(p)
    return p


@command(PredictionError, EvaluationError, ValueError)
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.np < 1 or args.npp < 1 or args.nps < 1:
        raise PredictionError("-np, -npp and -nps must be at least 1")
    model_folder, folds = model_from_args(args)
    results = evaluate_missing_modalities(
        model_folder, args.i, args.r, args.o, folds=folds, checkpoint_name=args.chk, device=device_from_args(args),
        tile_step_size=args.step_size, use_mirroring=not args.disable_tta, labels=args.labels,
        num_processes=args.np, num_processes_export=args.nps, num_processes_preprocessing=args.npp,
        combinations=args.combinations, plots=not args.no_plots, verbose=args.verbose, metrics=args.metrics,
        cohort=args.cohort,
    )
    if "mean_over_combinations" not in results:
        for name, entry in results["combinations"].items():
            print(name + ": " + ", ".join(f"{r} lesion-wise Dice {m['lesion_dice']:.3f}"
                                          for r, m in entry["lesionwise"]["mean"].items()))
        print(f"{results['num_cases']} cases; written {os.path.join(args.o, OUTPUT_STEM + '.json')}")
        return 0
    width = max(len(n) for n in results["combinations"])
    print(f"{'combination':<{width}}  " + "  ".join(f"{r:>13}" for r in REGIONS))
    for name, entry in list(results["combinations"].items()) + [(MEAN_ROW, {"mean": results["mean_over_combinations"]})]:
        print(f"{name:<{width}}  " + "  ".join(
            f"{entry['mean'][r]['dice']:.3f}/{entry['mean'][r]['hd95']:6.1f}" for r in REGIONS))
    print(f"(Dice/HD95 mm) {results['num_cases']} cases; written {os.path.join(args.o, OUTPUT_STEM + '.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
