"""MGSD (multi-granularity self distillation) building blocks, one import point for the trainer.

- modality masks: :func:`sample_modality_masks`, :func:`all_modality_subsets`, :func:`apply_modality_mask`
- momentum teacher: :func:`ema_update`, :func:`warmed_up_momentum`
- feature level: :class:`MultiViewConsistencyLoss`
- modality level: :class:`MutualAwareAttention`
- optional adversarial extra: :class:`StyleDiscriminator`, :func:`discriminator_loss`,
  :func:`generator_adversarial_loss`

Nothing here depends on a patch size or on the dataset's channel order.
"""
from nnunet_kd.losses.discriminator import StyleDiscriminator, discriminator_loss, generator_adversarial_loss
from nnunet_kd.losses.ema import ema_update, warmed_up_momentum
from nnunet_kd.losses.modality_mask import all_modality_subsets, apply_modality_mask, sample_modality_masks
from nnunet_kd.losses.multiview import MultiViewConsistencyLoss, axis_profiles, mix_normalise, normalised_profiles
from nnunet_kd.losses.mutual_attention import (CrossAttentionBlock, ModalityRepresentation, ModalityTokenizer,
                                               MutualAwareAttention)

__all__ = [
    "sample_modality_masks", "all_modality_subsets", "apply_modality_mask",
    "ema_update", "warmed_up_momentum",
    "MultiViewConsistencyLoss", "axis_profiles", "mix_normalise", "normalised_profiles",
    "MutualAwareAttention", "CrossAttentionBlock", "ModalityRepresentation", "ModalityTokenizer",
    "StyleDiscriminator", "discriminator_loss", "generator_adversarial_loss",
]
