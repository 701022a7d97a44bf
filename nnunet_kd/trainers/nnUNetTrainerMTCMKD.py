"""MTCM-KD: multi-teacher cross-modal distillation into a single-modality student.

The student (``self.network``) is nnU-Net's planned network on one channel (T1ce by
default). Teachers use the same planned architecture on other channels and train
online, with their own optimiser, together with the CDSFL fusion module. The student
learns from the ground truth, from the teachers' outputs (performance-aware response
KD) and from the fused CDSFL output at the CDSFL deep-supervision levels.

Default (region-aware, performance-aware KD): each teacher, and CDSFL, distils each region only as far
as its moving-average validation Dice there leads the student's (losses/performance.py), with
supervision at nnU-Net's weight 1.0 and distillation ramped in on top. The paper's rule is
nnUNetTrainerMTCMKD_PaperWeights. docs/methods.md gives every loss term and weight.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch import distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.loss.dice import get_tp_fp_fn_tn
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kd.atomic import atomic_write_json
from nnunet_kd.brats import dataset_modalities
from nnunet_kd.losses.cdsfl import CDSFL, cdsfl_seg_loss, fuse_with_detached_copy
from nnunet_kd.losses.mtcmkd_student import STUDENT_TERMS, ResponseKD, kd_rampup, student_loss_terms
from nnunet_kd.losses.performance import (PerformanceTracker, RegionPerformance, whole_tumour_channel,
                                          whole_tumour_stats)
from nnunet_kd.training.budget import apply_budget_overrides, check_budget_environment
from nnunet_kd.training.checkpoints import CheckpointSectionMixin
from nnunet_kd.training.compilation import CompiledGraphLogMixin
from nnunet_kd.training.gradient_shares import GradientShareMeter, allow_retained_compiled_graphs
from nnunet_kd.training.features import FeatureTap, InputChannelSelector, decoder_channels, unwrap_network
from nnunet_kd.training.model_folder import dataset_channels, subset_dataset_json, subset_plans
from nnunet_kd.training.optimisation import backward_and_step, sgd_with_poly_lr
from nnunet_kd.training.precision import CPUAutocastMixin
from nnunet_kd.training.teachers import check_teacher_fold, load_frozen_teacher, resolve_teacher_checkpoint


#: Per-epoch distillation record (gradient shares, KD weights, teacher Dice) in the fold's output folder.
DISTILLATION_LOG = "distillation_log.json"


def _rounded(value, digits: int = 4):
    """``value`` (number, tensor, list or dict of them) as JSON-able numbers rounded to ``digits``; NaN as None."""
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if torch.is_tensor(value) or isinstance(value, (list, tuple, np.ndarray)):
        return [_rounded(v, digits) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    value = float(value)
    return None if np.isnan(value) else round(value, digits)


class nnUNetTrainerMTCMKD(CompiledGraphLogMixin, CPUAutocastMixin, CheckpointSectionMixin, nnUNetTrainer):
    """MTCM-KD with a T1ce student and three unimodal teachers (T1, T2, FLAIR), trained online."""

    student_modality: str = "T1ce"
    #: One tuple of modality names per teacher.
    teacher_modalities: Tuple[Tuple[str, ...], ...] = (("T1",), ("T2",), ("FLAIR",))
    #: Deep-supervision levels used by CDSFL (0 = full resolution). The paper uses the half-resolution level.
    cdsfl_levels: Tuple[int, ...] = (1,)
    cdsfl_reduction: int = 16
    #: Teacher loss = sum of teacher seg losses + cdsfl_loss_weight * CDSFL seg loss.
    cdsfl_loss_weight: float = 0.08
    #: Response KD (docs/methods.md, "KD defaults"): KL(teacher || student) at temperature ``kd_temperature``, times
    #: T ** ``kd_temperature_power``, reduced over voxels by ``kd_reduction`` ("mean": per-voxel mean like
    #: nnU-Net's Dice + CE; "batchmean": the reference's sum over the patch). ``kd_total_weight``: the teachers'
    #: weights together at full strength (every teacher leading on every region; the paper's rule: their
    #: fixed sum), which gives response KD about a third of the student's gradient at its logits; the
    #: reference's settings are the _Reference and _VoxelMeanT1 variants.
    kd_temperature: float = 2.0
    kd_temperature_power: int = 2
    kd_reduction: str = "mean"
    kd_total_weight: float = 0.5
    #: Region rule (losses/performance.py): w[i, r] = kd_region_weight * clip((D_i,r - D_student,r) / kd_dice_margin,
    #: 0, 1) with D the validation pseudo-Dice averaged over epochs with momentum kd_dice_momentum. None:
    #: kd_total_weight / number of teachers, so all teachers at full weight are exactly the calibrated KD.
    kd_region_weight: Optional[float] = None
    kd_dice_margin: float = 0.05
    kd_dice_momentum: float = 0.9
    #: KD starts in this epoch ("after the first epoch" in the paper). Before it the student loss is
    #: nnU-Net's deep-supervised segmentation loss alone, as in the reference.
    kd_start_epoch: int = 1
    #: Both KD terms are multiplied by a linear ramp from 1/kd_rampup_epochs in epoch kd_start_epoch to 1.
    kd_rampup_epochs: int = 10
    #: Student loss once KD is on (docs/methods.md): student_seg_weight x nnU-Net's loss
    #: + student_ds_weight x student_ds_seg_fraction x seg at each CDSFL level + ramp x (sum_i KD_i(w_i)
    #: + student_ds_weight x student_ds_kd_fraction x KD(CDSFL)). Default: nnU-Net's loss at 1.0 (its deep
    #: supervision already covers the CDSFL levels); CDSFL KD at most 0.10 x 0.3 = 0.03 per region.
    student_seg_weight: float = 1.0
    student_ds_weight: float = 0.10
    student_ds_seg_fraction: float = 0.0
    student_ds_kd_fraction: float = 0.3
    #: True: the CDSFL head learns at weight 1.0 from detached teacher features, the teachers get
    #: cdsfl_loss_weight x its loss (losses/cdsfl.py); False: the paper's single path at cdsfl_loss_weight.
    cdsfl_head_full_weight: bool = True
    #: True: teachers come from pretrained checkpoints and stay frozen (see nnUNetTrainerMTCMKD_FrozenTeachers).
    freeze_teachers: bool = False
    checkpoint_section = "kd_state"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        check_budget_environment()  # before nnU-Net creates the fold folder and its log
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_budget_overrides(self)
        self.student_channels, *self.teacher_channels = dataset_channels(
            self.__class__.__name__, dataset_json, [[self.student_modality], *self.teacher_modalities])
        self.student_dataset_json = subset_dataset_json(dataset_json, self.student_channels)
        self.teachers: List[nn.Module] = []
        self.teacher_taps: List[FeatureTap] = []
        self.cdsfl = None
        self.teacher_optimizer = self.teacher_lr_scheduler = None
        #: Teachers' whole-tumour Dice on the training batches (the paper's weights; logged by every variant).
        self.performance_tracker = PerformanceTracker(len(self.teacher_channels))
        #: Moving-average validation Dice per region of the student, each teacher and CDSFL (the default rule).
        self.region_performance = RegionPerformance(self.kd_dice_momentum)
        #: Unramped per-teacher, per-output-channel KD weights (N, C) and CDSFL factors per level (L, C):
        #: zero until the first validation has measured the Dice (created in initialize, sized by the outputs).
        self.kd_region_weights: Optional[torch.Tensor] = None
        self.cdsfl_region_weights: Optional[torch.Tensor] = None
        #: Student loss terms whose gradient at the student's logits is measured every step.
        self.gradient_shares = GradientShareMeter(STUDENT_TERMS)
        self._epoch_kd_record: Optional[dict] = None
        self.kd_history: List[dict] = []
        self._teacher_warnings: List[str] = []

    # ------------------------------------------------------------------ set-up
    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("initialize called twice")
        if not self.enable_deep_supervision:
            raise RuntimeError(f"{self.__class__.__name__} needs deep supervision (CDSFL works on its levels)")
        # The base class sizes self.network from dataset.json: hand it the student's one-channel view.
        full_dataset_json = self.dataset_json
        self.dataset_json = self.student_dataset_json
        try:
            super().initialize()
        finally:
            self.dataset_json = full_dataset_json
        num_levels = len(unwrap_network(self.network).decoder.stages)
        bad = [lvl for lvl in self.cdsfl_levels if not 0 <= lvl < num_levels]
        if bad:
            raise ValueError(f"cdsfl_levels {bad} are not deep-supervision levels of this plan (0..{num_levels - 1})")
        teachers = self._build_teachers()
        self.teacher_taps = [FeatureTap(t, self.cdsfl_levels) for t in teachers]
        channels = {lvl: [decoder_channels(t, lvl) for t in teachers] for lvl in self.cdsfl_levels}
        self.cdsfl = CDSFL(self.cdsfl_levels, channels, self.label_manager.num_segmentation_heads,
                           conv_op=unwrap_network(self.network).encoder.conv_op,
                           reduction=self.cdsfl_reduction).to(self.device)
        # Teachers compile exactly when nnU-Net compiles the student; Dynamo traces the taps' hooks (created
        # above, before any forward pass). In place, so their state_dict keys do not change.
        if self._do_i_compile():
            allow_retained_compiled_graphs()  # the gradient shares take a second backward
            for t in teachers:
                t.compile()
        trainable = list(self.cdsfl.parameters())
        if not self.freeze_teachers:
            for t in teachers:
                trainable += list(t.parameters())
        self.teacher_optimizer, self.teacher_lr_scheduler = sgd_with_poly_lr(trainable, self)
        if self.is_ddp:
            # DDP broadcasts rank 0's weights at wrap time, so all ranks start from the same teachers.
            device_ids = [self.local_rank] if self.device.type == "cuda" else None
            if not self.freeze_teachers:
                # When nnU-Net compiles, its loss gives the lowest deep-supervision level weight 0, so the
                # teachers' heads of that level get no gradient and DDP would wait for them forever: let DDP
                # find them. (nnU-Net's compiled student gives every parameter a gradient, zeros included.)
                unused_heads = any(w == 0 for w in self.loss.weight_factors)
                teachers = [DDP(t, device_ids=device_ids, find_unused_parameters=unused_heads) for t in teachers]
            self.cdsfl = DDP(self.cdsfl, device_ids=device_ids)
        self.teachers = teachers
        heads = self.label_manager.num_segmentation_heads
        self.kd_region_weights = torch.zeros(len(teachers), heads, dtype=torch.float64)
        self.cdsfl_region_weights = torch.zeros(len(self.cdsfl_levels), heads, dtype=torch.float64)
        for warning in self._teacher_warnings:
            self.print_to_log_file(warning)
        self.print_to_log_file(
            f"MTCM-KD: student {self.student_modality} (channel {self.student_channels}), teachers "
            f"{[list(m) for m in self.teacher_modalities]} (channels {self.teacher_channels}), CDSFL levels "
            f"{list(self.cdsfl_levels)}, frozen teachers: {self.freeze_teachers}")

    def _build_teachers(self) -> List[nn.Module]:
        """The teachers: nnU-Net's planned architecture on each teacher's channels."""
        return [self.build_network_architecture(self.plans_manager, self.configuration_manager, len(channels),
                                                self.label_manager.num_segmentation_heads,
                                                self.enable_deep_supervision).to(self.device)
                for channels in self.teacher_channels]

    def set_deep_supervision_enabled(self, enabled: bool):
        unwrap_network(self.network).decoder.deep_supervision = enabled

    def on_train_start(self):
        super().on_train_start()
        # Stock nnUNetv2_predict rebuilds the network from these two files: describe the one-channel student.
        if self.local_rank == 0:
            atomic_write_json(subset_plans(self.plans_manager.plans, self.student_channels),
                              os.path.join(self.output_folder_base, "plans.json"))
            atomic_write_json(self.student_dataset_json, os.path.join(self.output_folder_base, "dataset.json"))

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        for t in self.teachers:
            t.train(not self.freeze_teachers)
        self.cdsfl.train()
        self.teacher_lr_scheduler.step(self.current_epoch)
        self.performance_tracker.reset()
        self.gradient_shares.reset()
        record = self._kd_weight_record()
        self._epoch_kd_record = record if self.kd_active else None
        self.print_to_log_file(f"KD weights this epoch (ramp {self.kd_ramp:.3f}): {json.dumps(_rounded(record))}"
                               f"{'' if self.kd_active else ' (KD not started yet)'}")

    @property
    def kd_active(self) -> bool:
        return self.current_epoch >= self.kd_start_epoch

    @property
    def kd_ramp(self) -> float:
        """Factor on both KD terms this epoch (losses.mtcmkd_student.kd_rampup)."""
        return kd_rampup(self.current_epoch, self.kd_start_epoch, self.kd_rampup_epochs)

    # ------------------------------------------------------------------ KD weights
    def _teacher_names(self) -> List[str]:
        return ["+".join(m) for m in self.teacher_modalities]

    def _region_names(self) -> List[str]:
        """Names of the output channels (regions, or classes with background) as dataset.json gives them."""
        labels = {k: v for k, v in self.dataset_json["labels"].items() if k != "ignore"}
        lm = self.label_manager
        if lm.has_regions:
            names = [k for k, v in labels.items() if np.any(np.atleast_1d(v) != 0)]
        else:
            by_value = {int(v): k for k, v in labels.items() if np.isscalar(v)}
            names = [by_value.get(int(v), str(v)) for v in lm.all_labels]
        heads = lm.num_segmentation_heads
        return names if len(names) == heads else [f"channel{i}" for i in range(heads)]

    def _max_region_weight(self) -> float:
        return self.kd_region_weight if self.kd_region_weight is not None else \
            self.kd_total_weight / len(self.teacher_channels)

    def _update_weights_after_training(self) -> None:
        """Hook at the end of each training epoch (the paper's rule updates its weights here)."""

    def _update_weights_after_validation(self) -> None:
        """The region rule: next epoch's weights from the moving-average validation Dice (identical on all
        ranks: RegionPerformance sums the counts over the ranks first). Label training: the background
        channel gets 0 (its probability follows from the classes', which carry their own weights)."""
        heads = self.label_manager.num_segmentation_heads
        regions = heads if self.label_manager.has_regions else heads - 1
        teacher = self.region_performance.weights([f"teacher{i}" for i in range(len(self.teacher_channels))],
                                                  self._max_region_weight(), self.kd_dice_margin, regions)
        cdsfl = self.region_performance.weights([f"cdsfl{lvl}" for lvl in self.cdsfl_levels], 1.0,
                                                self.kd_dice_margin, regions)
        if not self.label_manager.has_regions:
            teacher, cdsfl = (torch.cat([torch.zeros(len(w), 1, dtype=w.dtype), w], dim=1) for w in (teacher, cdsfl))
        self.kd_region_weights, self.cdsfl_region_weights = teacher, cdsfl

    def _teacher_kd_weights(self) -> List:
        """Per teacher: its (C,) channel weights (ramp applied in student_loss_terms)."""
        return list(self.kd_region_weights.unbind(0))

    def _cdsfl_kd_weights(self) -> Optional[Dict[int, torch.Tensor]]:
        """Per CDSFL level: (C,) factors on student_ds_weight x student_ds_kd_fraction."""
        return dict(zip(self.cdsfl_levels, self.cdsfl_region_weights.unbind(0)))

    def _kd_weight_record(self, ramp: Optional[float] = None) -> dict:
        """The effective KD weights (ramp included, unless ``ramp`` is given) by source, for the logs:
        per teacher and per CDSFL level a list over the output channels (a number for the paper's rule)."""
        ramp = self.kd_ramp if ramp is None else ramp
        cdsfl_scale = ramp * self.student_ds_weight * self.student_ds_kd_fraction
        record = {name: (w * ramp).tolist() if torch.is_tensor(w) else w * ramp
                  for name, w in zip(self._teacher_names(), self._teacher_kd_weights())}
        cdsfl = self._cdsfl_kd_weights()
        for lvl in self.cdsfl_levels:
            w = 1.0 if cdsfl is None else cdsfl[lvl]
            record[f"cdsfl{lvl}"] = (w * cdsfl_scale).tolist() if torch.is_tensor(w) else w * cdsfl_scale
        return record

    # ------------------------------------------------------------------ forward passes
    def _teacher_forward(self, data: torch.Tensor, detached_fusion: bool = False) -> Tuple[
            List[List[torch.Tensor]], Dict[int, torch.Tensor], Optional[Dict[int, torch.Tensor]]]:
        """Teacher outputs (one deep-supervision list each), the fused CDSFL logits per level and, with
        ``detached_fusion`` while the teachers train and the head learns at full weight, the fused logits
        from detached teacher features (losses.cdsfl.fuse_with_detached_copy; else None)."""
        outputs, features = [], {lvl: [] for lvl in self.cdsfl_levels}
        with torch.no_grad() if self.freeze_teachers else contextlib.nullcontext():
            for teacher, tap, channels in zip(self.teachers, self.teacher_taps, self.teacher_channels):
                out = teacher(data[:, channels])
                # Pretrained teachers run without deep supervision: only their full-resolution output exists.
                # float32 for the losses that read them (seg loss, KL), as the student's.
                outputs.append([o.float() for o in out] if isinstance(out, (list, tuple)) else [out.float()])
                for lvl, feat in tap.take()["decoder"].items():
                    features[lvl].append(feat)
        if detached_fusion and self.cdsfl_head_full_weight and not self.freeze_teachers:
            fused, from_detached = fuse_with_detached_copy(self.cdsfl, features)
            return outputs, {lvl: f.float() for lvl, f in fused.items()}, \
                {lvl: f.float() for lvl, f in from_detached.items()}
        return outputs, {lvl: fused.float() for lvl, fused in self.cdsfl(features).items()}, None

    def _teacher_loss(self, outputs, fused, target, fused_from_detached=None) -> torch.Tensor:
        """Teachers' seg losses plus the CDSFL loss (losses.cdsfl.cdsfl_seg_loss): the teachers get
        cdsfl_loss_weight of it, the head 1.0 (with ``fused_from_detached``, or frozen teachers whose
        features carry no gradient) or, for the paper's single path, cdsfl_loss_weight too."""
        if self.freeze_teachers:
            weight = 1.0 if self.cdsfl_head_full_weight else self.cdsfl_loss_weight
            return cdsfl_seg_loss(self.loss.loss, fused, target, weight)
        cdsfl_loss = cdsfl_seg_loss(self.loss.loss, fused, target, self.cdsfl_loss_weight, fused_from_detached)
        return sum(self.loss(o, target) for o in outputs) + cdsfl_loss

    def _kd(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            channel_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ResponseKD(self.kd_temperature, self.kd_temperature_power, self.kd_reduction,
                          self.label_manager.has_regions)(student_logits, teacher_logits, channel_weights)

    def _student_terms(self, student_out, teacher_outputs, fused, target) -> Dict[str, torch.Tensor]:
        """The student loss as weighted terms (their sum is the loss), keyed by STUDENT_TERMS names."""
        return student_loss_terms(
            student_out, teacher_outputs, fused, target, seg_loss=self.loss, kd=self._kd,
            kd_weights=self._teacher_kd_weights(), levels=self.cdsfl_levels, kd_active=self.kd_active,
            seg_weight=self.student_seg_weight, ds_weight=self.student_ds_weight,
            ds_seg_fraction=self.student_ds_seg_fraction, ds_kd_fraction=self.student_ds_kd_fraction,
            kd_scale=self.kd_ramp, cdsfl_kd_weights=self._cdsfl_kd_weights())

    def _student_loss(self, student_out, teacher_outputs, fused, target) -> torch.Tensor:
        return sum(self._student_terms(student_out, teacher_outputs, fused, target).values())

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher_optimizer.zero_grad(set_to_none=True)
        with self.step_autocast():
            teacher_outputs, fused, fused_from_detached = self._teacher_forward(data, detached_fusion=True)
            teacher_loss = self._teacher_loss(teacher_outputs, fused, target, fused_from_detached)
            # The losses see float32 logits, where each term's own (unscaled) gradient is measured: under
            # autocast the half-precision logits' gradients of a single unscaled term would underflow.
            student_out = [o.float() for o in self.network(data[:, self.student_channels])]
            terms = self._student_terms(student_out, teacher_outputs, fused, target)
            student_loss = sum(terms.values())
        self.gradient_shares.update(terms, student_out)
        # Teacher logits enter the student loss detached, so one backward pass trains both sides separately.
        total = teacher_loss + student_loss
        trainable_teachers = [] if self.freeze_teachers else self.teachers
        backward_and_step(total, [self.optimizer, self.teacher_optimizer],
                          [self.network, self.cdsfl] + trainable_teachers, self.grad_scaler)
        for i, t_out in enumerate(teacher_outputs):
            self.performance_tracker.update(i, whole_tumour_stats(t_out[0].detach(), target[0],
                                                                  self.label_manager.has_regions,
                                                                  self._wt_channel()))
        return {"loss": student_loss.detach().cpu().numpy(), "teacher_loss": teacher_loss.detach().cpu().numpy()}

    def _wt_channel(self) -> int:
        """Output channel of the whole-tumour region (see losses.performance.whole_tumour_channel)."""
        lm = self.label_manager
        return whole_tumour_channel(lm.foreground_regions if lm.has_regions else None)

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        teacher_loss = np.mean([o["teacher_loss"] for o in train_outputs])
        if self.is_ddp:
            t = torch.tensor([teacher_loss], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            teacher_loss = float(t.item() / dist.get_world_size())
        # Sum the epoch's teacher statistics over all ranks so every rank derives the same weights.
        self.performance_tracker.all_reduce()
        teacher_dice = self.performance_tracker.dice()
        self._update_weights_after_training()
        shares = self.gradient_shares.summary()  # reduced over the ranks
        self.kd_history.append({"epoch": self.current_epoch, "gradient_share": shares["share"],
                                "gradient_norm": shares["norm"], "regions": self._region_names(),
                                "kd_ramp": self.kd_ramp if self.kd_active else 0.0, "kd_weights": self._epoch_kd_record,
                                "teacher_loss": float(teacher_loss), "teacher_train_wt_dice": teacher_dice.tolist(),
                                "next_kd_weights": self._kd_weight_record(ramp=1.0)})
        self.print_to_log_file(
            "student gradient at its logits, share (mean norm): " + ", ".join(
                f"{name} {shares['share'][name]:.3f} ({shares['norm'][name]:.3g})" for name in STUDENT_TERMS))
        self.print_to_log_file(f"teacher loss {np.round(teacher_loss, 4)}, teacher train WT Dice "
                               f"{np.round(teacher_dice.numpy(), 4).tolist()}")

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        for t in self.teachers:
            t.eval()
        self.cdsfl.eval()

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"]
        result = super().validation_step({**batch, "data": data[:, self.student_channels]})
        # nnU-Net's own hard counts of the student, the same as _hard_stats counts the teachers'.
        result["student_stats"] = np.stack([result["tp_hard"], result["fp_hard"], result["fn_hard"]]).astype(np.float64)
        data = data.to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        with self.step_autocast():
            teacher_outputs, fused, _ = self._teacher_forward(data)
        outputs = {f"teacher{i}": o[0] for i, o in enumerate(teacher_outputs)}
        outputs.update({f"cdsfl{lvl}": fused[lvl] for lvl in self.cdsfl_levels})
        for name, logits in outputs.items():
            lvl = int(name[5:]) if name.startswith("cdsfl") else 0
            result[f"{name}_stats"] = self._hard_stats(logits, target[lvl])
        return result

    def _hard_stats(self, logits: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        """(3, classes) array of tp, fp, fn per foreground region/label, as nnU-Net's pseudo Dice counts them."""
        axes = [0] + list(range(2, logits.ndim))
        if self.label_manager.has_regions:
            pred = (torch.sigmoid(logits.float()) > 0.5).long()
        else:
            pred = torch.zeros_like(logits, dtype=torch.float32)
            pred.scatter_(1, logits.argmax(1, keepdim=True), 1)
        tp, fp, fn, _ = get_tp_fp_fn_tn(pred, target, axes=axes)
        stats = torch.stack([tp, fp, fn]).detach().cpu().numpy().astype(np.float64)
        return stats if self.label_manager.has_regions else stats[:, 1:]

    def on_validation_epoch_end(self, val_outputs: List[dict]):
        super().on_validation_epoch_end(val_outputs)
        keys = [k for k in val_outputs[0] if k.endswith("_stats")]
        local = {k[:-len("_stats")]: np.sum([o[k] for o in val_outputs], 0) for k in keys}
        # One all-reduce of every source's counts, then Dice and its moving average: the same on every rank.
        epoch_dice = self.region_performance.update(local)
        self._update_weights_after_validation()
        names = {f"teacher{i}": n for i, n in enumerate(self._teacher_names())}
        summary = {names.get(k, k): _rounded(v) for k, v in epoch_dice.items()}
        ema = {names.get(k, k): _rounded(v) for k, v in self.region_performance.ema.items()}
        self.print_to_log_file(f"Pseudo dice of student, teachers and CDSFL per region {self._region_names()}: "
                               f"{json.dumps(summary)}; moving averages {json.dumps(ema)}")
        self.print_to_log_file(f"KD weights for the next epoch (before the ramp): "
                               f"{json.dumps(_rounded(self._kd_weight_record(ramp=1.0)))}")
        if self.kd_history and self.kd_history[-1]["epoch"] == self.current_epoch:
            self.kd_history[-1].update(val_pseudo_dice=summary, ema_val_dice=ema,
                                       next_kd_weights=self._kd_weight_record(ramp=1.0))

    def on_epoch_end(self):
        self.write_distillation_log()
        super().on_epoch_end()

    def write_distillation_log(self) -> None:
        """kd_history (per epoch: gradient shares, KD weights, teacher Dice) as JSON in the output folder."""
        if self.local_rank == 0:
            atomic_write_json(self.kd_history, os.path.join(self.output_folder, DISTILLATION_LOG))

    # ------------------------------------------------------------------ validation and checkpoints
    def perform_actual_validation(self, save_probabilities: bool = False):
        # nnU-Net hands all preprocessed channels to self.network: let the student see only its own.
        student = self.network
        self.network = InputChannelSelector(student, self.student_channels)
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.network = student

    def checkpoint_state(self) -> dict:
        return {
            "student_modality": self.student_modality,
            "teacher_modalities": [list(m) for m in self.teacher_modalities],
            "teacher_weights": [unwrap_network(t).state_dict() for t in self.teachers],
            "cdsfl_weights": unwrap_network(self.cdsfl).state_dict(),
            "teacher_optimizer_state": self.teacher_optimizer.state_dict(),
            "performance_tracker": self.performance_tracker.state_dict(),
            "region_performance": self.region_performance.state_dict(),
            "kd_region_weights": self.kd_region_weights.clone(),
            "cdsfl_region_weights": self.cdsfl_region_weights.clone(),
            "kd_history": self.kd_history,
        }

    def load_checkpoint_state(self, state: dict) -> None:
        if [list(m) for m in self.teacher_modalities] != state["teacher_modalities"]:
            raise RuntimeError(f"checkpoint teachers {state['teacher_modalities']} differ from this trainer's "
                               f"{[list(m) for m in self.teacher_modalities]}")
        for teacher, weights in zip(self.teachers, state["teacher_weights"]):
            unwrap_network(teacher).load_state_dict(weights)
        unwrap_network(self.cdsfl).load_state_dict(state["cdsfl_weights"])
        self.teacher_optimizer.load_state_dict(state["teacher_optimizer_state"])
        self.performance_tracker.load_state_dict(state["performance_tracker"])
        self.kd_history = list(state["kd_history"])
        missing = {"region_performance", "kd_region_weights", "cdsfl_region_weights"} - set(state)
        if missing:
            raise RuntimeError(f"checkpoint lacks {sorted(missing)}: it was written by an MTCM-KD version with the "
                               f"paper's weights only; continue it with nnUNetTrainerMTCMKD_PaperWeights")
        self.region_performance.load_state_dict(state["region_performance"])
        self.kd_region_weights = state["kd_region_weights"].double().cpu()
        self.cdsfl_region_weights = state["cdsfl_region_weights"].double().cpu()


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

    def initialize(self):
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
