"""MGSD: multi-granularity self distillation for segmentation from any subset of modalities (reference code:
github.com/henryccl/MMBTS, MMBTS/train_MGOD.py and MMBTS/models/MGOD/; a partial release, so the losses
are rebuilt on nnU-Net's network and loss, docs/methods.md).

One network over all four channels. Each iteration it sees the full input and a
masked input (one proper non-empty modality subset per sample, missing channels
zeroed after normalisation). An EMA copy of the network, fed the full input, is the
teacher. Distillation acts at three granularities:
image (masked-pass outputs towards the EMA output: the main signal), feature (normalised multi-view
decoder profiles of the masked pass towards the full pass, no learnable head) and modality (mutual-aware
attention on the bottleneck; off by default, a probe only, see nnUNetTrainerMGSD_ModalityKD).
The distillation weights ramp up from zero, and their gradient is capped to a share of the supervised one,
so that they never shrink the supervised update through nnU-Net's gradient clipping. The baseline
nnUNetTrainerModalityDropout is here (MGSD builds on it); the variants are in nnUNetTrainerMGSD_variants.py.
docs/methods.md gives every loss term and weight.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import nn

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kd.brats import MODALITIES
from nnunet_kd.losses import MultiViewConsistencyLoss, MutualAwareAttention, image_kd_loss, output_probabilities
from nnunet_kd.training.budget import apply_budget_overrides, check_budget_environment
from nnunet_kd.training.channel_subset import dataset_channels
from nnunet_kd.training.compilation import CompiledGraphLogMixin
from nnunet_kd.training.distillation_log import DistillationLogMixin
from nnunet_kd.training.distributed import broadcast_module, sum_over_ranks
from nnunet_kd.training.ema import ema_update, warmed_up_momentum
from nnunet_kd.training.features import FeatureTap, bottleneck_channels, decoder_channels, unwrap_network
from nnunet_kd.training.gradient_shares import (ClipStatistics, allow_retained_compiled_graphs, auxiliary_scale,
                                                clip_threshold, gradient_norms)
from nnunet_kd.training.modality_mask import apply_modality_mask, sample_modality_masks
from nnunet_kd.training.optimisation import backward_and_step
from nnunet_kd.training.precision import CPUAutocastMixin
from nnunet_kd.training.schedules import linear_rampup


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


class nnUNetTrainerMGSD(DistillationLogMixin, nnUNetTrainerModalityDropout):
    """Multi-granularity self distillation (image, feature and modality level) with an EMA teacher."""

    #: EMA teacher: ema = m_s * ema + (1 - m_s) * network after every optimiser step, with the mean-teacher
    #: warm-up m_s = min(ema_momentum, 1 - 1 / (s + 1)) at update s (0-based; kept in the checkpoint).
    ema_momentum: float = 0.99
    #: Loss weights. The reference uses 10 (image), 150 (modality) and 50 (feature) beside a supervised
    #: term that sums one soft-Dice loss per region (WT, TC, ET). nnU-Net's Dice term averages over the
    #: regions, so its supervised loss is a third of the reference's for the same segmentation quality;
    #: dividing the reference weights by 3 keeps the reference's ratio of distillation to supervision.
    #: The modality-level term is off (weight 0): its only target that the heads cannot match alone is a
    #: frozen copy of random heads, which carries no meaning (docs/methods.md). At weight 0 it is still
    #: computed on the detached masked bottleneck and its heads train on it, as a probe that is logged.
    image_kd_weight: float = 10.0 / 3
    modality_kd_weight: float = 0.0
    feature_kd_weight: float = 50.0 / 3
    #: Teacher of the modality-level term (MutualAwareAttention's ``target``): "fixed" (a frozen copy of the
    #: initial first-stage heads, i.e. EMA heads at momentum 1, on the EMA network's full-input bottleneck,
    #: under stop-gradient), "ema" (heads following the online ones), "full_pass" (the project's earlier form)
    #: or "symmetric" (the reference's). Only "fixed" keeps the heads alone from driving it to ~0
    #: (tests/losses/test_modality_collapse.py); the others stay selectable to compare.
    modality_kd_target: str = "fixed"
    #: Passes whose outputs the image-level term pulls towards the EMA output: the reference uses both; the
    #: full pass against the EMA of the same input only drags it towards older weights, so only the masked
    #: pass by default (nnUNetTrainerMGSD_ImageKDBothPasses measures both).
    image_kd_passes: Tuple[str, ...] = ("masked",)
    #: Distillation weights are multiplied by linear_rampup(epoch, this): 0 in epoch 0, 1 from epoch 10 on.
    distillation_rampup_epochs: int = 10
    #: Cap on the distillation terms' gradient: all of them together are scaled by one factor (<= 1, updated
    #: whenever the gradient shares are measured) so that their gradient norms make at most this share of the
    #: gradient norms (supervised + distillation), and the network's gradient is clipped at
    #: 12 / (1 - share) instead of nnU-Net's 12, so the clipping never scales the supervised part down more
    #: than nnU-Net's would scale the supervised gradient alone.
    max_distillation_share: float = 0.3
    #: Multi-view normalisation: weight of the normalised profile against the raw one (docs/methods.md,
    #: "feature level"). The profiles are compared directly, without a learnable projection.
    multiview_gamma: float = 0.7
    #: Deep-supervision levels whose decoder features enter the multi-view loss (0 = full resolution).
    #: Plans with fewer levels use the ones they have.
    feature_kd_levels: Tuple[int, ...] = (0, 1, 2)
    #: Mutual-aware attention head (modality level): token width, heads, tokens per axis.
    attention_embed_dim: int = 64
    attention_heads: int = 4
    attention_token_grid: int = 4
    #: Modality-level term: weight of the tokens of present and of missing modalities.
    present_weight: float = 0.6
    missing_weight: float = 0.4
    checkpoint_section = "mgsd_state"
    #: The attention heads train with AdamW (transformer practice), with nnU-Net's poly decay.
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
        if not self.image_kd_passes or not set(self.image_kd_passes) <= {"full", "masked"}:
            raise ValueError(f"{self.__class__.__name__}.image_kd_passes must be a non-empty subset of "
                             f"('full', 'masked'), got {self.image_kd_passes!r}")
        self.ema_network = None
        self.ema_step = 0
        self.multiview = self.mutual_attention = None
        self.aux_optimizer = self.aux_lr_scheduler = None
        self.tap = None
        self._term_sums: Dict[str, torch.Tensor] = {}  # this epoch's sum of each loss term, on the device
        self._epoch_step = 0
        self.distillation_ramp = 0.0  # linear_rampup of the current epoch
        self.distillation_scale = 1.0  # the cap's factor on the distillation terms, set by each measurement
        self.clip_stats = ClipStatistics()  # this epoch's clip ratios and cap factors

    def initialize(self) -> None:
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
                                                  self.multiview_gamma).to(self.device)
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

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.aux_modules.train()
        self.aux_lr_scheduler.step(self.current_epoch)
        self._term_sums = {}
        self._epoch_step = 0
        self.distillation_ramp = linear_rampup(self.current_epoch, self.distillation_rampup_epochs)
        self.clip_stats.reset()

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return output_probabilities(logits, self.label_manager.has_regions)

    def _image_kd(self, outputs: List[torch.Tensor], ema_outputs: List[torch.Tensor]) -> torch.Tensor:
        """Image-level term of one pass, weighted over levels like nnU-Net's deep supervision."""
        return image_kd_loss(outputs, ema_outputs, self.loss.weight_factors, self.label_manager.has_regions)

    def _distillation_terms(self, data, stacked, modality_mask, full_out, masked_out,
                            features: Dict[str, object]) -> Dict[str, torch.Tensor]:
        """Unweighted image-, feature- and modality-level terms; ``features`` is the tap's take() of the
        stacked forward."""
        ema_out, ema_bottleneck = self._ema_forward(data)
        outputs = {"full": full_out, "masked": masked_out}
        image = sum(self._image_kd(outputs[p], ema_out) for p in self.image_kd_passes)
        decoder = [features["decoder"][lvl].chunk(2, 0) for lvl in self.feature_kd_levels]
        bottleneck_full, bottleneck_masked = features["bottleneck"].chunk(2, 0)
        feature = self.multiview([d[0] for d in decoder], [d[1] for d in decoder])
        teacher_bottleneck = ema_bottleneck if self.mutual_attention.uses_ema_network else bottleneck_full
        masked_data = stacked[data.shape[0]:]
        if not self.modality_kd_weight:  # a probe: its heads learn from it, the network does not
            bottleneck_masked = bottleneck_masked.detach()
        modality = self.mutual_attention(teacher_bottleneck, bottleneck_masked, data[:, self.modality_channels],
                                         masked_data[:, self.modality_channels], modality_mask)
        return {"image": image, "feature": feature, "modality": modality}

    def _weighted_terms(self, terms: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The terms with their weights and this epoch's ramp (keys: loss_term_names), before the cap."""
        weights = self._loss_weights()
        return {k: terms[k] if k == "supervised" else (self.distillation_ramp * weights[k]) * terms[k]
                for k in self.loss_term_names}

    def _distillation_active(self) -> bool:
        return self.distillation_ramp > 0 and any(w for k, w in self._loss_weights().items() if k != "supervised")

    def _network_max_norm(self) -> float:
        """The network's clipping norm: nnU-Net's 12 while no distillation term acts, else 12 / (1 - share)."""
        return clip_threshold(12.0, self.max_distillation_share) if self._distillation_active() else 12.0

    def _update_distillation_scale(self, norms: Dict[str, float]) -> None:
        """Set the cap's factor from one measurement of the uncapped weighted terms' gradient norms (averaged
        over DDP ranks, so every rank applies the same factor)."""
        distillation = sum(v for k, v in norms.items() if k != "supervised")
        both = sum_over_ranks(torch.tensor([norms["supervised"], distillation], dtype=torch.float64))
        if torch.isfinite(both).all():  # an overflowing half-precision measurement keeps the last factor
            self.distillation_scale = auxiliary_scale(float(both[0]), float(both[1]), self.max_distillation_share)

    def _heads_only_loss(self, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss of auxiliary heads that does not reach the network (added to the total, not measured): the
        modality-level probe when that term's weight is 0."""
        return torch.zeros((), device=self.device) if self.modality_kd_weight else terms["modality"]

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
        if self._measures_gradient_shares_now():
            points = [p for p in self.network.parameters() if p.requires_grad] \
                if self.gradient_share_at == "parameters" else [features["bottleneck"]]
            scale = float(self.grad_scaler.get_scale()) if self.grad_scaler is not None else 1.0
            norms = gradient_norms(weighted, points, scale)  # before the cap: it is computed from them
            self._update_distillation_scale(norms)
            self.gradient_shares.add({k: v if k == "supervised" else self.distillation_scale * v
                                      for k, v in norms.items()})
        with self.step_autocast():
            # The cap scales every distillation term alike (their ratios stay the configured weights').
            loss = sum(v if k == "supervised" else self.distillation_scale * v for k, v in weighted.items())
            heads_only = self._heads_only_loss(terms)
        max_norm = self._network_max_norm()
        network_norm, _ = backward_and_step(loss + heads_only, [self.optimizer, self.aux_optimizer],
                                            [self.network, self.aux_modules], self.grad_scaler,
                                            unsynced=[self.aux_modules], max_norms=[max_norm, 12.0])
        self.clip_stats.add(network_norm, max_norm, self.distillation_scale)
        momentum = warmed_up_momentum(self.ema_step, self.ema_momentum)
        ema_update(self.ema_network, self.network, momentum)
        self.mutual_attention.update_target(momentum)
        self.ema_step += 1
        self._epoch_step += 1
        for k, v in terms.items():  # summed on the device: read once per epoch, not once per step
            self._term_sums[k] = self._term_sums.get(k, 0.) + v.detach().float()
        return {"loss": loss.detach().cpu().numpy()}

    def on_train_epoch_end(self, train_outputs: List[dict]) -> None:
        super().on_train_epoch_end(train_outputs)
        names = sorted(self._term_sums)
        steps = torch.tensor(float(self._epoch_step), dtype=torch.float64)
        sums = sum_over_ranks(torch.stack([self._term_sums[k].cpu().double() for k in names] + [steps]))  # all ranks
        means = {k: float(v) for k, v in zip(names, (sums[:-1] / sums[-1].clamp_min(1)).tolist())}
        clip = self.clip_stats.summary(float(sums[-1]), self._network_max_norm())  # reduced over ranks: all take part
        gradients = self.log_distillation_epoch(  # likewise
            gradient_measured_at=self.gradient_share_at, loss_terms=means, loss_weights=self._loss_weights(),
            distillation_ramp=self.distillation_ramp, clip=clip, ema_updates=self.ema_step,
            ema_momentum=warmed_up_momentum(max(self.ema_step - 1, 0), self.ema_momentum))  # the last update's
        self.print_to_log_file("MGSD loss terms (unweighted means): " +
                               ", ".join(f"{k} {np.round(v, 5)}" for k, v in means.items()))
        self.print_to_log_file(f"MGSD gradient shares at the network's {self.gradient_share_at}: " + ", ".join(
            f"{k} {gradients['share'][k]:.3f} (norm {gradients['norm'][k]:.3g})" for k in self.loss_term_names))
        self.print_to_log_file(
            f"MGSD distillation ramp {self.distillation_ramp:.3g}, cap factor mean {clip['distillation_scale_mean']:.3g} "
            f"(min {clip['distillation_scale_min']:.3g}); clip ratio (grad norm / {clip['max_norm']:.3g}) mean "
            f"{clip['ratio_mean']:.3g}, max {clip['ratio_max']:.3g}, clipped steps {clip['clipped_fraction']:.3f}")

    def _loss_weights(self) -> Dict[str, float]:
        return {"supervised": 1.0, "image": self.image_kd_weight, "feature": self.feature_kd_weight,
                "modality": self.modality_kd_weight}

    def checkpoint_state(self) -> dict:
        return {"ema_weights": self.ema_network.state_dict(), "aux_weights": self.aux_modules.state_dict(),
                "aux_optimizer_state": self.aux_optimizer.state_dict(), "ema_step": self.ema_step,
                **super().checkpoint_state()}  # the distillation log

    def load_checkpoint_state(self, state: dict) -> None:
        missing = {"ema_step", "distillation_log"} - set(state)
        if missing:
            raise RuntimeError(f"this checkpoint was written by an older {self.__class__.__name__} (its MGSD "
                               f"section lacks {sorted(missing)}); start a new training instead of --c")
        self.ema_network.load_state_dict(state["ema_weights"])
        self.aux_modules.load_state_dict(state["aux_weights"])
        self.aux_optimizer.load_state_dict(state["aux_optimizer_state"])
        self.ema_step = int(state["ema_step"])
        super().load_checkpoint_state(state)  # the distillation log
