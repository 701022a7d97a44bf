"""Trained models for prediction: the model folder (by ids or path), its folds, the device, the predictor.

:func:`load_predictor` returns an initialised ``nnUNetPredictor`` that can be reused for several calls
(as the missing-modality evaluation does); everything before it checks the model folder so that bad
input is a :class:`PredictionError` before the network is loaded.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
from typing import List, Optional, Sequence, Union

from nnunet_kd.inference.inputs import PredictionError
from nnunet_kd.paths import ensure_trainer_lookup, env_folder, find_dataset_folder

DEFAULT_TRAINER = "nnUNetTrainerMGSD"
DEFAULT_PLANS = "nnUNetPlans"

Folds = List[Union[int, str]]


@contextlib.contextmanager
def quiet_stdout(quiet: bool = True):
    """Silence nnU-Net's stdout chatter (progress bars and errors go to stderr and stay visible)."""
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


def model_folder_from_ids(dataset: Union[str, int], trainer: str = DEFAULT_TRAINER, plans: str = DEFAULT_PLANS,
                          configuration: str = "3d_fullres") -> str:
    """``$nnUNet_results/DatasetXXX_Name/trainer__plans__configuration``."""
    try:
        results = env_folder("nnUNet_results", "set it or give the model folder with -m")
        dataset_folder = find_dataset_folder(results, dataset, f"nnUNet_results={results!r}")
    except ValueError as e:
        raise PredictionError(str(e)) from None
    folder = os.path.join(dataset_folder, f"{trainer}__{plans}__{configuration}")
    if not os.path.isdir(folder):
        raise PredictionError(f"model folder {folder!r} does not exist (check -d, -tr, -p and -c)")
    return folder


def folds_with_checkpoint(model_folder: str, checkpoint_name: str = "checkpoint_final.pth") -> Folds:
    """Every fold whose ``fold_X`` folder in ``model_folder`` holds the checkpoint: the numbered folds in
    order, then ``'all'`` if ``fold_all`` has it. Also the lookup of MTCM-KD's pretrained teachers."""
    numbered: List[int] = []
    has_all = False
    for d in os.listdir(model_folder):
        m = re.fullmatch(r"fold_(\d+|all)", d)
        if m and os.path.isfile(os.path.join(model_folder, d, checkpoint_name)):
            if m.group(1) == "all":
                has_all = True
            else:
                numbered.append(int(m.group(1)))
    return sorted(numbered) + (["all"] if has_all else [])


def detect_folds(model_folder: str, checkpoint_name: str = "checkpoint_final.pth") -> Folds:
    """Folds ``fold_X`` with the checkpoint; ``['all']`` when only ``fold_all`` has one."""
    folds = folds_with_checkpoint(model_folder, checkpoint_name)
    folds = [f for f in folds if f != "all"] or folds
    if not folds:
        raise PredictionError(f"no fold_X/{checkpoint_name} in model folder {model_folder!r}")
    return folds


def _parse_folds(folds: Optional[Sequence[Union[int, str]]]) -> Optional[Folds]:
    if folds is None:
        return None
    if isinstance(folds, (int, str)):
        folds = [folds]
    out: Folds = []
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
                       checkpoint_name: str = "checkpoint_final.pth") -> Folds:
    """The folds to use (``None``: every fold with the checkpoint); PredictionError unless the folder has
    dataset.json, plans.json and every fold's checkpoint."""
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


def model_dataset_json(model_folder: Optional[str], folds: Optional[Sequence[Union[int, str]]],
                       checkpoint_name: str, predictor=None):
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


def setup_torch_threads(device) -> None:
    """What nnUNetv2_predict does: all CPU threads on cpu, a single thread for cuda."""
    import torch

    if device.type == "cpu":
        torch.set_num_threads(multiprocessing.cpu_count())
    elif device.type == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)


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
        with quiet_stdout(not verbose):
            predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name)
    except RuntimeError as e:  # e.g. the checkpoint's trainer class cannot be found
        raise PredictionError(f"cannot load the model in {model_folder!r}: {e}") from None
    return predictor
