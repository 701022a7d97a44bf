"""MTCM-KD: multi-teacher cross-modal distillation into a single-modality student.

The student (``self.network``) is nnU-Net's planned network on one channel (T1ce by
default). Teachers use the same planned architecture on other channels and train
online, with their own optimiser, together with the CDSFL fusion module. The student
learns from the ground truth, from the teachers' outputs (performance-aware response
KD) and from the fused CDSFL output at the CDSFL deep-supervision levels.
docs/methods.md gives every loss term and weight.
"""
from __future__ import annotations

import contextlib
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
from nnunet_kd.losses.cdsfl import CDSFL
from nnunet_kd.losses.mtcmkd_student import STUDENT_TERMS, ResponseKD, student_loss_terms
from nnunet_kd.losses.performance import PerformanceTracker, whole_tumour_channel, whole_tumour_stats
from nnunet_kd.training.budget import apply_budget_overrides, check_budget_environment
from nnunet_kd.training.checkpoints import CheckpointSectionMixin
from nnunet_kd.training.compilation import CompiledGraphLogMixin
from nnunet_kd.training.gradient_shares import GradientShareMeter, allow_retained_compiled_graphs
from nnunet_kd.training.features import FeatureTap, InputChannelSelector, decoder_channels, unwrap_network
from nnunet_kd.training.model_folder import dataset_channels, subset_dataset_json, subset_plans
from nnunet_kd.training.optimisation import backward_and_step, sgd_with_poly_lr
from nnunet_kd.training.precision import CPUAutocastMixin
from nnunet_kd.training.teachers import load_frozen_teacher, resolve_teacher_checkpoint


