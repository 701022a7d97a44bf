"""MGSD: multi-granularity self distillation for segmentation from any subset of modalities.

One network over all four channels. Each iteration it sees the full input and a
masked input (one proper non-empty modality subset per sample, missing channels
zeroed after normalisation). An EMA copy of the network, fed the full input, is the
teacher. Distillation acts at three granularities:
image (outputs towards the EMA output), feature (multi-view decoder profiles of the
masked pass towards the full pass) and modality (mutual-aware attention on the
bottleneck, towards a target its heads cannot produce). docs/methods.md gives every loss term and weight.
"""
from __future__ import annotations

import os
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kd.atomic import atomic_write_json
from nnunet_kd.brats import MODALITIES
from nnunet_kd.losses.mgsd import (MultiViewConsistencyLoss, MutualAwareAttention, StyleDiscriminator,
                                   apply_modality_mask, discriminator_loss, ema_update,
                                   generator_adversarial_loss, sample_modality_masks, warmed_up_momentum)
from nnunet_kd.training.budget import apply_budget_overrides, check_budget_environment
from nnunet_kd.training.checkpoints import CheckpointSectionMixin
from nnunet_kd.training.compilation import CompiledGraphLogMixin
from nnunet_kd.training.distributed import broadcast_module, sum_over_ranks
from nnunet_kd.training.features import FeatureTap, bottleneck_channels, decoder_channels, unwrap_network
from nnunet_kd.training.gradient_shares import GradientShareMeter, allow_retained_compiled_graphs
from nnunet_kd.training.model_folder import dataset_channels
from nnunet_kd.training.optimisation import backward_and_step
from nnunet_kd.training.precision import CPUAutocastMixin


