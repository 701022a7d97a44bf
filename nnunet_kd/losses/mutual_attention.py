"""Modality-level distillation of MGSD: mutual-aware attention between the full and the masked pass
(reference code: github.com/henryccl/MMBTS, MMBTS/models/MGOD/; the target departs from it, see
:class:`MutualAwareAttention`). The attention heads exist only for this loss and train with it."""
from __future__ import annotations

import copy

import torch
from torch import nn

from nnunet_kd.training.ema import ema_update

__all__ = ["CrossAttentionBlock", "ModalityTokenizer", "ModalityRepresentation", "MutualAwareAttention", "TARGETS"]


def _conv_cls(conv_dim: int) -> type[nn.Module]:
    if conv_dim not in (2, 3):
        raise ValueError(f"conv_dim must be 2 or 3, got {conv_dim}")
    return nn.Conv3d if conv_dim == 3 else nn.Conv2d


def _pool_cls(conv_dim: int) -> type[nn.Module]:
    return nn.AdaptiveAvgPool3d if conv_dim == 3 else nn.AdaptiveAvgPool2d


class CrossAttentionBlock(nn.Module):
    """Transformer-decoder-style cross-attention (post-norm, no self-attention).

    q: (N, Lq, E), kv: (N, Lk, E) -> (N, Lq, E):
    ``x = LN(q + MHA(q, kv, kv)); out = LN(x + FFN(x))``.
    The residual keeps the query information (needed when kv carries none, e.g. a
    zero-filled modality), and the LayerNorms keep outputs at unit scale, so the
    MSE between representations cannot be lowered by shrinking them to zero.
    """

    def __init__(self, embed_dim: int, num_heads: int, ffn_mult: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(embed_dim)
        self.ffn = nn.Sequential(nn.Linear(embed_dim, ffn_mult * embed_dim), nn.GELU(),
                                 nn.Linear(ffn_mult * embed_dim, embed_dim))
        self.norm2 = nn.LayerNorm(embed_dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        attended, _ = self.attn(q, kv, kv, need_weights=False)
        x = self.norm1(q + attended)
        return self.norm2(x + self.ffn(x))


class ModalityTokenizer(nn.Module):
    """Per-modality feature extractor: (B, M, *S) images -> (B, M, N_tok, E) tokens.

    Every modality goes through the same small conv stack (two stride-2 3x3(x3)
    convs, LeakyReLU), is adaptive-average-pooled to ``token_grid**conv_dim`` tokens,
    layer-normalised, and gets a learned modality embedding (so modalities are
    distinguishable despite shared weights) and a learned position embedding.
    Works for any spatial size >= 1 (adaptive pooling also up-samples small maps).
    """

    def __init__(self, num_modalities: int, embed_dim: int, token_grid: int, conv_dim: int, hidden: int = 16) -> None:
        super().__init__()
        conv = _conv_cls(conv_dim)
        self.conv_dim = conv_dim
        self.num_modalities = num_modalities
        self.features = nn.Sequential(
            conv(1, hidden, 3, stride=2, padding=1), nn.LeakyReLU(0.01, inplace=True),
            conv(hidden, embed_dim, 3, stride=2, padding=1), nn.LeakyReLU(0.01, inplace=True),
            _pool_cls(conv_dim)(token_grid),
        )
        self.norm = nn.LayerNorm(embed_dim)
        n_tok = token_grid ** conv_dim
        self.modality_embed = nn.Parameter(torch.randn(num_modalities, 1, embed_dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n_tok, embed_dim) * 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, m = images.shape[:2]
        x = self.features(images.reshape(b * m, 1, *images.shape[2:]))  # (B*M, E, *grid)
        tokens = self.norm(x.flatten(2).transpose(1, 2))  # (B*M, N_tok, E)
        tokens = tokens.view(b, m, *tokens.shape[1:])
        return tokens + self.modality_embed + self.pos_embed


class ModalityRepresentation(nn.Module):
    """First stage of the modality-level term: one representation per modality for one pass.

    (B, Cb, *s) bottleneck and (B, M, *S) images -> (B, M, N_q, E), N_q = token_grid**conv_dim.
    Style tokens = AdaptivePool(Conv1x1(bottleneck)) + position embedding, (B, N_q, E); modality
    tokens from :class:`ModalityTokenizer`, (B, M, N_tok, E); one cross-attention block (queries =
    style tokens, keys/values = one modality's tokens, shared over modalities) gives the result.
    """

    def __init__(self, bottleneck_channels: int, num_modalities: int, embed_dim: int, num_heads: int,
                 token_grid: int, conv_dim: int) -> None:
        super().__init__()
        conv = _conv_cls(conv_dim)
        self.style_reduce = nn.Sequential(conv(bottleneck_channels, embed_dim, 1), _pool_cls(conv_dim)(token_grid))
        self.style_pos_embed = nn.Parameter(torch.randn(1, token_grid ** conv_dim, embed_dim) * 0.02)
        self.tokenizer = ModalityTokenizer(num_modalities, embed_dim, token_grid, conv_dim)
        self.attention = CrossAttentionBlock(embed_dim, num_heads)

    def forward(self, bottleneck: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        b, m = images.shape[:2]
        style = self.style_reduce(bottleneck).flatten(2).transpose(1, 2) + self.style_pos_embed  # (B, N_q, E)
        tokens = self.tokenizer(images)  # (B, M, N_tok, E)
        # Batch the modalities: every modality is attended by the same style queries.
        q = style.unsqueeze(1).expand(b, m, *style.shape[1:]).reshape(b * m, *style.shape[1:])
        rep = self.attention(q, tokens.reshape(b * m, *tokens.shape[2:]))
        return rep.view(b, m, *rep.shape[1:])


#: Second-stage targets of :class:`MutualAwareAttention` (see its docstring).
TARGETS = ("fixed", "ema", "full_pass", "symmetric")


class MutualAwareAttention(nn.Module):
    """Modality-level distillation loss of MGSD between the full-input and the masked-input pass.

    Inputs (shapes for conv_dim = 3; drop one spatial axis for 2-D):
      full_bottleneck: (B, Cb, d, h, w) bottleneck ("style") features of the full input; with
        targets "fixed" and "ema" those of the EMA network (the teacher), otherwise the online network's.
      masked_bottleneck: (B, Cb, d, h, w) the online network's, masked input.
      full_input, masked_input: (B, M, D, H, W); channel m is modality m, i.e. the same
        order as the columns of modality_mask (reorder dataset channels before calling).
      modality_mask: (B, M) bool, True = modality present in the masked pass.
    Output: scalar (float32).

    First stage (:class:`ModalityRepresentation`): R_masked = online(masked_bottleneck,
    masked_input), (B, M, N_q, E). Second stage, per modality m, a cross-attention block with
    separate weights for present and for missing modalities gives a prediction P[b, m], compared
    with a teacher T[b, m] (both (N_q, E)): err[b, m] = mean over (N_q, E) of (P - T)^2.
    Per sample: present_weight * mean(err over present) + missing_weight * mean(err over missing);
    when a group is empty (e.g. an all-present mask) the weights of the non-empty groups are
    renormalised to sum to 1. Mean over the batch.

    ``target`` chooses the teacher and what the predictor may read:
      "fixed" (default) and "ema" (BYOL / mean teacher): T = target(full_bottleneck, full_input),
        computed by ``self.target``, a copy of the first-stage heads, under stop-gradient, on the
        EMA network's bottleneck; P = Attn(q = R_masked[:, m], kv = R_masked of all modalities,
        (B, M*N_q, E)). The predictor reads only the masked pass, so T is never its input.
        With "fixed" the target heads stay the initial heads (an EMA copy at momentum 1): T is a
        fixed function of the full pass, and when the two passes are unrelated the loss cannot fall
        below the variance of T over samples. With "ema" they follow the online heads
        (:meth:`update_target`); the online heads then learn to ignore an unrelated input and the
        target follows them, so in that setting the term still collapses (slowly).
      "full_pass" (the project's earlier form): T = online(full_bottleneck, full_input), detached,
        and P = Attn(q = R_masked[:, m], kv = T[:, m]). T is also the predictor's input, so the
        heads alone can copy it and the loss collapses towards 0 whatever the network does.
      "symmetric" (the reference's form): P = Attn(R_masked[:, m], R_full[:, m]),
        T = Attn(R_full[:, m], R_masked[:, m]), both sides with gradient (R_full from the online
        heads). It collapses the same way.

    Because the first-stage attention has a residual from the style queries, a missing
    (zero-filled) modality still yields a representation that depends on the masked bottleneck,
    so the loss asks the masked bottleneck to carry what the full pass extracted from that modality.
    """

    def __init__(self, bottleneck_channels: int, num_modalities: int = 4, embed_dim: int = 64, num_heads: int = 4,
                 token_grid: int = 4, conv_dim: int = 3, present_weight: float = 0.6,
                 missing_weight: float = 0.4, target: str = "fixed") -> None:
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if token_grid < 1 or num_modalities < 1:
            raise ValueError("token_grid and num_modalities must be >= 1")
        if present_weight < 0 or missing_weight < 0 or present_weight + missing_weight <= 0:
            raise ValueError("present_weight and missing_weight must be >= 0 and not both 0")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        _conv_cls(conv_dim)
        self.conv_dim = conv_dim
        self.num_modalities = num_modalities
        self.bottleneck_channels = bottleneck_channels
        self.present_weight = float(present_weight)
        self.missing_weight = float(missing_weight)
        self.target_form = target
        self.online = ModalityRepresentation(bottleneck_channels, num_modalities, embed_dim, num_heads, token_grid,
                                             conv_dim)
        self.present_attention = CrossAttentionBlock(embed_dim, num_heads)
        self.missing_attention = CrossAttentionBlock(embed_dim, num_heads)
        # Teacher first-stage heads: a frozen copy of the initial online heads ("fixed", an EMA copy at
        # momentum 1) or an EMA copy that follows them ("ema"); the other forms use the online heads.
        self.target = copy.deepcopy(self.online).requires_grad_(False) if target in ("fixed", "ema") else None

    @property
    def uses_ema_network(self) -> bool:
        """True when ``full_bottleneck`` must come from the EMA network (targets "fixed" and "ema")."""
        return self.target_form in ("fixed", "ema")

    def update_target(self, momentum: float) -> None:
        """EMA step of the target heads towards the online first-stage heads (target "ema" only)."""
        if self.target_form == "ema":
            ema_update(self.target, self.online, momentum)

    def _check(self, full_bottleneck, masked_bottleneck, full_input, masked_input, modality_mask) -> None:
        nd = self.conv_dim + 2
        if full_bottleneck.shape != masked_bottleneck.shape or full_bottleneck.ndim != nd \
                or full_bottleneck.shape[1] != self.bottleneck_channels:
            raise ValueError(f"bottlenecks must both be (B, {self.bottleneck_channels}, *s) with {self.conv_dim} "
                             f"spatial axes, got {tuple(full_bottleneck.shape)} and {tuple(masked_bottleneck.shape)}")
        if full_input.shape != masked_input.shape or full_input.ndim != nd \
                or full_input.shape[1] != self.num_modalities:
            raise ValueError(f"inputs must both be (B, {self.num_modalities}, *S), got {tuple(full_input.shape)} "
                             f"and {tuple(masked_input.shape)}")
        b = full_bottleneck.shape[0]
        if full_input.shape[0] != b or tuple(modality_mask.shape) != (b, self.num_modalities) \
                or modality_mask.dtype != torch.bool:
            raise ValueError(f"modality_mask must be a bool tensor of shape ({b}, {self.num_modalities}), "
                             f"got {modality_mask.dtype} {tuple(modality_mask.shape)}")

    def _predictions_and_teacher(self, full_bottleneck, masked_bottleneck, full_input, masked_input):
        """Per-modality predictions of each head and the teacher, all (B*M, N_q, E)."""
        b, m = full_input.shape[:2]
        flat = lambda t: t.reshape(b * m, *t.shape[2:])  # noqa: E731  (B, M, N, E) -> (B*M, N, E)
        student = self.online(masked_bottleneck, masked_input)  # (B, M, N_q, E)
        if self.uses_ema_network:
            with torch.no_grad():
                teacher = flat(self.target(full_bottleneck.detach(), full_input.detach()))
            q = flat(student)
            # every modality's query reads all of the masked pass's representations
            kv = student.reshape(b, 1, m * student.shape[2], student.shape[3]).expand(b, m, -1, -1)
            kv = kv.reshape(b * m, *kv.shape[2:])
            return self.present_attention(q, kv), self.missing_attention(q, kv), teacher, teacher
        if self.target_form == "full_pass":
            with torch.no_grad():  # teacher side: full pass, no gradient at all
                teacher = flat(self.online(full_bottleneck.detach(), full_input.detach()))
            q = flat(student)
            return self.present_attention(q, teacher), self.missing_attention(q, teacher), teacher, teacher
        full, masked = flat(self.online(full_bottleneck, full_input)), flat(student)
        return (self.present_attention(masked, full), self.missing_attention(masked, full),
                self.present_attention(full, masked), self.missing_attention(full, masked))

    def forward(self, full_bottleneck: torch.Tensor, masked_bottleneck: torch.Tensor, full_input: torch.Tensor,
                masked_input: torch.Tensor, modality_mask: torch.Tensor) -> torch.Tensor:
        """Args: full_bottleneck, masked_bottleneck (B, Cb, *s); full_input, masked_input (B, M, *S);
        modality_mask (B, M) bool (see the class docstring). Returns: 0-dim float32 loss."""
        self._check(full_bottleneck, masked_bottleneck, full_input, masked_input, modality_mask)
        b, m = full_input.shape[:2]
        # Both heads run on every modality (tokens are few); the mask picks the relevant error.
        pred_present, pred_missing, teacher_present, teacher_missing = self._predictions_and_teacher(
            full_bottleneck, masked_bottleneck, full_input, masked_input)
        err_present = (pred_present.float() - teacher_present.float()).pow(2).mean(dim=(1, 2)).view(b, m)
        err_missing = (pred_missing.float() - teacher_missing.float()).pow(2).mean(dim=(1, 2)).view(b, m)

        present = modality_mask.to(err_present.device)
        n_present = present.sum(dim=1)
        n_missing = m - n_present
        zero = err_present.new_zeros(())
        mean_present = torch.where(present, err_present, zero).sum(1) / n_present.clamp(min=1)
        mean_missing = torch.where(~present, err_missing, zero).sum(1) / n_missing.clamp(min=1)
        w_present = self.present_weight * (n_present > 0).float()
        w_missing = self.missing_weight * (n_missing > 0).float()
        per_sample = (w_present * mean_present + w_missing * mean_missing) / (w_present + w_missing).clamp(min=1e-12)
        return per_sample.mean()
