"""Prediction when some MRI modalities are missing (for models trained with modality dropout, e.g. MGSD).

Command line (nnUNetv2_predict's options plus ``--available``)::

    nnunet_kd_predict -i IN -o OUT -d 137 -c 3d_fullres -tr nnUNetTrainerMGSD -f 0 --available T1ce FLAIR
    nnunet_kd_predict -i IN -o OUT -m MODEL_FOLDER -f all            # availability inferred per case

Input files keep their dataset channel numbers (:mod:`nnunet_kd.inference.inputs`); the missing channels
are zero-filled after normalisation (:mod:`nnunet_kd.inference.preprocessing`). Nothing is written besides
the predictions (no temporary copies of the scans).

Without ``--available`` the modalities of each case are inferred from the files present, and
printed. With ``--available`` only the named modalities are used (other files of a case are
ignored) and every case must have their files.

Python API: :func:`predict_with_missing_modalities` (folder or ``{case: {channel: file}}`` in,
segmentations out) and :func:`run_jobs` (several outputs from one loaded network, as the
missing-modality evaluation uses it).
"""
from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from nnunet_kd.atomic import atomic_write_json
from nnunet_kd.brats import channel_names_of, display_name, modalities_text, modality_label
from nnunet_kd.cli import command
from nnunet_kd.inference.inputs import (CasesInput, FilesByChannel, PredictionError, normalize_cases,
                                        resolve_available, select_available_files)
from nnunet_kd.inference.models import (DEFAULT_PLANS, DEFAULT_TRAINER, Folds, check_model_folder, load_predictor,
                                        model_dataset_json, model_folder_from_ids, quiet_stdout, resolve_device,
                                        setup_torch_threads)
from nnunet_kd.inference.preprocessing import preprocess_case_with_missing
from nnunet_kd.paths import ensure_trainer_lookup

Job = Tuple[str, FilesByChannel, str]  # (case, files by channel, output file without ending)
#: Written into the output folder: which modalities (and files) each segmentation was predicted from.
RECORD_NAME = "missing_modalities_input.json"


def case_record(channel_names: Mapping[int, str], files: FilesByChannel) -> dict:
    """What the record says about one case: the modalities used, those zero-filled, and their files."""
    return {"available": modality_label(channel_names, files),
            "missing_zero_filled": [display_name(channel_names[c]) for c in channel_names if c not in files],
            "files": {display_name(channel_names[c]): f for c, f in sorted(files.items())}}


def _jobs_to_continue(jobs: List[Job], records: Mapping[str, dict], record_file: str, file_ending: str,
                      log: Optional[Callable[[str], None]]) -> List[Job]:
    """For ``--continue_prediction``: the jobs without a segmentation predicted from the same inputs.

    A segmentation whose recorded modalities or files differ from this run's (or that has no record) is
    deleted before the new record is written, so the record never describes a segmentation it did not make.
    """
    previous = {}
    if os.path.isfile(record_file):
        try:
            with open(record_file, encoding="utf-8") as f:
                previous = json.load(f).get("cases", {})
        except (OSError, ValueError, AttributeError):
            previous = {}
    redo = [case for case, _, ofile in jobs
            if os.path.isfile(ofile + file_ending) and previous.get(case) != json.loads(json.dumps(records[case]))]
    for case, _, ofile in jobs:
        if case in redo:
            for ending in (file_ending, ".npz", ".pkl"):
                if os.path.isfile(ofile + ending):
                    os.remove(ofile + ending)
    if redo and log is not None:
        log(f"--continue_prediction: predicting {len(redo)} case(s) again because their modalities or files "
            f"differ from the recorded ones: {', '.join(redo)}")
    return [j for j in jobs if not os.path.isfile(j[2] + file_ending)]


def check_separate_folders(input_folder: str, output_folder: str) -> None:
    """PredictionError if the input folder (-i) and the output folder (-o) are the same or nested.

    Otherwise a rerun would read its own segmentations as input channels (``CASE_0002.nii.gz`` is a
    segmentation of case ``CASE_0002`` but also channel 2 of a phantom case ``CASE``).
    """
    i, o = os.path.realpath(input_folder), os.path.realpath(output_folder)
    if i == o:
        raise PredictionError(f"the input folder (-i {input_folder}) and the output folder (-o {output_folder}) "
                              "are the same; write the segmentations to a separate folder")
    nested = {i: "-i inside -o", o: "-o inside -i"}
    inner = next((p for p, outer in ((i, o), (o, i)) if os.path.commonpath([p, outer]) == outer), None)
    if inner is not None:
        which = nested[inner]
        raise PredictionError(f"the input folder (-i {input_folder}) and the output folder (-o {output_folder}) "
                              f"are nested ({which}); use folders that do not contain each other")


