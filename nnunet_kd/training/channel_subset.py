"""dataset.json and plans.json cut down to some of the dataset's channels, the channels of each group of
modalities a trainer needs (found by name), and a trainer whose network sees only some channels.

``nnUNetv2_predict`` rebuilds the network with ``len(channel_names)`` input channels and
preprocesses each channel with the per-channel lists of the plans, so a student model
folder must hold versions of both files cut to the student's channels.
"""
from __future__ import annotations

import copy
import os
from typing import Any, Dict, List, Sequence

from nnunet_kd.atomic import atomic_write_json
from nnunet_kd.brats import MODALITIES, channel_indices, channel_names_of
from nnunet_kd.training.features import InputChannelSelector, unwrap_network


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


class StudentChannelsMixin:
    """For nnU-Net trainers whose own network (the student) sees only ``student_channels`` of the dataset.

    nnU-Net sizes the network from ``student_dataset_json`` (dataset.json cut to those channels); the model
    folder's plans.json and dataset.json describe that network, so stock ``nnUNetv2_predict`` runs it on
    those channels alone; the final validation, where nnU-Net hands the network every channel, feeds it only
    its own. Set both attributes in ``__init__``; put the mixin before nnUNetTrainer in the bases.
    """

    student_channels: List[int]
    student_dataset_json: Dict[str, Any]

    def initialize(self) -> None:
        # The base class sizes self.network from dataset.json: hand it the student's view.
        full_dataset_json = self.dataset_json
        self.dataset_json = self.student_dataset_json
        try:
            super().initialize()
        finally:
            self.dataset_json = full_dataset_json

    def on_train_start(self) -> None:
        super().on_train_start()
        # Stock nnUNetv2_predict rebuilds the network from these two files: describe the student.
        if self.local_rank == 0:
            atomic_write_json(subset_plans(self.plans_manager.plans, self.student_channels),
                              os.path.join(self.output_folder_base, "plans.json"))
            atomic_write_json(self.student_dataset_json, os.path.join(self.output_folder_base, "dataset.json"))

    def set_deep_supervision_enabled(self, enabled: bool) -> None:
        # nnU-Net's own version does not see through the InputChannelSelector of the final validation.
        unwrap_network(self.network).decoder.deep_supervision = enabled

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        # nnU-Net hands all preprocessed channels to self.network: let the student see only its own.
        student = self.network
        self.network = InputChannelSelector(student, self.student_channels)
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.network = student
