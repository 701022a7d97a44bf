"""Optional adversarial term of MGSD (nnUNetTrainerMGSD_adv): a style discriminator judges whether a
segmentation output came from the full or the masked input, and the network learns to make masked outputs
look full (after the reference training script of MGSD, github.com/henryccl/MMBTS).

The discriminator is a network, not a loss, but it exists only for this loss pair and is trained by it
alone, so it lives beside it rather than in ``training/``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StyleDiscriminator", "discriminator_loss", "generator_adversarial_loss"]


class StyleDiscriminator(nn.Module):
    """Small conv net: segmentation output (B, C, *s) -> one real/fake logit per sample (B,).

    ``num_layers`` stride-2 3x3(x3) convs (channels base, 2*base, ...), LeakyReLU(0.2),
    then global average pooling and a linear layer. No normalisation layers, so any
    spatial size >= 1 works. Feed it what the segmentation loss sees as probabilities
    (softmax, or sigmoid for region-based training) so it judges shapes, not logit
    scales; detach the segmentation outputs when training the discriminator.
    """

    def __init__(self, in_channels: int, base_channels: int = 16, num_layers: int = 3, conv_dim: int = 3) -> None:
        super().__init__()
        if conv_dim not in (2, 3):
            raise ValueError(f"conv_dim must be 2 or 3, got {conv_dim}")
        conv = nn.Conv3d if conv_dim == 3 else nn.Conv2d
        layers: list[nn.Module] = []
        c_in = in_channels
        for i in range(num_layers):
            c_out = base_channels * 2 ** i
            layers += [conv(c_in, c_out, 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, 1)
        self.conv_dim = conv_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != self.conv_dim + 2:
            raise ValueError(f"expected (B, C, *s) with {self.conv_dim} spatial axes, got {tuple(x.shape)}")
        h = self.features(x).flatten(2).mean(dim=2)  # (B, C_last)
        return self.head(h).squeeze(1)


def discriminator_loss(d_full_logits: torch.Tensor, d_masked_logits: torch.Tensor) -> torch.Tensor:
    """The discriminator's loss: BCE-with-logits with full-input outputs real (1) and masked-input outputs
    fake (0), the mean of both terms.

    Args:
        d_full_logits: (B,) discriminator logits of the full-input outputs (detached from the network).
        d_masked_logits: (B,) discriminator logits of the masked-input outputs (detached likewise).

    Returns:
        0-dim float32 tensor.
    """
    real = F.binary_cross_entropy_with_logits(d_full_logits.float(), torch.ones_like(d_full_logits, dtype=torch.float32))
    fake = F.binary_cross_entropy_with_logits(d_masked_logits.float(),
                                              torch.zeros_like(d_masked_logits, dtype=torch.float32))
    return 0.5 * (real + fake)


def generator_adversarial_loss(d_masked_logits: torch.Tensor) -> torch.Tensor:
    """The network's non-saturating adversarial loss: the masked-input output should be judged real.

    Args:
        d_masked_logits: (B,) discriminator logits of the masked-input outputs (with gradient to the network).

    Returns:
        0-dim float32 tensor.
    """
    return F.binary_cross_entropy_with_logits(d_masked_logits.float(),
                                              torch.ones_like(d_masked_logits, dtype=torch.float32))
