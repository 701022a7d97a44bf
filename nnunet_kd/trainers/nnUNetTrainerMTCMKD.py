"""MTCM-KD: multi-teacher cross-modal distillation into a single-modality student (Ahmad, Ullah, Gwak,
Knowledge-Based Systems 297 (2024) 111854; reference code: github.com/RhineLT/mtcm-kd, a public fork of the
authors' repository).

The student (``self.network``) is nnU-Net's planned network on one channel (T1ce by default). Teachers use
the same planned architecture on other channels and train online, with their own optimiser, together with
the CDSFL fusion module. The student learns from the ground truth, from the teachers' outputs
(performance-aware response KD) and from the fused CDSFL output at the CDSFL deep-supervision levels.

Default (region-aware, performance-aware KD): each teacher, and CDSFL, distils each region only as far
as its moving-average validation Dice there leads the student's (training/performance.py), with
supervision at nnU-Net's weight 1.0 and distillation ramped in on top. The paper's rule and the other
variants are in nnUNetTrainerMTCMKD_variants.py. docs/methods.md gives every loss term and weight.
"""
from __future__ import annotations

import contextlib
import json
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kd.losses import (CDSFL, STUDENT_TERMS, ResponseKD, cdsfl_seg_loss, fuse_with_detached_copy,
                              student_loss_terms)
from nnunet_kd.training.budget import apply_budget_overrides, check_budget_environment
from nnunet_kd.training.channel_subset import StudentChannelsMixin, dataset_channels, subset_dataset_json
from nnunet_kd.training.compilation import CompiledGraphLogMixin
from nnunet_kd.training.distillation_log import DistillationLogMixin, rounded
from nnunet_kd.training.distributed import sum_over_ranks
from nnunet_kd.training.features import FeatureTap, decoder_channels, unwrap_network
from nnunet_kd.training.gradient_shares import allow_retained_compiled_graphs
from nnunet_kd.training.optimisation import backward_and_step, sgd_with_poly_lr
from nnunet_kd.training.performance import (PerformanceTracker, RegionPerformance, hard_stats, output_channel_names,
                                            whole_tumour_channel, whole_tumour_stats)
from nnunet_kd.training.precision import CPUAutocastMixin
from nnunet_kd.training.schedules import kd_rampup


