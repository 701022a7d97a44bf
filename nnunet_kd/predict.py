"""Prediction when some MRI modalities are missing (for models trained with modality dropout, e.g. MGSD).

Command line (nnUNetv2_predict's options plus ``--available``)::

    nnunet_kd_predict -i IN -o OUT -d 137 -c 3d_fullres -tr nnUNetTrainerMGSD -f 0 --available T1ce FLAIR
    nnunet_kd_predict -i IN -o OUT -m MODEL_FOLDER -f all            # availability inferred per case

Input files keep their dataset channel numbers: with T1ce and FLAIR available (channels 1 and 3
of a T1, T1ce, T2, FLAIR dataset) a case consists of ``CASE_0001.nii.gz`` and ``CASE_0003.nii.gz``.
The available channels are read and preprocessed exactly as nnU-Net does it; the missing channels
get an all-zero placeholder before preprocessing (zeros never change nnU-Net's crop to the nonzero
region, which is the union over channels) and are set to exactly 0 after normalisation and
resampling -- what the MGSD trainer feeds the network for a missing modality during training.
Nothing is written besides the predictions (no temporary copies of the scans).

Without ``--available`` the modalities of each case are inferred from the files present, and
printed. With ``--available`` only the named modalities are used (other files of a case are
ignored) and every case must have their files.

Python API: :func:`predict_with_missing_modalities` (folder or ``{case: {channel: file}}`` in,
segmentations out), :func:`load_predictor` (to reuse one network for several calls, as the
missing-modality evaluation does), :func:`preprocess_case_with_missing` and
:func:`zero_fill_missing`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_kd.atomic import atomic_write_json
from nnunet_kd.brats import canonical_modality
from nnunet_kd.paths import ensure_trainer_lookup

DEFAULT_TRAINER = "nnUNetTrainerMGSD"
DEFAULT_PLANS = "nnUNetPlans"

FilesByChannel = Dict[int, str]
CasesInput = Union[str, Mapping[str, Union[Mapping[Union[int, str], str], Sequence[str]]]]


class PredictionError(ValueError):
    """Bad input to the prediction (model folder, modality names, missing files)."""


# --------------------------------------------------------------------------------------
# modalities and channels
# --------------------------------------------------------------------------------------
def channel_names_of(dataset_json: Mapping) -> Dict[int, str]:
    """``{channel index: name}`` from a dataset.json (``channel_names`` or the old ``modality`` key)."""
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not names:
        raise PredictionError("the model's dataset.json has no channel_names")
    return {int(k): str(v) for k, v in sorted(names.items(), key=lambda kv: int(kv[0]))}


def display_name(name: str) -> str:
    """Canonical modality name (T1, T1ce, T2, FLAIR) when ``name`` is a known alias, else ``name``."""
    try:
        return canonical_modality(name)
    except ValueError:
        return str(name)


def modality_label(channel_names: Mapping[int, str], channels: Iterable[int], sep: str = "+") -> str:
    """``T1ce+FLAIR`` style name of a set of channels (in channel order)."""
    return sep.join(display_name(channel_names[c]) for c in sorted(channels))


def _dataset_modalities_text(channel_names: Mapping[int, str]) -> str:
    return ", ".join(f"{display_name(n)} (channel {c})" for c, n in sorted(channel_names.items()))


def resolve_modality(name: Union[str, int], channel_names: Mapping[int, str]) -> int:
    """Channel index of a modality name (case-insensitive; BraTS aliases such as t1c, t2f work)."""
    if isinstance(name, (int, np.integer)):
        if int(name) in channel_names:
            return int(name)
        raise PredictionError(f"channel {name} is not in the model's dataset; it has {_dataset_modalities_text(channel_names)}")
    key = str(name).strip()
    exact = [c for c, n in channel_names.items() if n.strip().lower() == key.lower()]
    if len(exact) == 1:
        return exact[0]
    try:
        wanted = canonical_modality(key)
    except ValueError:
        wanted = None
    if wanted is not None:
        matches = [c for c, n in channel_names.items() if display_name(n) == wanted]
        if len(matches) == 1:
            return matches[0]
    raise PredictionError(
        f"unknown modality {str(name)!r}: the model's dataset has {_dataset_modalities_text(channel_names)}"
    )


def resolve_available(names: Optional[Sequence[Union[str, int]]],
                      channel_names: Mapping[int, str]) -> Optional[List[int]]:
    """Sorted channel indices of the named modalities; ``None`` stays ``None`` (infer per case).

    Names may also be comma separated (``T1ce,FLAIR``). An empty list is an error.
    """
    if names is None:
        return None
    if isinstance(names, (str, int)):
        names = [names]
    flat: List[Union[str, int]] = []
    for n in names:
        if isinstance(n, str):
            flat.extend(p for p in (s.strip() for s in n.split(",")) if p)
        else:
            flat.append(n)
    if not flat:
        raise PredictionError(
            f"--available needs at least one modality name; the model's dataset has "
            f"{_dataset_modalities_text(channel_names)}"
        )
    return sorted({resolve_modality(n, channel_names) for n in flat})


# --------------------------------------------------------------------------------------
# input files
# --------------------------------------------------------------------------------------
def _channel_file_pattern(file_ending: str) -> "re.Pattern[str]":
    return re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending) + r"$")


def find_cases(input_folder: str, file_ending: str) -> Dict[str, FilesByChannel]:
    """``{case: {channel: path}}`` from the ``CASE_XXXX<file_ending>`` files of a folder."""
    if not os.path.isdir(input_folder):
        raise PredictionError(f"input folder {input_folder!r} does not exist or is not a folder")
    pattern = _channel_file_pattern(file_ending)
    cases: Dict[str, FilesByChannel] = {}
    for f in sorted(os.listdir(input_folder)):
        m = pattern.match(f)
        if m is None or not os.path.isfile(os.path.join(input_folder, f)):
            continue
        cases.setdefault(m.group("case"), {})[int(m.group("channel"))] = os.path.join(input_folder, f)
    if not cases:
        raise PredictionError(
            f"input folder {input_folder!r} contains no images named CASE_XXXX{file_ending} "
            f"(XXXX = the dataset's 4-digit channel number)"
        )
    return cases


def _channel_of_file(path: str, file_ending: str) -> int:
    m = _channel_file_pattern(file_ending).match(os.path.basename(path))
    if m is None:
        raise PredictionError(f"cannot tell the channel of {path!r}: expected a name like CASE_0001{file_ending}")
    return int(m.group("channel"))


def normalize_cases(input_folder_or_cases: CasesInput, channel_names: Mapping[int, str],
                    file_ending: str) -> Dict[str, FilesByChannel]:
    """Turn a folder or ``{case: {channel or modality name: path} | [paths]}`` into ``{case: {channel: path}}``."""
    if isinstance(input_folder_or_cases, (str, os.PathLike)):
        cases = find_cases(os.fspath(input_folder_or_cases), file_ending)
    elif isinstance(input_folder_or_cases, Mapping):
        cases = {}
        for case, files in input_folder_or_cases.items():
            if isinstance(files, Mapping):
                cases[str(case)] = {resolve_modality(k if not (isinstance(k, str) and k.isdigit()) else int(k),
                                                     channel_names): os.fspath(v) for k, v in files.items()}
            else:
                cases[str(case)] = {_channel_of_file(os.fspath(p), file_ending): os.fspath(p) for p in files}
    else:
        raise PredictionError("input must be a folder or a mapping {case: {channel: file}}")
    if not cases:
        raise PredictionError("no cases to predict")
    for case, files in cases.items():
        extra = sorted(set(files) - set(channel_names))
        if extra:
            raise PredictionError(
                f"case {case}: file {os.path.basename(files[extra[0]])!r} has channel {extra[0]:04d}, but the model's "
                f"dataset has only {_dataset_modalities_text(channel_names)}"
            )
    return cases


def select_available_files(cases: Mapping[str, FilesByChannel], available: Optional[Sequence[int]],
                           channel_names: Mapping[int, str], file_ending: str,
                           log: Optional[Callable[[str], None]] = print) -> Dict[str, FilesByChannel]:
    """Per case, the files to use: those of ``available`` (all required), or every file present when ``None``."""
    selected: Dict[str, FilesByChannel] = {}
    for case in sorted(cases):
        files = cases[case]
        if not files:
            raise PredictionError(
                f"case {case} has no modality file; expected at least one of "
                + ", ".join(f"{case}_{c:04d}{file_ending} ({display_name(n)})" for c, n in channel_names.items())
            )
        if available is None:
            chosen = dict(sorted(files.items()))
            if log is not None:
                missing = [c for c in channel_names if c not in chosen]
                log(f"case {case}: available modalities inferred from the files present: "
                    f"{modality_label(channel_names, chosen, ', ')}"
                    + (f" (missing, zero-filled: {modality_label(channel_names, missing, ', ')})" if missing else ""))
        else:
            absent = [c for c in available if c not in files]
            if absent:
                folder = os.path.dirname(next(iter(files.values())))
                expected = [os.path.join(folder, f"{case}_{c:04d}{file_ending}") for c in absent]
                raise PredictionError(
                    f"case {case}: missing file for available modality "
                    + ", ".join(f"{display_name(channel_names[c])} (expected {e})" for c, e in zip(absent, expected))
                )
            chosen = {c: files[c] for c in available}
            ignored = sorted(set(files) - set(available))
            if ignored and log is not None:
                log(f"case {case}: ignoring files of modalities not in --available: "
                    + ", ".join(f"{display_name(channel_names[c])} ({os.path.basename(files[c])})" for c in ignored))
        selected[case] = chosen
    return selected


# --------------------------------------------------------------------------------------
# zero filling and preprocessing
# --------------------------------------------------------------------------------------
def zero_fill_missing(data, missing_channels: Iterable[int], channel_axis: int = 0):
    """A copy of ``data`` (numpy array or torch tensor) with the ``missing_channels`` set to exactly 0.

    ``data`` has its channels on ``channel_axis`` (default 0: ``(C, *spatial)``). The other channels are
    bit-identical copies. Same type, dtype and device as the input.
    """
    missing = sorted({int(c) for c in missing_channels})
    n = data.shape[channel_axis]
    if any(not 0 <= c < n for c in missing):
        raise PredictionError(f"missing channels {missing} out of range for {n} channels")
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(data, torch.Tensor):
        out = data.clone()
        if missing:
            index = [slice(None)] * out.ndim
            index[channel_axis] = missing
            out[tuple(index)] = 0
        return out
    out = np.array(data, copy=True)
    if missing:
        index = [slice(None)] * out.ndim
        index[channel_axis] = missing
        out[tuple(index)] = 0
    return out


def _num_channels(predictor) -> int:
    return len(channel_names_of(predictor.dataset_json))


def read_case_with_placeholders(predictor, files_by_channel: Mapping[int, str], case: Optional[str] = None):
    """Read the available channel images; return ``(data (C, z, y, x) with zeros for missing channels, properties)``."""
    num_channels = _num_channels(predictor)
    what = f"case {case}" if case else "case"
    channels = sorted(int(c) for c in files_by_channel)
    if not channels:
        raise PredictionError(f"{what} has no modality file")
    if any(not 0 <= c < num_channels for c in channels):
        raise PredictionError(f"{what}: channels {channels} out of range for a {num_channels}-channel model")
    files = [files_by_channel[c] for c in channels]
    for f in files:
        if not os.path.isfile(f):
            raise PredictionError(f"{what}: file {f!r} does not exist")
    rw = predictor.plans_manager.image_reader_writer_class()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints its geometry complaints
            images, properties = rw.read_images(files)
    except RuntimeError as e:
        raise PredictionError(
            f"{what}: cannot read {', '.join(map(os.path.basename, files))}: "
            f"{str(e).strip() or 'the images differ in shape or spacing'}"
        ) from None
    if images.shape[0] != len(channels):
        raise PredictionError(f"{what}: expected one 3D image per file, got {images.shape[0]} channels "
                              f"from {len(files)} file(s)")
    data = np.zeros((num_channels, *images.shape[1:]), dtype=images.dtype)
    data[channels] = images
    return data, properties


def preprocess_case_with_missing(predictor, files_by_channel: Mapping[int, str], case: Optional[str] = None):
    """Preprocess one case from the files of its available channels; ``(data float32 (C, ...), properties)``.

    Missing channels enter nnU-Net's preprocessing as all-zero images (which leaves the crop to the
    nonzero region, the union over channels, unchanged) and are set to exactly 0 afterwards, i.e. after
    normalisation and resampling, as in MGSD training.
    """
    data, properties = read_case_with_placeholders(predictor, files_by_channel, case)
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case_npy(data, None, properties, predictor.plans_manager,
                                                   predictor.configuration_manager, predictor.dataset_json)
    missing = [c for c in range(data.shape[0]) if c not in {int(k) for k in files_by_channel}]
    if missing:
        data[missing] = 0  # in place: run_case_npy returned a fresh array
    return np.ascontiguousarray(data, dtype=np.float32), properties


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _maybe_quiet(quiet: bool):
    """Silence nnU-Net's stdout chatter (progress bars and errors go to stderr and stay visible)."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def model_folder_from_ids(dataset: Union[str, int], trainer: str = DEFAULT_TRAINER, plans: str = DEFAULT_PLANS,
                          configuration: str = "3d_fullres") -> str:
    """``$nnUNet_results/DatasetXXX_Name/trainer__plans__configuration``."""
    results = os.environ.get("nnUNet_results")
    if not results:
        raise PredictionError("nnUNet_results is not set; set it or give the model folder with -m")
    if not os.path.isdir(results):
        raise PredictionError(f"nnUNet_results={results!r} is not a folder")
    name = str(dataset)
    if not name.startswith("Dataset"):
        try:
            dataset_id = int(name)
        except ValueError:
            raise PredictionError(f"-d must be a dataset id or a DatasetXXX_Name, got {name!r}") from None
        found = sorted(d for d in os.listdir(results) if d.startswith(f"Dataset{dataset_id:03d}_")
                       and os.path.isdir(os.path.join(results, d)))
        if not found:
            raise PredictionError(f"no trained model for dataset {dataset_id} in nnUNet_results={results!r}")
        if len(found) > 1:
            raise PredictionError(f"several datasets with id {dataset_id} in {results!r}: {', '.join(found)}")
        name = found[0]
    folder = os.path.join(results, name, f"{trainer}__{plans}__{configuration}")
    if not os.path.isdir(folder):
        raise PredictionError(f"model folder {folder!r} does not exist (check -d, -tr, -p and -c)")
    return folder


