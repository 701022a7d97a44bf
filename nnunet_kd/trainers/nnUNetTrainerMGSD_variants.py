"""Variants of MGSD (nnUNetTrainerMGSD.py): the modality-level term switched on, the image-level term on both
passes as in the reference code (github.com/henryccl/MMBTS), and the reference script's adversarial term.
Each is selected with ``nnUNetv2_train ... -tr <class name>``; docs/methods.md describes them.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from nnunet_kd.losses import StyleDiscriminator, discriminator_loss, generator_adversarial_loss
from nnunet_kd.trainers.nnUNetTrainerMGSD import nnUNetTrainerMGSD


class nnUNetTrainerMGSD_ModalityKD(nnUNetTrainerMGSD):
    """MGSD with the modality-level term at the reference weight (150 / 3), towards the frozen initial heads.

    The earlier default: kept to measure that term (it is off in nnUNetTrainerMGSD, docs/methods.md).
    """

    modality_kd_weight = 150.0 / 3


class nnUNetTrainerMGSD_LightModalityKD(nnUNetTrainerMGSD):
    """MGSD with the modality-level (mutual attention) term weighted 5 instead of the reference's 50.

    At the reference weight that term is several times the supervised loss in the first
    epoch; at 5 it starts at about the supervised loss's size.
    """

    modality_kd_weight = 5.0


class nnUNetTrainerMGSD_ImageKDBothPasses(nnUNetTrainerMGSD):
    """MGSD with the image-level term on both passes, as in the reference (the default uses the masked one)."""

    image_kd_passes = ("full", "masked")


class nnUNetTrainerMGSD_adv(nnUNetTrainerMGSD):
    """MGSD plus the reference script's style discriminator between full and masked outputs."""

    adversarial_weight: float = 0.01
    loss_term_names = nnUNetTrainerMGSD.loss_term_names + ("adversarial",)

    def _extra_aux_modules(self, unet: nn.Module) -> Dict[str, nn.Module]:
        conv_dim = 3 if unet.encoder.conv_op is nn.Conv3d else 2
        self.discriminator = StyleDiscriminator(self.label_manager.num_segmentation_heads,
                                                conv_dim=conv_dim).to(self.device)
        return {"discriminator": self.discriminator}

    def _distillation_terms(self, data, stacked, modality_mask, full_out, masked_out,
                            features) -> Dict[str, torch.Tensor]:
        terms = super()._distillation_terms(data, stacked, modality_mask, full_out, masked_out, features)
        full_prob, masked_prob = self._probabilities(full_out[0]), self._probabilities(masked_out[0])
        # The discriminator learns on detached outputs; the network learns to make masked outputs look full.
        terms["discriminator"] = discriminator_loss(self.discriminator(full_prob.detach()),
                                                    self.discriminator(masked_prob.detach()))
        self.discriminator.requires_grad_(False)
        terms["adversarial"] = generator_adversarial_loss(self.discriminator(masked_prob))
        self.discriminator.requires_grad_(True)
        return terms

    def _heads_only_loss(self, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        return super()._heads_only_loss(terms) + terms["discriminator"]

    def _loss_weights(self) -> Dict[str, float]:
        return dict(super()._loss_weights(), adversarial=self.adversarial_weight)