# --------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------
def iterate_preprocessed(predictor, jobs: Sequence[Job], num_processes: int = 1,
                         on_item: Optional[Callable[[int, Job], None]] = None) -> Iterator[dict]:
    """Yield nnU-Net's ``{'data', 'data_properties', 'ofile'}`` items, preprocessing up to ``num_processes`` ahead.

    ``on_item(index, job)`` is called just before an item is handed out.
    """
    import torch

    def work(job: Job):
        return preprocess_case_with_missing(predictor, job[1], job[0])

    n = max(1, int(num_processes))
    with ThreadPoolExecutor(max_workers=n) as pool:
        pending = []
        next_job = 0
        try:
            for i in range(len(jobs)):
                while next_job < len(jobs) and len(pending) < n:
                    pending.append(pool.submit(work, jobs[next_job]))
                    next_job += 1
                data, properties = pending.pop(0).result()
                if on_item is not None:
                    on_item(i, jobs[i])
                yield {"data": torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format),
                       "data_properties": properties, "ofile": jobs[i][2]}
        finally:
            for f in pending:
                f.cancel()


def run_jobs(predictor, jobs: Sequence[Job], save_probabilities: bool = False, num_processes: int = 3,
             num_processes_preprocessing: int = 3, on_item: Optional[Callable[[int, Job], None]] = None,
             quiet: bool = False) -> List[str]:
    """Predict every job with one export pool; returns the written segmentation files."""
    if not jobs:
        return []
    for _, _, ofile in jobs:
        os.makedirs(os.path.dirname(os.path.abspath(ofile)), exist_ok=True)
    iterator = iterate_preprocessed(predictor, jobs, num_processes_preprocessing, on_item)
    with quiet_stdout(quiet):
        predictor.predict_from_data_iterator(iterator, save_probabilities, max(1, int(num_processes)))
    ending = predictor.dataset_json["file_ending"]
    return [ofile + ending for _, _, ofile in jobs]


def predict_with_missing_modalities(
    model_folder: Optional[str],
    input_folder_or_cases: CasesInput,
    output_folder: str,
    available: Optional[Sequence[Union[str, int]]] = None,
    folds: Optional[Sequence[Union[int, str]]] = (0,),
    checkpoint_name: str = "checkpoint_final.pth",
    device=None,
    tile_step_size: float = 0.5,
    use_mirroring: bool = True,
    save_probabilities: bool = False,
    num_processes: int = 3,
    num_processes_preprocessing: int = 3,
    verbose: bool = False,
    overwrite: bool = True,
    predictor=None,
    log: Optional[Callable[[str], None]] = print,
) -> List[str]:
    """Segment cases of which only some modalities exist; returns the written segmentation files.

    ``input_folder_or_cases``: a folder of ``CASE_XXXX<ending>`` files (XXXX = dataset channel), or
    ``{case: {channel index or modality name: file}}``, or ``{case: [files named CASE_XXXX<ending>]}``.
    ``available``: modality names (case-insensitive, aliases allowed) or channel indices used for every
    case (each case must have their files; other files are ignored), or ``None`` to use, per case, the
    files present (logged through ``log``). Missing channels are zero-filled after normalisation.
    ``folds=None`` uses every fold that has the checkpoint. ``predictor``: an already loaded
    :func:`nnunet_kd.inference.models.load_predictor` (then ``model_folder``, folds, checkpoint, device,
    step size and mirroring are taken from it). ``overwrite=False`` skips cases whose segmentation exists
    and was predicted from the same modalities and files (per the record); the others are predicted again.
    Raises :class:`PredictionError` on bad input.
    """
    dataset_json, folds = model_dataset_json(model_folder, folds, checkpoint_name, predictor)
    # check the input before loading the network
    channel_names = channel_names_of(dataset_json)
    file_ending = dataset_json["file_ending"]
    available_channels = resolve_available(available, channel_names)
    if isinstance(input_folder_or_cases, (str, os.PathLike)):
        check_separate_folders(os.fspath(input_folder_or_cases), output_folder)
    cases = normalize_cases(input_folder_or_cases, channel_names, file_ending)
    selected = select_available_files(cases, available_channels, channel_names, file_ending, log)
    if predictor is None:
        predictor = load_predictor(model_folder, folds, checkpoint_name, device, tile_step_size, use_mirroring,
                                   verbose)
    os.makedirs(output_folder, exist_ok=True)
    record_file = os.path.join(output_folder, RECORD_NAME)
    records = {case: case_record(channel_names, files) for case, files in selected.items()}
    jobs: List[Job] = [(case, files, os.path.join(output_folder, case)) for case, files in selected.items()]
    if not overwrite:
        jobs = _jobs_to_continue(jobs, records, record_file, file_ending, log)
    # like nnUNetv2_predict: what is needed to post-process / ensemble the predictions
    from batchgenerators.utilities.file_and_folder_operations import save_json

    save_json(predictor.dataset_json, os.path.join(output_folder, "dataset.json"), sort_keys=False)
    save_json(predictor.plans_manager.plans, os.path.join(output_folder, "plans.json"), sort_keys=False)
    atomic_write_json({
        "model_folder": model_folder,
        "available": None if available_channels is None else modality_label(channel_names, available_channels),
        "cases": records,
    }, record_file)
    run_jobs(predictor, jobs, save_probabilities, num_processes, num_processes_preprocessing, quiet=not verbose)
    return [os.path.join(output_folder, case + file_ending) for case in selected]


