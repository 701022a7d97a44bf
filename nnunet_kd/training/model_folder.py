"""A trainer's view of dataset.json and plans.json: its channels, found by name, and the files of a
model that sees only some of the dataset's channels.

``nnUNetv2_predict`` rebuilds the network with ``len(channel_names)`` input channels and
preprocesses each channel with the per-channel lists of the plans, so a student model
folder must hold versions of both files cut to the student's channels.
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Sequence

from nnunet_kd.brats import MODALITIES, channel_indices, channel_names_of


def subset_dataset_json(dataset_json: Dict[str, Any], channels: Sequence[int]) -> Dict[str, Any]:
    """dataset.json whose ``channel_names`` hold only ``channels``, renumbered from 0."""
    out = copy.deepcopy(dataset_json)
    key = "channel_names" if "channel_names" in out else "modality"
    names = out[key]
    out[key] = {str(new): names[str(old)] for new, old in enumerate(channels)}
    return out


def subset_plans(plans: Dict[str, Any], channels: Sequence[int]) -> Dict[str, Any]:
    """plans.json whose per-channel entries (normalisation, mask flags, intensity properties) keep only ``channels``."""
    out = copy.deepcopy(plans)
    props = out.get("foreground_intensity_properties_per_channel")
    if props is not None:
        out["foreground_intensity_properties_per_channel"] = {
            str(new): props[str(old)] for new, old in enumerate(channels)
        }
    for config in out["configurations"].values():
        for key in ("normalization_schemes", "use_mask_for_norm"):
            if key in config:
                config[key] = [config[key][old] for old in channels]
    return out


def dataset_channels(trainer_name: str, dataset_json: dict, modality_groups: Sequence[Sequence[str]]) -> List[List[int]]:
    """Channel indices of each group of modality names, found by name; a ValueError that says how to fix it."""
    try:
        channel_names = channel_names_of(dataset_json)
        return [channel_indices(channel_names, group) for group in modality_groups]
    except ValueError as e:
        raise ValueError(f"{trainer_name}: the dataset's dataset.json cannot serve this trainer: {e}. Convert the "
                         f"dataset with all of {', '.join(MODALITIES)} (nnunet_kd_convert_brats).") from None