#: Per-epoch distillation record (gradient shares, KD weights, teacher Dice) in the fold's output folder.
DISTILLATION_LOG = "distillation_log.json"


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
    #: nnU-Net's Dice + CE; "batchmean": the reference's sum over the patch), the teachers' weights summing to
    #: ``kd_total_weight``. The default gives response KD about a third of the student's gradient at its
    #: logits; the reference's settings are the _Reference and _VoxelMeanT1 variants.
    kd_temperature: float = 2.0
    kd_temperature_power: int = 2
    kd_reduction: str = "mean"
    kd_total_weight: float = 0.5
    #: Per-teacher KD weight before the first performance measurement; None: kd_total_weight / teachers.
    initial_kd_weight: Optional[float] = None
    #: KD starts in this epoch ("after the first epoch" in the paper). Before it the student loss is
    #: nnU-Net's deep-supervised segmentation loss alone, as in the reference.
    kd_start_epoch: int = 1
    #: Student loss once KD is on (docs/methods.md): 0.75 seg + sum_i w_i KD_i + 0.10 (0.7 DS seg + 0.3 DS KD).
    student_seg_weight: float = 0.75
    student_ds_weight: float = 0.10
    student_ds_seg_fraction: float = 0.7
    student_ds_kd_fraction: float = 0.3
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
        self.performance_tracker = PerformanceTracker(len(self.teacher_channels))
        initial = self.initial_kd_weight if self.initial_kd_weight is not None else \
            self.kd_total_weight / len(self.teacher_channels)
        self.performance_weights = torch.full((len(self.teacher_channels),), float(initial), dtype=torch.float64)
        #: Student loss terms whose gradient at the student's logits is measured every step.
        self.gradient_shares = GradientShareMeter(STUDENT_TERMS)
        self._epoch_kd_weights: Optional[List[float]] = None
        self.kd_history: List[dict] = []
        self._val_aux: Dict[str, np.ndarray] = {}

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
        self._epoch_kd_weights = self.performance_weights.tolist() if self.kd_active else None
        self.print_to_log_file(f"KD weights this epoch: {np.round(self.performance_weights.numpy(), 4).tolist()}"
                               f"{'' if self.kd_active else ' (KD not started yet)'}")

    @property
    def kd_active(self) -> bool:
        return self.current_epoch >= self.kd_start_epoch

    # ------------------------------------------------------------------ forward passes
    def _teacher_forward(self, data: torch.Tensor) -> Tuple[List[List[torch.Tensor]], Dict[int, torch.Tensor]]:
        """Teacher outputs (one deep-supervision list each) and the fused CDSFL logits per level."""
        outputs, features = [], {lvl: [] for lvl in self.cdsfl_levels}
        with torch.no_grad() if self.freeze_teachers else contextlib.nullcontext():
            for teacher, tap, channels in zip(self.teachers, self.teacher_taps, self.teacher_channels):
                out = teacher(data[:, channels])
                # Pretrained teachers run without deep supervision: only their full-resolution output exists.
                # float32 for the losses that read them (seg loss, KL), as the student's.
                outputs.append([o.float() for o in out] if isinstance(out, (list, tuple)) else [out.float()])
                for lvl, feat in tap.take()["decoder"].items():
                    features[lvl].append(feat)
        return outputs, {lvl: fused.float() for lvl, fused in self.cdsfl(features).items()}

    def _teacher_loss(self, outputs, fused, target) -> torch.Tensor:
        cdsfl_loss = sum(self.loss.loss(fused[lvl], target[lvl]) for lvl in self.cdsfl_levels)
        if self.freeze_teachers:
            return self.cdsfl_loss_weight * cdsfl_loss
        return sum(self.loss(o, target) for o in outputs) + self.cdsfl_loss_weight * cdsfl_loss

    def _kd(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return ResponseKD(self.kd_temperature, self.kd_temperature_power, self.kd_reduction,
                          self.label_manager.has_regions)(student_logits, teacher_logits)

    def _student_terms(self, student_out, teacher_outputs, fused, target) -> Dict[str, torch.Tensor]:
        """The student loss as weighted terms (their sum is the loss), keyed by STUDENT_TERMS names."""
        return student_loss_terms(
            student_out, teacher_outputs, fused, target, seg_loss=self.loss, kd=self._kd,
            kd_weights=self.performance_weights.tolist(), levels=self.cdsfl_levels, kd_active=self.kd_active,
            seg_weight=self.student_seg_weight, ds_weight=self.student_ds_weight,
            ds_seg_fraction=self.student_ds_seg_fraction, ds_kd_fraction=self.student_ds_kd_fraction)

    def _student_loss(self, student_out, teacher_outputs, fused, target) -> torch.Tensor:
        return sum(self._student_terms(student_out, teacher_outputs, fused, target).values())

    # ------------------------------------------------------------------ steps
    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        self.optimizer.zero_grad(set_to_none=True)
        self.teacher_optimizer.zero_grad(set_to_none=True)
        with self.step_autocast():
            teacher_outputs, fused = self._teacher_forward(data)
            teacher_loss = self._teacher_loss(teacher_outputs, fused, target)
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
        self.performance_weights = self.performance_tracker.compute_weights(self.kd_total_weight).double().cpu()
        shares = self.gradient_shares.summary()  # reduced over the ranks
        self.kd_history.append({"epoch": self.current_epoch, "gradient_share": shares["share"],
                                "gradient_norm": shares["norm"], "kd_weights": self._epoch_kd_weights,
                                "teacher_loss": float(teacher_loss), "teacher_train_wt_dice": teacher_dice.tolist(),
                                "next_kd_weights": self.performance_weights.tolist()})
        self.print_to_log_file(
            "student gradient at its logits, share (mean norm): " + ", ".join(
                f"{name} {shares['share'][name]:.3f} ({shares['norm'][name]:.3g})" for name in STUDENT_TERMS))
        self.print_to_log_file(f"teacher loss {np.round(teacher_loss, 4)}, teacher train WT Dice "
                               f"{np.round(teacher_dice.numpy(), 4).tolist()}, KD weights for next epoch "
                               f"{np.round(self.performance_weights.numpy(), 4).tolist()}")

    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        for t in self.teachers:
            t.eval()
        self.cdsfl.eval()

    def validation_step(self, batch: dict) -> dict:
        data = batch["data"]
        result = super().validation_step({**batch, "data": data[:, self.student_channels]})
        data = data.to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        with self.step_autocast():
            teacher_outputs, fused = self._teacher_forward(data)
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
        summary = {}
        for k in keys:
            stats = torch.as_tensor(np.sum([o[k] for o in val_outputs], 0), dtype=torch.float64, device=self.device)
            if self.is_ddp:
                dist.all_reduce(stats)
            tp, fp, fn = stats.cpu().numpy()
            dice = 2 * tp / np.clip(2 * tp + fp + fn, 1e-8, None)
            summary[k[:-6]] = dice.tolist()
        names = {f"teacher{i}": "+".join(m) for i, m in enumerate(self.teacher_modalities)}
        self.print_to_log_file("Pseudo dice of teachers and CDSFL: " + ", ".join(
            f"{names.get(k, k)} {np.round(v, 4).tolist()}" for k, v in summary.items()))
        if self.kd_history and self.kd_history[-1]["epoch"] == self.current_epoch:
            self.kd_history[-1]["val_pseudo_dice"] = summary

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
            "performance_weights": self.performance_weights.clone(),
            "performance_tracker": self.performance_tracker.state_dict(),
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
        self.performance_weights = state["performance_weights"].double().cpu()
        self.performance_tracker.load_state_dict(state["performance_tracker"])
        self.kd_history = list(state["kd_history"])


class nnUNetTrainerMTCMKD_T1(nnUNetTrainerMTCMKD):
    """MTCM-KD with a T1 student (the paper's second setting); teachers on T1ce, T2 and FLAIR."""

    student_modality = "T1"
    teacher_modalities = (("T1ce",), ("T2",), ("FLAIR",))


class nnUNetTrainerMTCMKD_MultimodalTeacher(nnUNetTrainerMTCMKD):
    """One teacher that sees all four modalities, distilled into the T1ce student."""

    teacher_modalities = (("T1", "T1ce", "T2", "FLAIR"),)


class nnUNetTrainerMTCMKD_Reference(nnUNetTrainerMTCMKD):
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


class nnUNetTrainerMTCMKD_KDFromStart(nnUNetTrainerMTCMKD):
    """Response KD from the first epoch on (the reference starts it after the first epoch).

    Before the first performance measurement the teachers share ``kd_total_weight`` equally.
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

    The fast path for users who already have nnU-Net models. Name one model per teacher in
    ``nnUNet_kd_teachers`` (separated by ``os.pathsep``): a checkpoint file, a ``fold_X`` folder or a
    model folder holding plans.json, dataset.json and fold folders. Each teacher sees the channels its
    own dataset.json names (matched by modality name), so unimodal and multimodal models both work.
    The teacher models must share this plan's spacing and pooling (the same preprocessing and levels).
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
        self.teacher_sources = [resolve_teacher_checkpoint(p, fold) for p in paths]
        self.teacher_modalities = tuple(tuple(dataset_modalities(load_json(os.path.join(model_dir, "dataset.json"))
                                                                 ["channel_names"]))
                                        for model_dir, _, _ in self.teacher_sources)
        super().__init__(plans, configuration, fold, dataset_json, device)

    def _build_teachers(self) -> List[nn.Module]:
        return [load_frozen_teacher(model_dir, fold_name, checkpoint_name, self.device, self.configuration_manager,
                                    self.label_manager)
                for model_dir, fold_name, checkpoint_name in self.teacher_sources]