# --------------------------------------------------------------------------------------
# command line (the model options are shared with nnunet_kd_evaluate_missing)
# --------------------------------------------------------------------------------------
def _default_nproc(env: str, default: int = 3) -> int:
    try:
        return int(os.environ.get(env) or default)
    except ValueError:
        return default


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """The options that select a trained model and how it predicts (shared with nnunet_kd_evaluate_missing)."""
    p.add_argument("-d", help="dataset id or name (with -c, -tr, -p: the model in $nnUNet_results)")
    p.add_argument("-c", help="configuration, e.g. 3d_fullres")
    p.add_argument("-tr", default=DEFAULT_TRAINER, help=f"trainer class (default {DEFAULT_TRAINER})")
    p.add_argument("-p", default=DEFAULT_PLANS, help=f"plans identifier (default {DEFAULT_PLANS})")
    p.add_argument("-m", help="model folder (alternative to -d/-c/-tr/-p), the folder holding fold_X")
    p.add_argument("-f", nargs="+", default=None,
                   help="folds (integers or 'all'; default: every fold that has the checkpoint)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint name (default checkpoint_final.pth)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step size (default 0.5)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring test-time augmentation")
    p.add_argument("-device", default=None, choices=("cpu", "cuda", "mps"),
                   help="device (default: cuda if available, else cpu)")
    p.add_argument("-npp", type=int, default=_default_nproc("nnUNet_npp"),
                   help="preprocessing threads (default 3)")
    p.add_argument("-nps", type=int, default=_default_nproc("nnUNet_nps"),
                   help="segmentation export processes (default 3)")
    p.add_argument("--verbose", action="store_true", help="show nnU-Net's messages")


def model_from_args(args: argparse.Namespace) -> Tuple[str, Folds]:
    """(model folder, folds) from the options of :func:`add_model_arguments`, checked."""
    if args.m:
        if args.d:
            raise PredictionError("give either -m or -d/-c/-tr/-p, not both")
        model_folder = args.m
    elif not args.d or not args.c:
        raise PredictionError("give the model with -d and -c (plus -tr/-p if not the defaults) or with -m")
    else:
        model_folder = model_folder_from_ids(args.d, args.tr, args.p, args.c)
    return model_folder, check_model_folder(model_folder, args.f, args.chk)


def device_from_args(args: argparse.Namespace):
    """The ``-device`` as a torch.device, with torch's threads set up as nnUNetv2_predict does."""
    device = resolve_device(args.device)
    setup_torch_threads(device)
    return device


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet_kd_predict",
        description="nnU-Net prediction when some MRI modalities are missing: missing channels are zero-filled "
                    "after normalisation, as in modality-dropout (MGSD) training. Input files keep their dataset "
                    "channel numbers (CASE_0001.nii.gz = channel 1).",
    )
    p.add_argument("-i", required=True, help="input folder (CASE_XXXX.nii.gz files of the available channels)")
    p.add_argument("-o", required=True, help="output folder")
    p.add_argument("--available", nargs="*", default=None, metavar="MODALITY",
                   help="the modalities present (names from the model's dataset.json, case-insensitive, aliases "
                        "such as t1c or t2f work); default: inferred per case from the files present")
    add_model_arguments(p)
    p.add_argument("--save_probabilities", action="store_true", help="also write class probabilities (.npz)")
    p.add_argument("--continue_prediction", action="store_true",
                   help="skip cases that already have a segmentation predicted from the same modalities and files "
                        f"(recorded in {RECORD_NAME}); the others are predicted again")
    return p


@command(PredictionError, ValueError)
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    ensure_trainer_lookup()
    check_separate_folders(args.i, args.o)
    if args.npp < 1 or args.nps < 1:
        raise PredictionError("-npp and -nps must be at least 1")
    model_folder, folds = model_from_args(args)
    # check the modality names before loading the network
    with open(os.path.join(model_folder, "dataset.json"), encoding="utf-8") as f:
        channel_names = channel_names_of(json.load(f))
    if args.available is not None and not [a for a in args.available if a.strip(", ")]:
        raise PredictionError(
            "--available was given without modality names; name the modalities present (the model's dataset "
            f"has {modalities_text(channel_names)}), e.g. --available T1ce FLAIR, or leave "
            "--available out to infer them per case from the files present")
    resolve_available(args.available, channel_names)
    written = predict_with_missing_modalities(
        model_folder, args.i, args.o, args.available, folds=folds, checkpoint_name=args.chk,
        device=device_from_args(args), tile_step_size=args.step_size, use_mirroring=not args.disable_tta,
        save_probabilities=args.save_probabilities, num_processes=args.nps, num_processes_preprocessing=args.npp,
        verbose=args.verbose, overwrite=not args.continue_prediction,
    )
    print(f"{len(written)} segmentation(s) written to {args.o}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