def detect_folds(model_folder: str, checkpoint_name: str = "checkpoint_final.pth") -> List[Union[int, str]]:
    """Folds ``fold_X`` with the checkpoint; ``['all']`` when only ``fold_all`` has one."""
    folds: List[Union[int, str]] = []
    for d in sorted(os.listdir(model_folder)):
        m = re.fullmatch(r"fold_(\d+)", d)
        if m and os.path.isfile(os.path.join(model_folder, d, checkpoint_name)):
            folds.append(int(m.group(1)))
    folds.sort()
    if not folds and os.path.isfile(os.path.join(model_folder, "fold_all", checkpoint_name)):
        folds = ["all"]
    if not folds:
        raise PredictionError(f"no fold_X/{checkpoint_name} in model folder {model_folder!r}")
    return folds


def _parse_folds(folds: Optional[Sequence[Union[int, str]]]) -> Optional[List[Union[int, str]]]:
    if folds is None:
        return None
    if isinstance(folds, (int, str)):
        folds = [folds]
    out: List[Union[int, str]] = []
    for f in folds:
        if str(f) == "all":
            out.append("all")
        else:
            try:
                out.append(int(f))
            except ValueError:
                raise PredictionError(f"folds must be integers or 'all', got {f!r}") from None
    if not out:
        raise PredictionError("no folds given")
    return out


