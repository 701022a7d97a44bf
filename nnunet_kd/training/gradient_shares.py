"""How much of a network's gradient each loss term contributes, the cap that bounds the auxiliary terms'
share, and how often the clipping acts.

Measured at the network's outputs, the gradient of a loss term only passes through the loss itself, so
it costs a few small ``autograd.grad`` calls (MTCM-KD); measured over the weights it costs one backward
per term (MGSD).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor

from nnunet_kd.training.distributed import max_over_ranks, sum_over_ranks


def allow_retained_compiled_graphs() -> None:
    """Let compiled backward graphs be kept for a second backward, as :func:`gradient_norms` needs.

    With torch.compile, AOTAutograd donates the saved buffers of a compiled backward (nnU-Net compiles its
    Dice loss, the KD trainers their networks), which forbids ``retain_graph=True``. Measuring the
    gradient shares needs it, so the trainers turn donation off when they compile (a small memory cost).
    """
    import torch._functorch.config as functorch_config

    functorch_config.donated_buffer = False


def gradient_norms(terms: Mapping[str, Tensor], outputs: Sequence[Tensor], scale: float = 1.0) -> Dict[str, float]:
    """L2 norm of d(term)/d(outputs), all ``outputs`` taken together, for each named scalar term.

    ``terms``: name -> scalar loss tensor (already multiplied by its weight) whose graph reaches
    ``outputs``; ``outputs``: tensors of any shape (e.g. the deep-supervision logits, (B, C, *s) each).
    A term that does not depend on ``outputs`` (or a plain number) has norm 0. The graphs are retained.
    ``scale``: each term is multiplied by it before differentiating and its norm divided by it after,
    so half-precision backward passes do not underflow (pass the GradScaler's scale under AMP).
    """
    norms = {}
    for name, term in terms.items():
        if not torch.is_tensor(term) or not term.requires_grad:
            norms[name] = 0.0
            continue
        grads = torch.autograd.grad(term * scale, list(outputs), retain_graph=True, allow_unused=True)
        squared = sum(g.detach().float().pow(2).sum() for g in grads if g is not None)
        norms[name] = float(squared) ** 0.5 / scale  # one device sync per term
    return norms


def auxiliary_scale(supervised_norm: float, auxiliary_norm: float, max_share: float) -> float:
    """Factor (in [0, 1]) for the auxiliary terms so they make at most ``max_share`` of the gradient norms.

    ``supervised_norm``: norm of the supervised term's gradient; ``auxiliary_norm``: sum of the auxiliary
    terms' gradient norms at factor 1 (the sum bounds the norm of their summed gradient). Returns the largest
    c <= 1 with c * auxiliary_norm <= max_share / (1 - max_share) * supervised_norm, i.e. with
    c * auxiliary_norm / (supervised_norm + c * auxiliary_norm) <= max_share; 1 when ``auxiliary_norm`` is 0.
    Then the total gradient norm is at most supervised_norm / (1 - max_share) (see :func:`clip_threshold`).
    """
    if not 0.0 <= max_share < 1.0:
        raise ValueError(f"max_share must be in [0, 1), got {max_share}")
    if auxiliary_norm <= 0.0:
        return 1.0
    return min(1.0, max_share / (1.0 - max_share) * max(supervised_norm, 0.0) / auxiliary_norm)


def clip_threshold(max_norm: float, max_share: float) -> float:
    """The total-gradient clipping norm that never scales the supervised part more than ``max_norm`` would
    scale the supervised gradient alone, when the auxiliary terms hold at most ``max_share`` of the norms
    (:func:`auxiliary_scale`): total <= supervised / (1 - max_share), so clipping the total at
    max_norm / (1 - max_share) applies a factor >= min(1, max_norm / supervised)."""
    if not 0.0 <= max_share < 1.0:
        raise ValueError(f"max_share must be in [0, 1), got {max_share}")
    return max_norm / (1.0 - max_share)


class GradientShareMeter:
    """Averages per-step gradient norms of named loss terms over an epoch and turns them into shares.

    ``share[name] = mean norm of name / sum over terms of mean norms`` (shares sum to 1 when any is > 0).
    Under torch.distributed, ``summary()`` sums the statistics over all ranks first, so every rank
    reports the same numbers.
    """

    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        self.reset()

    def reset(self) -> None:
        self._sums = torch.zeros(len(self.names), dtype=torch.float64)
        self._count = 0

    def update(self, terms: Mapping[str, Tensor], outputs: Sequence[Tensor], scale: float = 1.0) -> Dict[str, float]:
        """Measure one step's norms (terms missing from ``terms`` count as 0; ``scale`` as in
        :func:`gradient_norms`) and add them."""
        unknown = set(terms) - set(self.names)
        if unknown:
            raise KeyError(f"unknown loss terms {sorted(unknown)}; this meter tracks {self.names}")
        norms = gradient_norms(terms, outputs, scale)
        self.add(norms)
        return norms

    def add(self, norms: Mapping[str, float]) -> None:
        """Add one step's norms measured elsewhere (names missing from ``norms`` count as 0)."""
        unknown = set(norms) - set(self.names)
        if unknown:
            raise KeyError(f"unknown loss terms {sorted(unknown)}; this meter tracks {self.names}")
        self._sums += torch.tensor([float(norms.get(n, 0.0)) for n in self.names], dtype=torch.float64)
        self._count += 1

    def summary(self) -> Dict[str, Dict[str, float]]:
        """``{"norm": {name: mean norm}, "share": {name: share}}`` over the steps since ``reset``."""
        stats = sum_over_ranks(torch.cat([self._sums, torch.tensor([float(self._count)], dtype=torch.float64)]))
        count = max(float(stats[-1]), 1.0)
        means = stats[:-1] / count
        total = float(means.sum())
        return {"norm": {n: float(m) for n, m in zip(self.names, means)},
                "share": {n: (float(m) / total if total > 0 else 0.0) for n, m in zip(self.names, means)}}


