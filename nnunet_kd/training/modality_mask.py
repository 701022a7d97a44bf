"""Random modality-availability masks for missing-modality training (MGSD and modality dropout).

Convention: column ``m`` of a mask refers to modality ``m`` in the caller's
canonical modality order (e.g. T1, T1ce, T2, FLAIR); ``channel_indices[m]``
says which input channel holds that modality, so nothing depends on the
dataset's channel order.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["sample_modality_masks", "apply_modality_mask"]


def sample_modality_masks(
    batch_size: int,
    num_modalities: int = 4,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw one availability mask per sample, uniformly over proper non-empty subsets.

    Each row is one of the ``2**M - 2`` subsets that are neither empty (would give an all-zero input and NaN
    losses) nor complete (the full pass already covers that case): the same distribution as the reference's
    "keep each with p = 0.5 and resample while empty or full", without a rejection loop.

    Args:
        batch_size: B, the number of masks.
        num_modalities: M, in [2, 62].
        generator: draws on its device (CPU when None), then the masks move to ``device``, so a seeded CPU
            generator gives the same masks whatever the target device.
        device: where the masks go (None: the generator's device).

    Returns:
        (B, M) bool tensor; True = modality available.
    """
    if batch_size < 0:
        raise ValueError(f"batch_size must be >= 0, got {batch_size}")
    if not 2 <= num_modalities <= 62:
        raise ValueError(f"num_modalities must be in [2, 62] (need a proper non-empty subset), got {num_modalities}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    # Subset codes 1 .. 2**M - 2: bit m of the code is modality m (0 = empty, 2**M - 1 = full excluded).
    codes = torch.randint(1, 2 ** num_modalities - 1, (batch_size,), generator=generator, device=gen_device)
    bits = torch.arange(num_modalities, device=gen_device)
    masks = ((codes[:, None] >> bits[None, :]) & 1).bool()
    return masks.to(device) if device is not None else masks


def apply_modality_mask(
    data: torch.Tensor,
    modality_mask: torch.Tensor,
    channel_indices: Sequence[int],
) -> torch.Tensor:
    """Zero-fill missing modalities, per sample.

    Args:
        data: (B, C, *spatial), already normalised (so 0 is the mean intensity).
        modality_mask: (B, M) bool, True = available.
        channel_indices: length M; modality m lives in channel ``channel_indices[m]``. Channels not listed
            are left untouched.

    Returns:
        A new tensor of data's shape and dtype; kept values are bit-identical (torch.where, not a
        multiplication, so NaN/-0.0 never leak into kept voxels). ValueError on a row without any
        available modality.
    """
    if data.ndim < 3:
        raise ValueError(f"data must be (B, C, *spatial), got shape {tuple(data.shape)}")
    mask = torch.as_tensor(modality_mask, device=data.device)
    if mask.dtype != torch.bool:
        raise ValueError(f"modality_mask must be a bool tensor, got {mask.dtype}")
    b, c = data.shape[:2]
    idx = [int(i) for i in channel_indices]
    if mask.ndim != 2 or mask.shape[0] != b or mask.shape[1] != len(idx):
        raise ValueError(f"modality_mask must have shape ({b}, {len(idx)}), got {tuple(mask.shape)}")
    if len(set(idx)) != len(idx) or any(not 0 <= i < c for i in idx):
        raise ValueError(f"channel_indices must be distinct indices in [0, {c}), got {idx}")
    if b > 0 and not bool(mask.any(dim=1).all()):
        raise ValueError("modality_mask has a row with every modality missing")
    keep = torch.ones(b, c, dtype=torch.bool, device=data.device)
    keep[:, idx] = mask
    keep = keep.view(b, c, *([1] * (data.ndim - 2)))
    return torch.where(keep, data, torch.zeros((), dtype=data.dtype, device=data.device))