def check_model_folder(model_folder: str, folds: Optional[Sequence[Union[int, str]]],
                       checkpoint_name: str = "checkpoint_final.pth") -> List[Union[int, str]]:
    """Raise PredictionError unless the folder has dataset.json, plans.json and every fold's checkpoint."""
    if not os.path.isdir(model_folder):
        raise PredictionError(f"model folder {model_folder!r} does not exist")
    for name in ("dataset.json", "plans.json"):
        if not os.path.isfile(os.path.join(model_folder, name)):
            raise PredictionError(f"model folder {model_folder!r} has no {name}; is it an nnU-Net training output?")
    folds = _parse_folds(folds)
    if folds is None:
        return detect_folds(model_folder, checkpoint_name)
    for f in folds:
        path = os.path.join(model_folder, f"fold_{f}", checkpoint_name)
        if not os.path.isfile(path):
            raise PredictionError(f"no checkpoint {path!r} (fold {f}, checkpoint {checkpoint_name})")
    return folds


def model_dataset_json(model_folder: Optional[str], folds, checkpoint_name: str, predictor=None):
    """(dataset.json, folds) of a model: from a loaded predictor, or read after checking the model folder."""
    if predictor is not None:
        return predictor.dataset_json, folds
    if model_folder is None:
        raise PredictionError("no model folder given")
    folds = check_model_folder(model_folder, folds, checkpoint_name)
    with open(os.path.join(model_folder, "dataset.json"), encoding="utf-8") as f:
        return json.load(f), folds


