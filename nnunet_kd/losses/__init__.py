"""The distillation losses of both methods, one concept per file; import them from here.

MTCM-KD (Ahmad, Ullah, Gwak, Knowledge-Based Systems 297, 2024):

- :mod:`~nnunet_kd.losses.kd`: response KD, KL(teacher || student) for region and label outputs;
- :mod:`~nnunet_kd.losses.cdsfl`: cooperative deep supervision fusion learning (fusion head and its loss);
- :mod:`~nnunet_kd.losses.mtcmkd_student`: the student's loss as the weighted terms the trainer logs.

MGSD (multi-granularity self distillation):

- :mod:`~nnunet_kd.losses.image_kd`: image level, output probabilities towards the EMA teacher's;
- :mod:`~nnunet_kd.losses.multiview`: feature level, multi-view profile consistency;
- :mod:`~nnunet_kd.losses.mutual_attention`: modality level, mutual-aware attention;
- :mod:`~nnunet_kd.losses.adversarial`: the optional style discriminator and its losses.

What only weights, schedules or feeds the losses (performance-aware KD weights, ramps, modality masks, the
EMA teacher, gradient shares) is training machinery, in :mod:`nnunet_kd.training`.
"""
from nnunet_kd.losses.adversarial import StyleDiscriminator, discriminator_loss, generator_adversarial_loss
from nnunet_kd.losses.cdsfl import CDSFL, CDSFLFusion, ChannelGate, cdsfl_seg_loss, fuse_with_detached_copy
from nnunet_kd.losses.image_kd import image_kd_loss, output_probabilities
from nnunet_kd.losses.kd import (KD_REDUCTIONS, ResponseKD, binary_kl_from_logits, one_vs_rest_kl_from_logits,
                                 response_kd_loss)
from nnunet_kd.losses.mtcmkd_student import STUDENT_TERMS, student_loss_terms
from nnunet_kd.losses.multiview import MultiViewConsistencyLoss, axis_profiles, mix_normalise, normalised_profiles
from nnunet_kd.losses.mutual_attention import (CrossAttentionBlock, ModalityRepresentation, ModalityTokenizer,
                                               MutualAwareAttention)

__all__ = [
    "response_kd_loss", "ResponseKD", "binary_kl_from_logits", "one_vs_rest_kl_from_logits", "KD_REDUCTIONS",
    "CDSFL", "CDSFLFusion", "ChannelGate", "cdsfl_seg_loss", "fuse_with_detached_copy",
    "STUDENT_TERMS", "student_loss_terms",
    "image_kd_loss", "output_probabilities",
    "MultiViewConsistencyLoss", "axis_profiles", "mix_normalise", "normalised_profiles",
    "MutualAwareAttention", "CrossAttentionBlock", "ModalityRepresentation", "ModalityTokenizer",
    "StyleDiscriminator", "discriminator_loss", "generator_adversarial_loss",
]
