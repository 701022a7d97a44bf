"""Small pieces shared by the plugin's trainers (kept outside nnunet_kd/trainers/, which nnU-Net scans)."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any, Iterable

import torch
from torch import distributed as dist
from torch import nn

from nnunet_kd.brats import MODALITIES, channel_indices

#: Environment variables that shorten training (tests, demos, studies): name -> trainer attribute.
BUDGET_ENV = {
    "nnUNet_kd_num_epochs": "num_epochs",
    "nnUNet_kd_iterations_per_epoch": "num_iterations_per_epoch",
    "nnUNet_kd_val_iterations": "num_val_iterations_per_epoch",
}


def apply_budget_overrides(trainer: Any) -> None:
    """Set epochs / iterations from ``nnUNet_kd_*`` environment variables when present.

    nnUNetv2_train passes no trainer options, so like nnU-Net's ``nnUNet_compile`` the
    budget comes from the environment. Bad values raise a ValueError naming the variable.
    """
    for env_name, attribute in BUDGET_ENV.items():
        raw = os.environ.get(env_name)
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {env_name}={raw!r} must be a positive integer") from None
        if value < 1:
            raise ValueError(f"environment variable {env_name}={raw!r} must be a positive integer")
        setattr(trainer, attribute, value)


def atomic_torch_save(obj: Any, path: str) -> None:
    """torch.save to a temporary file beside ``path``, then rename: a crash never leaves half a checkpoint."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".pth", dir=folder)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make parameters and buffers of ``module`` identical on all ranks (copied from rank ``src``)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(tensor.data, src=src)


def clip_gradients(parameters: Iterable[torch.nn.Parameter], max_norm: float = 12.0) -> None:
    """nnU-Net's gradient clipping (norm 12), applied to one network's parameters."""
    params = [p for p in parameters if p.grad is not None]
    if params:
        torch.nn.utils.clip_grad_norm_(params, max_norm)


def sgd_with_poly_lr(parameters: Iterable[torch.nn.Parameter], trainer: Any):
    """nnU-Net's optimiser and schedule (SGD, Nesterov 0.99, poly decay) for auxiliary networks."""
    from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler

    optimizer = torch.optim.SGD(list(parameters), trainer.initial_lr, weight_decay=trainer.weight_decay,
                                momentum=0.99, nesterov=True)
    return optimizer, PolyLRScheduler(optimizer, trainer.initial_lr, trainer.num_epochs)


def add_checkpoint_section(filename: str, key: str, state: dict) -> None:
    """Add a plugin's state under ``key`` to a checkpoint nnU-Net just wrote (rewritten atomically).

    nnU-Net's save_checkpoint builds and saves its dictionary in one go, so the extra state is added
    afterwards; ``network_weights`` stays what stock inference loads.
    """
    checkpoint = torch.load(filename, map_location="cpu", weights_only=False)
    checkpoint[key] = state
    atomic_torch_save(checkpoint, filename)


def read_checkpoint_section(filename_or_checkpoint, key: str, device: torch.device, trainer_name: str) -> dict:
    """The plugin state stored under ``key``; a RuntimeError naming the file if it is missing."""
    checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
        torch.load(filename_or_checkpoint, map_location=device, weights_only=False)
    if key not in checkpoint:
        where = filename_or_checkpoint if isinstance(filename_or_checkpoint, str) else "the given checkpoint"
        raise RuntimeError(f"{where} has no '{key}' section: it was not written by {trainer_name}")
    return checkpoint[key]


def average_gradients(module: nn.Module) -> None:
    """All-reduce (mean) the gradients of a module that is not wrapped in DDP, so every rank steps alike."""
    if not is_distributed():
        return
    world_size = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


def autocast_for(device: torch.device):
    """nnU-Net's mixed precision: autocast on CUDA, nothing elsewhere (CPU autocast is slow, MPS unsupported)."""
    return torch.autocast(device.type, enabled=True) if device.type == "cuda" else contextlib.nullcontext()


def dataset_channels(trainer_name: str, dataset_json: dict, modality_groups) -> list:
    """Channel indices of each group of modality names, found by name; a ValueError that says how to fix it."""
    channel_names = dataset_json.get("channel_names", dataset_json.get("modality"))
    try:
        return [channel_indices(channel_names, group) for group in modality_groups]
    except ValueError as e:
        raise ValueError(f"{trainer_name}: the dataset's dataset.json cannot serve this trainer: {e}. Convert the "
                         f"dataset with all of {', '.join(MODALITIES)} (nnunet_kd_convert_brats).") from None
