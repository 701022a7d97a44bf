"""Image-level distillation of MGSD, its main distillation signal: the masked pass's output probabilities are
pulled towards the EMA teacher's probabilities for the full input (reference code: github.com/henryccl/MMBTS).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["output_probabilities", "image_kd_loss"]


def output_probabilities(logits: Tensor, use_regions: bool) -> Tensor:
    """Probabilities as nnU-Net's loss sees them, in float32.

    Args:
        logits: (B, C, *spatial).
        use_regions: True: sigmoid per region channel; False: softmax over the classes.

    Returns:
        float32 tensor shaped like ``logits``.
    """
    logits = logits.float()
    return torch.sigmoid(logits) if use_regions else torch.softmax(logits, 1)


def image_kd_loss(outputs: Sequence[Tensor], teacher_outputs: Sequence[Tensor], level_weights: Sequence[float],
                  use_regions: bool) -> Tensor:
    """MSE between output and teacher probabilities, weighted over the deep-supervision levels.

    Args:
        outputs: deep-supervision logits of the student pass, (B, C, *s_l) per level l.
        teacher_outputs: the teacher's logits at the same levels and shapes (used as targets, no gradient
            flows into them when they are computed under no_grad).
        level_weights: one weight per level (nnU-Net's deep-supervision weights); levels of weight 0 are
            skipped.
        use_regions: sigmoid (region) instead of softmax outputs (:func:`output_probabilities`).

    Returns:
        0-dim float32 tensor.
    """
    return sum(w * F.mse_loss(output_probabilities(o, use_regions), output_probabilities(t, use_regions))
               for w, o, t in zip(level_weights, outputs, teacher_outputs) if w != 0)