class ClipStatistics:
    """One epoch's clip ratios of a network's gradient and the cap factor on its auxiliary terms.

    Per step, :meth:`add` keeps the sums on the gradients' device (no host sync per step); once per epoch
    :meth:`summary` reduces them over the ranks (every rank must call it).
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.stats: Dict[str, object] = {"ratio_sum": 0., "ratio_max": 0., "clipped": 0., "finite": 0.,
                                         "scale_sum": 0., "scale_min": 1.0}

    def add(self, norm: Optional[Tensor], max_norm: float, scale: float) -> None:
        """Add one step: the clip ratio (gradient norm before clipping / clipping norm ``max_norm``: the step
        is scaled by 1 / ratio when it exceeds 1) and the cap factor ``scale``. ``norm`` None (no gradient)
        or non-finite (a step the grad scaler skips) leaves the ratios alone."""
        stats = self.stats
        stats["scale_sum"] += scale
        stats["scale_min"] = min(stats["scale_min"], scale)
        if norm is None:
            return
        ratio = norm.detach().float() / max_norm
        finite = torch.isfinite(ratio)
        ratio = torch.where(finite, ratio, torch.zeros_like(ratio))
        stats["ratio_sum"] = stats["ratio_sum"] + ratio
        stats["ratio_max"] = torch.maximum(torch.as_tensor(stats["ratio_max"], device=ratio.device), ratio)
        stats["clipped"] = stats["clipped"] + (ratio > 1).float()
        stats["finite"] = stats["finite"] + finite.float()

    def summary(self, steps: float, max_norm: float) -> Dict[str, float]:
        """Over all ranks: clip ratio mean and max, share of clipped steps, the clipping norm ``max_norm``,
        and the cap factor's mean (over ``steps``, the steps of all ranks) and min."""
        stats = {k: torch.as_tensor(v, dtype=torch.float64).cpu() for k, v in self.stats.items()}
        sums = sum_over_ranks(torch.stack([stats["ratio_sum"], stats["clipped"], stats["finite"],
                                           stats["scale_sum"]]))
        maxima = max_over_ranks(torch.stack([stats["ratio_max"], -stats["scale_min"]]))
        finite = max(float(sums[2]), 1.0)
        return {"max_norm": max_norm, "ratio_mean": float(sums[0]) / finite,
                "ratio_max": float(maxima[0]), "clipped_fraction": float(sums[1]) / finite,
                "distillation_scale_mean": float(sums[3]) / max(steps, 1.0),
                "distillation_scale_min": -float(maxima[1])}
