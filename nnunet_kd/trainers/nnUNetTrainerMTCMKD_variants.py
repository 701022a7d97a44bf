"""Variants of MTCM-KD (nnUNetTrainerMTCMKD.py): other students and teachers, the paper's and the reference
code's weighting and KD scaling (github.com/RhineLT/mtcm-kd), CDSFL on every level, and frozen pretrained
teachers. Each is selected with ``nnUNetv2_train ... -tr <class name>``; docs/methods.md describes them.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
from torch import nn

from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_kd.brats import dataset_modalities
from nnunet_kd.trainers.nnUNetTrainerMTCMKD import nnUNetTrainerMTCMKD
from nnunet_kd.training.performance import RegionPerformance
from nnunet_kd.training.features import unwrap_network
from nnunet_kd.training.teachers import (check_teacher_fold, initialise_from_teacher, load_frozen_teacher,
                                         resolve_teacher_checkpoint)


class nnUNetTrainerMTCMKD_T1(nnUNetTrainerMTCMKD):
    """MTCM-KD with a T1 student (the paper's second setting); teachers on T1ce, T2 and FLAIR."""

    student_modality = "T1"
    teacher_modalities = (("T1ce",), ("T2",), ("FLAIR",))


class nnUNetTrainerMTCMKD_MultimodalTeacher(nnUNetTrainerMTCMKD):
    """One teacher that sees all four modalities, distilled into the T1ce student."""

    teacher_modalities = (("T1", "T1ce", "T2", "FLAIR"),)


class nnUNetTrainerMTCMKD_PaperWeights(nnUNetTrainerMTCMKD):
    """The paper's weighting and schedule (this project's default before issue 21), with the default KD scaling.

    Each teacher's whole-tumour Dice on the epoch's training batches, normalised so the teachers' weights
    sum to ``kd_total_weight``, one weight for every region, used in the next epoch (``initial_kd_weight``
    each before the first measurement); student loss 0.75 seg + sum_i w_i KD_i + 0.10 (0.7 DS seg + 0.3 DS
    KD) from ``kd_start_epoch`` on, without a ramp; the CDSFL head learns only through the teachers' loss,
    at ``cdsfl_loss_weight``.
    """

    #: Per-teacher KD weight before the first performance measurement; None: kd_total_weight / teachers.
    initial_kd_weight: Optional[float] = None
    kd_rampup_epochs = 0
    student_seg_weight = 0.75
    student_ds_seg_fraction = 0.7
    cdsfl_head_full_weight = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        initial = self.initial_kd_weight if self.initial_kd_weight is not None else \
            self.kd_total_weight / len(self.teacher_channels)
        self.performance_weights = torch.full((len(self.teacher_channels),), float(initial), dtype=torch.float64)

    def _update_weights_after_training(self) -> None:
        # The tracker holds the epoch's training-batch WT counts, already summed over the ranks.
        self.performance_weights = self.performance_tracker.compute_weights(self.kd_total_weight).double().cpu()

    def _update_weights_after_validation(self) -> None:
        pass  # the validation Dice is logged, not used

    def _teacher_kd_weights(self) -> List[float]:
        return self.performance_weights.tolist()

    def _cdsfl_kd_weights(self) -> None:
        return None

    def checkpoint_state(self) -> dict:
        return {**super().checkpoint_state(), "performance_weights": self.performance_weights.clone()}

    def load_checkpoint_state(self, state: dict) -> None:
        state = {"region_performance": RegionPerformance(self.kd_dice_momentum).state_dict(),
                 "kd_region_weights": self.kd_region_weights, "cdsfl_region_weights": self.cdsfl_region_weights,
                 **state}  # checkpoints of the earlier default (this rule) lack the region state
        super().load_checkpoint_state(state)
        self.performance_weights = state["performance_weights"].double().cpu()


class nnUNetTrainerMTCMKD_Reference(nnUNetTrainerMTCMKD_PaperWeights):
    """The reference code's response KD: KL with 'batchmean' (summed over the patch), times T, T = 20,
    teacher weights summing to 0.15 (0.1 each before the first measurement).

    On 3-D patches this KD is hundreds of times the supervised gradient at the student's logits.
    """

    kd_temperature = 20.0
    kd_temperature_power = 1
    kd_reduction = "batchmean"
    kd_total_weight = 0.15
    initial_kd_weight = 0.1


class nnUNetTrainerMTCMKD_VoxelMeanT1(nnUNetTrainerMTCMKD_Reference):
    """The reference's settings with the KL averaged over voxels (this project's earlier default).

    KD is then about 1 % of the student's gradient at its logits: it barely acts.
    """

    kd_reduction = "mean"


class nnUNetTrainerMTCMKD_KDFromStart(nnUNetTrainerMTCMKD_PaperWeights):
    """The paper's rule with response KD from the first epoch on (the reference starts it after the first
    epoch). Before the first performance measurement the teachers share ``kd_total_weight`` equally.

    (Under the default region rule KD from epoch 0 would change nothing: its weights are 0 until measured.)
    """

    kd_start_epoch = 0


class nnUNetTrainerMTCMKD_StrongKD(nnUNetTrainerMTCMKD_VoxelMeanT1):
    """Superseded by the default KD; kept to reproduce earlier results: the _VoxelMeanT1 KD scaled by T^2
    (Hinton et al.) instead of T, from the first epoch on (T = 20, so 20 times _VoxelMeanT1's KD)."""

    kd_temperature_power = 2
    kd_start_epoch = 0


class nnUNetTrainerMTCMKD_AllLevels(nnUNetTrainerMTCMKD):
    """CDSFL at every deep-supervision level below full resolution (the paper uses only half resolution)."""

    def initialize(self) -> None:
        # The decoder has one stage per pooling step: deep-supervision levels 0..len(pool_op_kernel_sizes) - 2.
        num_levels = len(self.configuration_manager.pool_op_kernel_sizes) - 1
        self.cdsfl_levels = tuple(range(1, num_levels))
        super().initialize()


class nnUNetTrainerMTCMKD_FrozenTeachers(nnUNetTrainerMTCMKD):
    """Teachers loaded from trained nnU-Net models and kept frozen; only the student and CDSFL train.

    The fast path for users who already have nnU-Net models, e.g. one four-channel teacher: the stock
    nnU-Net BraTS model of the same fold, turned into a T1ce model. Name one model per teacher in
    ``nnUNet_kd_teachers`` (separated by ``os.pathsep``): a checkpoint file, a ``fold_X`` folder or a
    model folder holding plans.json, dataset.json and fold folders (its ``fold_<student fold>`` is taken,
    else its ``fold_all``). A teacher of another cross-validation fold is refused (it trained on the
    student's validation cases); ``fold_all`` is allowed with a warning in the training log
    (training.teachers.check_teacher_fold). Each teacher sees the channels its own dataset.json names
    (matched by modality name), so unimodal and multimodal models both work. The teacher models must
    share this plan's spacing and pooling (the same preprocessing and levels). With frozen teachers the
    CDSFL head learns from its loss at weight 1.0 (the features carry no gradient).
    """

    freeze_teachers = True
    #: Teacher models; when empty, read from the environment variable ``nnUNet_kd_teachers``.
    pretrained_teachers: Tuple[str, ...] = ()

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        paths = list(self.pretrained_teachers) or \
            [p for p in os.environ.get("nnUNet_kd_teachers", "").split(os.pathsep) if p.strip()]
        if not paths:
            raise ValueError(f"{self.__class__.__name__} needs pretrained teachers: set nnUNet_kd_teachers to "
                             f"one or more nnU-Net model folders or checkpoints separated by '{os.pathsep}'")
        # Refuses a teacher of another cross-validation fold; fold_all is allowed with a warning in the log.
        self.teacher_sources = [resolve_teacher_checkpoint(p, fold) for p in paths]
        warnings = [check_teacher_fold(teacher_fold, fold, model_dir)
                    for model_dir, teacher_fold, _ in self.teacher_sources]
        self.teacher_modalities = tuple(tuple(dataset_modalities(load_json(os.path.join(model_dir, "dataset.json"))
                                                                 ["channel_names"]))
                                        for model_dir, _, _ in self.teacher_sources)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self._teacher_warnings = [w for w in warnings if w]

    def _build_teachers(self) -> List[nn.Module]:
        return [load_frozen_teacher(model_dir, fold_name, checkpoint_name, self.device, self.configuration_manager,
                                    self.label_manager)
                for model_dir, fold_name, checkpoint_name in self.teacher_sources]


class nnUNetTrainerMTCMKD_FrozenTeachers_KDx4(nnUNetTrainerMTCMKD_FrozenTeachers):
    """Frozen teachers with four times the default response-KD strength (``kd_total_weight`` 2.0).

    A lever of issue 21: with the default 0.5 a frozen four-channel teacher's response KD held 6-18 % of the
    student's gradient at its logits on the real 4 mm study (fold 0) and moved no region; at 2.0 it is
    expected at about a third (docs/results.md).
    """

    kd_total_weight = 2.0


class nnUNetTrainerMTCMKD_FrozenTeachers_WarmStart(nnUNetTrainerMTCMKD_FrozenTeachers):
    """Frozen teachers, and the student starts from the first teacher's weights (a lever of issue 21).

    The teacher must share the student's plans (the same architecture); its input convolution keeps the
    weights of the student's channels (training.teachers.initialise_from_teacher), so at the start the
    student on T1ce computes what the four-channel teacher computes with T1, T2 and FLAIR at zero. Then it
    trains as _FrozenTeachers does, with the default KD. Continuing with ``--c`` loads the student's
    checkpoint over the warm start. The way to turn an existing four-channel nnU-Net model into a T1ce model
    when its plans are this dataset's.
    """

    def initialize(self) -> None:
        super().initialize()
        teacher_inputs = self.teacher_channels[0]
        missing = [c for c in self.student_channels if c not in teacher_inputs]
        if missing:
            raise ValueError(f"{self.__class__.__name__}: the first teacher ({'+'.join(self.teacher_modalities[0])}) "
                             f"does not see the student's {self.student_modality}, so the student cannot start "
                             f"from its weights; give a teacher that sees {self.student_modality} first in "
                             f"nnUNet_kd_teachers")
        kept = [teacher_inputs.index(c) for c in self.student_channels]
        initialise_from_teacher(unwrap_network(self.network), unwrap_network(self.teachers[0]), kept)
        self.print_to_log_file(f"MTCM-KD warm start: the student starts from teacher "
                               f"{'+'.join(self.teacher_modalities[0])}, input channel(s) {kept} of its first "
                               f"convolution")