def resolve_device(device=None):
    """``torch.device`` from 'cpu' / 'cuda' / 'mps' / a torch.device; default cuda when available, else cpu."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device) if not isinstance(device, torch.device) else device
    if dev.type not in ("cpu", "cuda", "mps"):
        raise PredictionError(f"device must be cpu, cuda or mps, got {device!r}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PredictionError("device cuda requested but no CUDA GPU is available (use -device cpu)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise PredictionError("device mps requested but MPS is not available (use -device cpu)")
    return dev


def load_predictor(model_folder: str, folds: Optional[Sequence[Union[int, str]]] = (0,),
                   checkpoint_name: str = "checkpoint_final.pth", device=None, tile_step_size: float = 0.5,
                   use_mirroring: bool = True, verbose: bool = False, allow_tqdm: bool = True):
    """An initialised ``nnUNetPredictor`` for ``model_folder`` (``folds=None``: every fold with the checkpoint)."""
    folds = check_model_folder(model_folder, folds, checkpoint_name)
    if not 0 < float(tile_step_size) <= 1:
        raise PredictionError(f"step size must be in (0, 1], got {tile_step_size}")
    dev = resolve_device(device)
    ensure_trainer_lookup()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=tile_step_size, use_gaussian=True, use_mirroring=use_mirroring,
                                perform_everything_on_device=True, device=dev, verbose=verbose,
                                verbose_preprocessing=verbose, allow_tqdm=allow_tqdm)
    try:
        with _maybe_quiet(not verbose):
            predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name)
    except RuntimeError as e:  # e.g. the checkpoint's trainer class cannot be found
        raise PredictionError(f"cannot load the model in {model_folder!r}: {e}") from None
    return predictor


# --------------------------------------------------------------------------------------
# prediction
# --------------------------------------------------------------------------------------
Job = Tuple[str, FilesByChannel, str]  # (case, files by channel, output file without ending)


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
    with _maybe_quiet(quiet):
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
    :func:`load_predictor` (then ``model_folder``, folds, checkpoint, device, step size and mirroring
    are taken from it). ``overwrite=False`` skips cases whose segmentation exists.
    Raises :class:`PredictionError` on bad input.
    """
    dataset_json, folds = model_dataset_json(model_folder, folds, checkpoint_name, predictor)
    # check the input before loading the network
    channel_names = channel_names_of(dataset_json)
    file_ending = dataset_json["file_ending"]
    available_channels = resolve_available(available, channel_names)
    cases = normalize_cases(input_folder_or_cases, channel_names, file_ending)
    selected = select_available_files(cases, available_channels, channel_names, file_ending, log)
    if predictor is None:
        predictor = load_predictor(model_folder, folds, checkpoint_name, device, tile_step_size, use_mirroring,
                                   verbose)
    os.makedirs(output_folder, exist_ok=True)
    jobs: List[Job] = [(case, files, os.path.join(output_folder, case)) for case, files in selected.items()]
    if not overwrite:
        jobs = [j for j in jobs if not os.path.isfile(j[2] + file_ending)]
    # like nnUNetv2_predict: what is needed to post-process / ensemble the predictions
    from batchgenerators.utilities.file_and_folder_operations import save_json

    save_json(predictor.dataset_json, os.path.join(output_folder, "dataset.json"), sort_keys=False)
    save_json(predictor.plans_manager.plans, os.path.join(output_folder, "plans.json"), sort_keys=False)
    atomic_write_json({
        "model_folder": model_folder,
        "available": None if available_channels is None else modality_label(channel_names, available_channels),
        "cases": {case: {"available": modality_label(channel_names, files),
                         "missing_zero_filled": [display_name(channel_names[c]) for c in channel_names
                                                 if c not in files],
                         "files": {display_name(channel_names[c]): f for c, f in sorted(files.items())}}
                  for case, files in selected.items()},
    }, os.path.join(output_folder, "missing_modalities_input.json"))
    run_jobs(predictor, jobs, save_probabilities, num_processes, num_processes_preprocessing, quiet=not verbose)
    return [os.path.join(output_folder, case + file_ending) for case in selected]


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def _default_nproc(env: str, default: int = 3) -> int:
    try:
        return int(os.environ.get(env) or default)
    except ValueError:
        return default


