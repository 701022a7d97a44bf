"""How much of a network's gradient each loss term contributes, measured at the network's outputs.

The gradient of a loss term with respect to the output logits only passes through the loss
itself, so measuring it costs a few small ``autograd.grad`` calls, not extra network backwards.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from torch import Tensor

from nnunet_kd.training.distributed import sum_over_ranks


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
        self._sums += torch.tensor([norms.get(n, 0.0) for n in self.names], dtype=torch.float64)
        self._count += 1
        return norms

    def summary(self) -> Dict[str, Dict[str, float]]:
        """``{"norm": {name: mean norm}, "share": {name: share}}`` over the steps since ``reset``."""
        stats = sum_over_ranks(torch.cat([self._sums, torch.tensor([float(self._count)], dtype=torch.float64)]))
        count = max(float(stats[-1]), 1.0)
        means = stats[:-1] / count
        total = float(means.sum())
        return {"norm": {n: float(m) for n, m in zip(self.names, means)},
                "share": {n: (float(m) / total if total > 0 else 0.0) for n, m in zip(self.names, means)}}
