"""Epoch ramps of the distillation weights: each method's factor on its distillation terms per epoch."""
from __future__ import annotations

__all__ = ["kd_rampup", "linear_rampup"]


def kd_rampup(epoch: int, start_epoch: int, rampup_epochs: int) -> float:
    """MTCM-KD's factor on both KD terms: 0 before ``start_epoch``, then ``(epoch - start_epoch + 1) /
    rampup_epochs`` up to 1 (so 1 / rampup_epochs in the first KD epoch); 1 from ``start_epoch`` on when
    ``rampup_epochs`` <= 1."""
    if epoch < start_epoch:
        return 0.0
    if rampup_epochs <= 1:
        return 1.0
    return min(1.0, (epoch - start_epoch + 1) / rampup_epochs)


def linear_rampup(epoch: int, rampup_epochs: int) -> float:
    """MGSD's factor on the distillation weights: ``min(1, epoch / rampup_epochs)`` (1 when ``rampup_epochs``
    is 0).

    Epoch 0 trains on the supervised loss alone; the factor grows linearly and is 1 from ``rampup_epochs`` on
    (for 10: 0, 0.1, ..., 0.9, 1, 1, ...). Early on the EMA teacher is close to the random network and the
    features carry little, so the distillation terms would only pull the network towards noise.
    """
    if epoch < 0 or rampup_epochs < 0:
        raise ValueError(f"epoch and rampup_epochs must be >= 0, got {epoch} and {rampup_epochs}")
    return 1.0 if rampup_epochs == 0 else min(1.0, epoch / rampup_epochs)