class nnUNetTrainerModalityDropout(CompiledGraphLogMixin, CPUAutocastMixin, nnUNetTrainer):
    """Baseline for MGSD: the same full + randomly masked passes, supervised loss only.

    It shares MGSD's masking and data path, so comparing the two isolates the distillation terms.
    """

    #: Modalities the masks draw from, found in dataset.json by name.
    mask_modalities: Tuple[str, ...] = MODALITIES

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        check_budget_environment()  # before nnU-Net creates the fold folder and its log
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_budget_overrides(self)
        self.modality_channels = dataset_channels(self.__class__.__name__, dataset_json, [self.mask_modalities])[0]

    def _two_pass_inputs(self, data: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Random per-sample availability masks (B, M) and the full + masked batch stacked to (2B, C, *s)."""
        modality_mask = sample_modality_masks(data.shape[0], len(self.modality_channels), device=data.device)
        masked = apply_modality_mask(data, modality_mask, self.modality_channels)
        return modality_mask, torch.cat([data, masked], 0)

    def _split(self, outputs: List[torch.Tensor]) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """Split stacked deep-supervision outputs (2B, ...) into the full and the masked pass."""
        halves = [o.chunk(2, 0) for o in outputs]
        return [h[0] for h in halves], [h[1] for h in halves]

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        self.optimizer.zero_grad(set_to_none=True)
        _, stacked = self._two_pass_inputs(data)
        with self.step_autocast():
            full_out, masked_out = self._split(self.network(stacked))
            loss = self.loss(full_out, target) + self.loss(masked_out, target)
        backward_and_step(loss, [self.optimizer], [self.network], self.grad_scaler)
        return {"loss": loss.detach().cpu().numpy()}


class nnUNetTrainerMGSD(CheckpointSectionMixin, nnUNetTrainerModalityDropout):
    """Multi-granularity self distillation (image, feature and modality level) with an EMA teacher."""

    #: EMA teacher: ema = m_s * ema + (1 - m_s) * network after every optimiser step, with the mean-teacher
    #: warm-up m_s = min(ema_momentum, 1 - 1 / (s + 1)) at update s (0-based; kept in the checkpoint).
    ema_momentum: float = 0.99
    #: Loss weights. The reference uses 10 (image), 150 (modality) and 50 (feature) beside a supervised
    #: term that sums one soft-Dice loss per region (WT, TC, ET). nnU-Net's Dice term averages over the
    #: regions, so its supervised loss is a third of the reference's for the same segmentation quality;
    #: dividing the reference weights by 3 keeps the reference's ratio of distillation to supervision.
    image_kd_weight: float = 10.0 / 3
    modality_kd_weight: float = 150.0 / 3
    feature_kd_weight: float = 50.0 / 3
    #: Deep-supervision levels whose decoder features enter the multi-view loss (0 = full resolution).
    #: Plans with fewer levels use the ones they have.
    feature_kd_levels: Tuple[int, ...] = (0, 1, 2)
    #: Multi-view head: width of the projection of the axis profiles, and the weight of the normalised
    #: profile against the raw one (docs/methods.md, "feature level").
    multiview_projection_dim: int = 64
    multiview_gamma: float = 0.7
    #: Mutual-aware attention head (modality level): token width, heads, tokens per axis.
    attention_embed_dim: int = 64
    attention_heads: int = 4
    attention_token_grid: int = 4
    #: Modality-level term: weight of the tokens of present and of missing modalities.
    present_weight: float = 0.6
    missing_weight: float = 0.4
    #: Teacher of the modality-level term (MutualAwareAttention's ``target``): "fixed" (a frozen copy of the
    #: initial first-stage heads, i.e. EMA heads at momentum 1, on the EMA network's full-input bottleneck,
    #: under stop-gradient), "ema" (heads following the online ones), "full_pass" (the project's earlier form)
    #: or "symmetric" (the reference's). Only "fixed" keeps the heads alone from driving it to ~0
    #: (tests/losses/test_modality_collapse.py).
    modality_kd_target: str = "fixed"
    checkpoint_section = "mgsd_state"
    #: The attention and projection heads train with AdamW (transformer practice), with nnU-Net's poly decay.
    aux_learning_rate: float = 3e-4
    #: Loss terms the network learns from, as named in the training log and distillation_log.json.
    loss_term_names: Tuple[str, ...] = ("supervised", "image", "feature", "modality")
    #: Gradient shares are measured on the first step of each epoch and every this many steps after it: each
    #: measurement costs one extra backward pass through the network per loss term.
    gradient_share_interval: int = 10
    #: Where the shares are measured: "parameters" (the whole gradient each term gives the network's weights)
    #: or "bottleneck" (the encoder's last stage output of both passes; skips bypass it).
    gradient_share_at: str = "parameters"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if self.gradient_share_at not in ("parameters", "bottleneck"):
            raise ValueError(f"{self.__class__.__name__}.gradient_share_at must be 'parameters' or 'bottleneck', "
                             f"got {self.gradient_share_at!r}")
        self.ema_network = None
        self.ema_step = 0
        self.multiview = self.mutual_attention = None
        self.aux_optimizer = self.aux_lr_scheduler = None
        self.tap = None
        self._term_sums: Dict[str, torch.Tensor] = {}  # this epoch's sum of each loss term, on the device
        self.gradient_meter = GradientShareMeter(self.loss_term_names)
        self._epoch_step = 0
        self.distillation_log: List[dict] = []

    def initialize(self):
        if not self.enable_deep_supervision:
            raise RuntimeError(f"{self.__class__.__name__} needs deep supervision outputs")
        super().initialize()
        unet = unwrap_network(self.network)
        num_levels = len(unet.decoder.stages)
        self.feature_kd_levels = tuple(lvl for lvl in self.feature_kd_levels if lvl < num_levels)
        self.ema_network = self._build_ema_network()
        # nnU-Net compiled self.network if _do_i_compile(); Dynamo traces the tap's hooks, which must exist
        # before the first forward pass. The EMA network runs as encoder + decoder (_ema_forward), so those two
        # compile, in place (same state_dict keys).
        self.tap = FeatureTap(unet, self.feature_kd_levels, bottleneck=True)
        if self._do_i_compile():
            allow_retained_compiled_graphs()  # the gradient shares take a second backward
            self.ema_network.encoder.compile()
            self.ema_network.decoder.compile()
        conv_dim = 3 if unet.encoder.conv_op is nn.Conv3d else 2
        self.multiview = MultiViewConsistencyLoss([decoder_channels(unet, lvl) for lvl in self.feature_kd_levels],
                                                  self.multiview_projection_dim, self.multiview_gamma).to(self.device)
        self.mutual_attention = MutualAwareAttention(
            bottleneck_channels(unet), len(self.modality_channels), self.attention_embed_dim, self.attention_heads,
            self.attention_token_grid, conv_dim, self.present_weight, self.missing_weight,
            self.modality_kd_target).to(self.device)
        self.aux_modules = nn.ModuleDict({"multiview": self.multiview, "mutual_attention": self.mutual_attention,
                                          **self._extra_aux_modules(unet)})
        self.aux_optimizer = torch.optim.AdamW([p for p in self.aux_modules.parameters() if p.requires_grad],
                                               self.aux_learning_rate, weight_decay=self.weight_decay)
        self.aux_lr_scheduler = PolyLRScheduler(self.aux_optimizer, self.aux_learning_rate, self.num_epochs)
        # The auxiliary heads are called piecewise, not through one forward, so DDP would not sync them:
        # their weights start equal (broadcast) and their gradients are averaged in every step.
        broadcast_module(self.aux_modules)

    def _build_ema_network(self) -> nn.Module:
        """The teacher: a network built afresh from the plans, so it carries no hooks of the student's
        FeatureTap (a deepcopy would, and its forwards would then overwrite the student's features), holding
        the student's current weights (after DDP wrapping these are rank 0's on every rank). Frozen, eval mode."""
        ema = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                              self.num_input_channels, self.label_manager.num_segmentation_heads,
                                              self.enable_deep_supervision).to(self.device)
        ema.load_state_dict(unwrap_network(self.network).state_dict())
        return ema.eval().requires_grad_(False)

    @torch.no_grad()
    def _ema_forward(self, data: torch.Tensor) -> Tuple[List[torch.Tensor], torch.Tensor]:
        """EMA outputs (deep-supervision list) and EMA bottleneck (B, C_b, *s) for the full input, read from
        the U-Net's encoder skips instead of hooks."""
        skips = self.ema_network.encoder(data)
        return [o.float() for o in self.ema_network.decoder(skips)], skips[-1]  # float32 logits for the image KD

    def _extra_aux_modules(self, unet: nn.Module) -> Dict[str, nn.Module]:
        """Further auxiliary modules by name (trained with the heads' optimiser, saved with them)."""
        return {}

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        self.aux_modules.train()
        self.aux_lr_scheduler.step(self.current_epoch)
        self._term_sums = {}
        self.gradient_meter.reset()
        self._epoch_step = 0

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return torch.sigmoid(logits) if self.label_manager.has_regions else torch.softmax(logits, 1)

    def _image_kd(self, outputs: List[torch.Tensor], ema_outputs: List[torch.Tensor]) -> torch.Tensor:
        """MSE between output and EMA probabilities, weighted over levels like nnU-Net's deep supervision."""
        weights = self.loss.weight_factors
        return sum(w * F.mse_loss(self._probabilities(o), self._probabilities(e))
                   for w, o, e in zip(weights, outputs, ema_outputs) if w != 0)

    def _distillation_terms(self, data, stacked, modality_mask, full_out, masked_out,
                            features: Dict[str, object]) -> Dict[str, torch.Tensor]:
        """Unweighted image-, feature- and modality-level terms; ``features`` is the tap's take() of the
        stacked forward."""
        ema_out, ema_bottleneck = self._ema_forward(data)
        image = self._image_kd(full_out, ema_out) + self._image_kd(masked_out, ema_out)
        decoder = [features["decoder"][lvl].chunk(2, 0) for lvl in self.feature_kd_levels]
        bottleneck_full, bottleneck_masked = features["bottleneck"].chunk(2, 0)
        feature = self.multiview([d[0] for d in decoder], [d[1] for d in decoder])
        teacher_bottleneck = ema_bottleneck if self.mutual_attention.uses_ema_network else bottleneck_full
        masked_data = stacked[data.shape[0]:]
        modality = self.mutual_attention(teacher_bottleneck, bottleneck_masked, data[:, self.modality_channels],
                                         masked_data[:, self.modality_channels], modality_mask)
        return {"image": image, "feature": feature, "modality": modality}

    def _weighted_terms(self, terms: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The weighted terms the network learns from (keys: loss_term_names); the loss is their sum."""
        return {"supervised": terms["supervised"], "image": self.image_kd_weight * terms["image"],
                "feature": self.feature_kd_weight * terms["feature"],
                "modality": self.modality_kd_weight * terms["modality"]}

    def _heads_only_loss(self, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss of auxiliary heads that does not reach the network (added to the total, not measured)."""
        return torch.zeros((), device=self.device)

    def _measures_gradient_shares_now(self) -> bool:
        return self._epoch_step % self.gradient_share_interval == 0

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = [t.to(self.device, non_blocking=True) for t in batch["target"]]
        self.optimizer.zero_grad(set_to_none=True)
        self.aux_optimizer.zero_grad(set_to_none=True)
        modality_mask, stacked = self._two_pass_inputs(data)
        with self.step_autocast():
            # One forward over full and masked samples: InstanceNorm is per sample, so this equals two passes.
            full_out, masked_out = self._split(self.network(stacked))
            features = self.tap.take()
            terms = {"supervised": self.loss(full_out, target) + self.loss(masked_out, target)}
            terms.update(self._distillation_terms(data, stacked, modality_mask, full_out, masked_out, features))
            weighted = self._weighted_terms(terms)
            loss = sum(weighted.values()) + self._heads_only_loss(terms)
        if self._measures_gradient_shares_now():
            points = [p for p in self.network.parameters() if p.requires_grad] \
                if self.gradient_share_at == "parameters" else [features["bottleneck"]]
            scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
            self.gradient_meter.update(weighted, points, scale)
        backward_and_step(loss, [self.optimizer, self.aux_optimizer], [self.network, self.aux_modules],
                          self.grad_scaler, unsynced=[self.aux_modules])
        momentum = warmed_up_momentum(self.ema_step, self.ema_momentum)
        ema_update(self.ema_network, self.network, momentum)
        self.mutual_attention.update_target(momentum)
        self.ema_step += 1
        self._epoch_step += 1
        for k, v in terms.items():  # summed on the device: read once per epoch, not once per step
            self._term_sums[k] = self._term_sums.get(k, 0.) + v.detach().float()
        return {"loss": loss.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: List[dict]):
        super().on_train_epoch_end(train_outputs)
        names = sorted(self._term_sums)
        steps = torch.tensor(float(self._epoch_step), dtype=torch.float64)
        sums = sum_over_ranks(torch.stack([self._term_sums[k].cpu().double() for k in names] + [steps]))  # all ranks
        means = {k: float(v) for k, v in zip(names, (sums[:-1] / sums[-1].clamp_min(1)).tolist())}
        gradients = self.gradient_meter.summary()  # reduced over ranks: every rank takes part
        self.print_to_log_file("MGSD loss terms (unweighted means): " +
                               ", ".join(f"{k} {np.round(v, 5)}" for k, v in means.items()))
        self.print_to_log_file(f"MGSD gradient shares at the network's {self.gradient_share_at}: " + ", ".join(
            f"{k} {gradients['share'][k]:.3f} (norm {gradients['norm'][k]:.3g})" for k in self.loss_term_names))
        self.distillation_log.append({
            "epoch": self.current_epoch, "gradient_share": gradients["share"], "gradient_norm": gradients["norm"],
            "gradient_measured_at": self.gradient_share_at, "loss_terms": means,
            "loss_weights": self._loss_weights(), "ema_updates": self.ema_step,
            "ema_momentum": warmed_up_momentum(max(self.ema_step - 1, 0), self.ema_momentum)})  # the last update's
        if self.local_rank == 0:
            atomic_write_json(self.distillation_log, os.path.join(self.output_folder, "distillation_log.json"))

    def _loss_weights(self) -> Dict[str, float]:
        return {"supervised": 1.0, "image": self.image_kd_weight, "feature": self.feature_kd_weight,
                "modality": self.modality_kd_weight}

    def checkpoint_state(self) -> dict:
        return {"ema_weights": self.ema_network.state_dict(), "aux_weights": self.aux_modules.state_dict(),
                "aux_optimizer_state": self.aux_optimizer.state_dict(), "ema_step": self.ema_step,
                "distillation_log": self.distillation_log}

    def load_checkpoint_state(self, state: dict) -> None:
        missing = {"ema_step", "distillation_log"} - set(state)
        if missing:
            raise RuntimeError(f"this checkpoint was written by an older {self.__class__.__name__} (its MGSD "
                               f"section lacks {sorted(missing)}); start a new training instead of --c")
        self.ema_network.load_state_dict(state["ema_weights"])
        self.aux_modules.load_state_dict(state["aux_weights"])
        self.aux_optimizer.load_state_dict(state["aux_optimizer_state"])
        self.ema_step = int(state["ema_step"])
        self.distillation_log = list(state["distillation_log"])


class nnUNetTrainerMGSD_LightModalityKD(nnUNetTrainerMGSD):
    """MGSD with the modality-level (mutual attention) term weighted 5 instead of 50.

    At the reference weight that term is several times the supervised loss in the first
    epoch; at 5 it starts at about the supervised loss's size.
    """

    modality_kd_weight = 5.0


class nnUNetTrainerMGSD_SymmetricModalityKD(nnUNetTrainerMGSD):
    """MGSD with the reference's symmetric modality-level term (both passes with gradient, online heads).

    Its heads alone can drive the term towards 0 (tests/losses/test_modality_collapse.py); kept to compare.
    """

    modality_kd_target = "symmetric"


class nnUNetTrainerMGSD_adv(nnUNetTrainerMGSD):
    """MGSD plus the reference script's style discriminator between full and masked outputs."""

    adversarial_weight: float = 0.01
    loss_term_names = nnUNetTrainerMGSD.loss_term_names + ("adversarial",)

    def _extra_aux_modules(self, unet: nn.Module) -> Dict[str, nn.Module]:
        conv_dim = 3 if unet.encoder.conv_op is nn.Conv3d else 2
        self.discriminator = StyleDiscriminator(self.label_manager.num_segmentation_heads,
                                                conv_dim=conv_dim).to(self.device)
        return {"discriminator": self.discriminator}

    def _distillation_terms(self, data, stacked, modality_mask, full_out, masked_out, features):
        terms = super()._distillation_terms(data, stacked, modality_mask, full_out, masked_out, features)
        full_prob, masked_prob = self._probabilities(full_out[0]), self._probabilities(masked_out[0])
        # The discriminator learns on detached outputs; the network learns to make masked outputs look full.
        terms["discriminator"] = discriminator_loss(self.discriminator(full_prob.detach()),
                                                    self.discriminator(masked_prob.detach()))
        self.discriminator.requires_grad_(False)
        terms["adversarial"] = generator_adversarial_loss(self.discriminator(masked_prob))
        self.discriminator.requires_grad_(True)
        return terms

    def _weighted_terms(self, terms):
        return dict(super()._weighted_terms(terms), adversarial=self.adversarial_weight * terms["adversarial"])

    def _heads_only_loss(self, terms):
        return terms["discriminator"]

    def _loss_weights(self):
        return dict(super()._loss_weights(), adversarial=self.adversarial_weight)