class nnUNetTrainerMTCMKD(DistillationLogMixin, StudentChannelsMixin, CompiledGraphLogMixin, CPUAutocastMixin,
                          nnUNetTrainer):
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
    #: Region rule (training/performance.py): w[i, r] = kd_region_weight * clip((D_i,r - D_student,r) / kd_dice_margin,
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
    #: Student loss terms whose gradient at the student's logits is measured every step.
    loss_term_names = STUDENT_TERMS

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
        self.cdsfl = self.teacher_optimizer = self.teacher_lr_scheduler = None
        #: Teachers' whole-tumour Dice on the training batches (the paper's weights; logged by every variant).
        self.performance_tracker = PerformanceTracker(len(self.teacher_channels))
        #: Moving-average validation Dice per region of the student, each teacher and CDSFL (the default rule).
        self.region_performance = RegionPerformance(self.kd_dice_momentum)
        #: Unramped per-teacher, per-output-channel KD weights (N, C) and CDSFL factors per level (L, C):
        #: zero until the first validation has measured the Dice (created in initialize, sized by the outputs).
        self.kd_region_weights: Optional[torch.Tensor] = None
        self.cdsfl_region_weights: Optional[torch.Tensor] = None
        self._epoch_kd_record: Optional[dict] = None
        self._teacher_warnings: List[str] = []

    # ------------------------------------------------------------------ set-up
    def initialize(self) -> None:
        if self.was_initialized:
            raise RuntimeError("initialize called twice")
        if not self.enable_deep_supervision:
            raise RuntimeError(f"{self.__class__.__name__} needs deep supervision (CDSFL works on its levels)")
        super().initialize()  # the student on its own channel (StudentChannelsMixin)
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
        trainable = list(self.cdsfl.parameters()) + \
            ([] if self.freeze_teachers else [p for t in teachers for p in t.parameters()])
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

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        for t in self.teachers:
            t.train(not self.freeze_teachers)
        self.cdsfl.train()
        self.teacher_lr_scheduler.step(self.current_epoch)
        self.performance_tracker.reset()
        record = self._kd_weight_record()
        self._epoch_kd_record = record if self.kd_active else None
        self.print_to_log_file(f"KD weights this epoch (ramp {self.kd_ramp:.3f}): {json.dumps(rounded(record))}"
                               f"{'' if self.kd_active else ' (KD not started yet)'}")

    @property
    def kd_active(self) -> bool:
        return self.current_epoch >= self.kd_start_epoch

    @property
    def kd_ramp(self) -> float:
        """Factor on both KD terms this epoch (training.schedules.kd_rampup)."""
        return kd_rampup(self.current_epoch, self.kd_start_epoch, self.kd_rampup_epochs)

    # ------------------------------------------------------------------ KD weights
    def _teacher_names(self) -> List[str]:
        return ["+".join(m) for m in self.teacher_modalities]

    def _region_names(self) -> List[str]:
        return output_channel_names(self.dataset_json["labels"], self.label_manager)

    def _update_weights_after_training(self) -> None:
        """Hook at the end of each training epoch (the paper's rule updates its weights here)."""

    def _update_weights_after_validation(self) -> None:
        """The region rule: next epoch's weights from the moving-average validation Dice (identical on all
        ranks: RegionPerformance sums the counts over the ranks first). Label training: the background
        channel gets 0 (its probability follows from the classes', which carry their own weights)."""
        heads = self.label_manager.num_segmentation_heads
        regions = heads if self.label_manager.has_regions else heads - 1
        max_weight = self.kd_region_weight if self.kd_region_weight is not None else \
            self.kd_total_weight / len(self.teacher_channels)
        teacher = self.region_performance.weights([f"teacher{i}" for i in range(len(self.teacher_channels))],
                                                  max_weight, self.kd_dice_margin, regions)
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
        lm = self.label_manager
        wt_channel = whole_tumour_channel(lm.foreground_regions if lm.has_regions else None)
        for i, t_out in enumerate(teacher_outputs):
            self.performance_tracker.update(i, whole_tumour_stats(t_out[0].detach(), target[0],
                                                                  self.label_manager.has_regions, wt_channel))
        return {"loss": student_loss.detach().cpu().numpy(), "teacher_loss": teacher_loss.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: List[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        # The mean over the ranks' epoch means, as nnU-Net averages the student's loss.
        local = torch.tensor([np.mean([o["teacher_loss"] for o in train_outputs]), 1.0], dtype=torch.float64)
        total = sum_over_ranks(local)
        teacher_loss = float(total[0] / total[1])
        # Sum the epoch's teacher statistics over all ranks so every rank derives the same weights.
        self.performance_tracker.all_reduce()
        teacher_dice = self.performance_tracker.dice()
        self._update_weights_after_training()
        shares = self.log_distillation_epoch(  # reduces the shares over the ranks
            regions=self._region_names(), kd_ramp=self.kd_ramp if self.kd_active else 0.0,
            kd_weights=self._epoch_kd_record, teacher_loss=teacher_loss, teacher_train_wt_dice=teacher_dice.tolist(),
            next_kd_weights=self._kd_weight_record(ramp=1.0))
        self.print_to_log_file(
            "student gradient at its logits, share (mean norm): " + ", ".join(
                f"{name} {shares['share'][name]:.3f} ({shares['norm'][name]:.3g})" for name in STUDENT_TERMS))
        self.print_to_log_file(f"teacher loss {np.round(teacher_loss, 4)}, teacher train WT Dice "
                               f"{np.round(teacher_dice.numpy(), 4).tolist()}")

    def on_validation_epoch_start(self) -> None:
        super().on_validation_epoch_start()
        for t in self.teachers:
            t.eval()
        self.cdsfl.eval()

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"]
        result = super().validation_step({**batch, "data": data[:, self.student_channels]})
        # nnU-Net's own hard counts of the student, the same as hard_stats counts the teachers'.
        result["student_stats"] = np.stack([result["tp_hard"], result["fp_hard"], result["fn_hard"]]).astype(np.float64)
        data = data.to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        with self.step_autocast():
            teacher_outputs, fused, _ = self._teacher_forward(data)
        for i, out in enumerate(teacher_outputs):
            result[f"teacher{i}_stats"] = hard_stats(out[0], target[0], self.label_manager.has_regions)
        for lvl in self.cdsfl_levels:
            result[f"cdsfl{lvl}_stats"] = hard_stats(fused[lvl], target[lvl], self.label_manager.has_regions)
        return result

    def on_validation_epoch_end(self, val_outputs: List[dict]) -> None:
        super().on_validation_epoch_end(val_outputs)
        keys = [k for k in val_outputs[0] if k.endswith("_stats")]
        local = {k[:-len("_stats")]: np.sum([o[k] for o in val_outputs], 0) for k in keys}
        # One all-reduce of every source's counts, then Dice and its moving average: the same on every rank.
        epoch_dice = self.region_performance.update(local)
        self._update_weights_after_validation()
        names = {f"teacher{i}": n for i, n in enumerate(self._teacher_names())}
        summary = {names.get(k, k): rounded(v) for k, v in epoch_dice.items()}
        ema = {names.get(k, k): rounded(v) for k, v in self.region_performance.ema.items()}
        self.print_to_log_file(f"Pseudo dice of student, teachers and CDSFL per region {self._region_names()}: "
                               f"{json.dumps(summary)}; moving averages {json.dumps(ema)}")
        self.print_to_log_file(f"KD weights for the next epoch (before the ramp): "
                               f"{json.dumps(rounded(self._kd_weight_record(ramp=1.0)))}")
        self.update_distillation_epoch(val_pseudo_dice=summary, ema_val_dice=ema,
                                       next_kd_weights=self._kd_weight_record(ramp=1.0))

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict:
        return {
            **super().checkpoint_state(),  # the distillation log
            "student_modality": self.student_modality,
            "teacher_modalities": [list(m) for m in self.teacher_modalities],
            "teacher_weights": [unwrap_network(t).state_dict() for t in self.teachers],
            "cdsfl_weights": unwrap_network(self.cdsfl).state_dict(),
            "teacher_optimizer_state": self.teacher_optimizer.state_dict(),
            "performance_tracker": self.performance_tracker.state_dict(),
            "region_performance": self.region_performance.state_dict(),
            "kd_region_weights": self.kd_region_weights.clone(),
            "cdsfl_region_weights": self.cdsfl_region_weights.clone(),
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
        super().load_checkpoint_state(state)  # the distillation log (older checkpoints: "kd_history")
        missing = {"region_performance", "kd_region_weights", "cdsfl_region_weights"} - set(state)
        if missing:
            raise RuntimeError(f"checkpoint lacks {sorted(missing)}: it was written by an MTCM-KD version with the "
                               f"paper's weights only; continue it with nnUNetTrainerMTCMKD_PaperWeights")
        self.region_performance.load_state_dict(state["region_performance"])
        self.kd_region_weights = state["kd_region_weights"].double().cpu()
        self.cdsfl_region_weights = state["cdsfl_region_weights"].double().cpu()