def add_model_arguments(p: argparse.ArgumentParser, configuration_required: bool = False) -> None:
    """The options that select a trained model (shared with nnunet_kd_evaluate_missing)."""
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


def model_folder_from_args(args: argparse.Namespace) -> str:
    if args.m:
        if args.d:
            raise PredictionError("give either -m or -d/-c/-tr/-p, not both")
        return args.m
    if not args.d or not args.c:
        raise PredictionError("give the model with -d and -c (plus -tr/-p if not the defaults) or with -m")
    return model_folder_from_ids(args.d, args.tr, args.p, args.c)


def setup_torch_threads(device) -> None:
    """What nnUNetv2_predict does: all CPU threads on cpu, a single thread for cuda."""
    import torch

    if device.type == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif device.type == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)


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
    p.add_argument("--continue_prediction", action="store_true", help="skip cases that already have a segmentation")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    ensure_trainer_lookup()
    try:
        if args.npp < 1 or args.nps < 1:
            raise PredictionError("-npp and -nps must be at least 1")
        model_folder = model_folder_from_args(args)
        folds = check_model_folder(model_folder, args.f, args.chk)
        # check the modality names before loading the network
        with open(os.path.join(model_folder, "dataset.json"), encoding="utf-8") as f:
            channel_names = channel_names_of(json.load(f))
        if args.available is not None and not [a for a in args.available if a.strip(", ")]:
            raise PredictionError(
                "--available was given without modality names; name the modalities present (the model's dataset "
                f"has {_dataset_modalities_text(channel_names)}), e.g. --available T1ce FLAIR, or leave "
                "--available out to infer them per case from the files present")
        resolve_available(args.available, channel_names)
        device = resolve_device(args.device)
        setup_torch_threads(device)
        written = predict_with_missing_modalities(
            model_folder, args.i, args.o, args.available, folds=folds, checkpoint_name=args.chk, device=device,
            tile_step_size=args.step_size, use_mirroring=not args.disable_tta, save_probabilities=args.save_probabilities, num_processes=args.nps,
            num_processes_preprocessing=args.npp, verbose=args.verbose, overwrite=not args.continue_prediction,
        )
    except PredictionError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print(f"{len(written)} segmentation(s) written to {args.o}")
    return 0


if __name__ == "__main__":
    main()
