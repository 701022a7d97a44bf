"""MGSD (multi-granularity self distillation) building blocks, one import point for the trainer.

- modality masks: :func:`sample_modality_masks`, :func:`all_modality_subsets`, :func:`apply_modality_mask`
- momentum teacher: :func:`ema_update`, :func:`warmed_up_momentum`
- distillation weight schedule: :func:`linear_rampup`
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


def linear_rampup(epoch: int, rampup_epochs: int) -> float:
    """Factor on the distillation weights: ``min(1, epoch / rampup_epochs)`` (1 when ``rampup_epochs`` is 0).

    Epoch 0 trains on the supervised loss alone; the factor grows linearly and is 1 from ``rampup_epochs`` on
    (for 10: 0, 0.1, ..., 0.9, 1, 1, ...). Early on the EMA teacher is close to the random network and the
    features carry little, so the distillation terms would only pull the network towards noise.
    """
    if epoch < 0 or rampup_epochs < 0:
        raise ValueError(f"epoch and rampup_epochs must be >= 0, got {epoch} and {rampup_epochs}")
    return 1.0 if rampup_epochs == 0 else min(1.0, epoch / rampup_epochs)


__all__ = [
    "sample_modality_masks", "all_modality_subsets", "apply_modality_mask",
    "ema_update", "warmed_up_momentum", "linear_rampup",
    "MultiViewConsistencyLoss", "axis_profiles", "mix_normalise", "normalised_profiles",
    "MutualAwareAttention", "CrossAttentionBlock", "ModalityRepresentation", "ModalityTokenizer",
    "StyleDiscriminator", "discriminator_loss", "generator_adversarial_loss",
]
