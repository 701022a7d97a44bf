"""The distillation trainers' per-epoch record, ``distillation_log.json`` in the fold folder.

Both methods keep one entry per epoch: the epoch, each loss term's share of the gradient and its mean
gradient norm (:class:`~nnunet_kd.training.gradient_shares.GradientShareMeter`, reduced over the DDP ranks),
then what the method records (MTCM-KD: KD weights per teacher and region, the teachers' loss and Dice;
MGSD: the loss terms, the ramp, the cap and clipping). The study reads ``epoch`` and ``gradient_share``
(and ``gradient_measured_at`` when present). The list is written at the end of every epoch by rank 0 and
saved in the trainer's checkpoint section, so ``--c`` goes on with it.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from nnunet_kd.atomic import atomic_write_json
from nnunet_kd.training.checkpoints import CheckpointSectionMixin
from nnunet_kd.training.gradient_shares import GradientShareMeter

__all__ = ["DISTILLATION_LOG", "DistillationLogMixin", "rounded"]

#: The file name in the fold folder.
DISTILLATION_LOG = "distillation_log.json"
#: Key of the log in the checkpoint section; MTCM-KD checkpoints written before the two trainers shared this
#: mixin hold it under the older key, which ``--c`` still reads.
CHECKPOINT_KEY = "distillation_log"
OLD_CHECKPOINT_KEYS = ("kd_history",)


def rounded(value: Any, digits: int = 4) -> Any:
    """``value`` (number, tensor, array, list or dict of them) as JSON-able numbers rounded to ``digits``; NaN
    as None."""
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if torch.is_tensor(value) or isinstance(value, (list, tuple, np.ndarray)):
        return [rounded(v, digits) for v in (value.tolist() if hasattr(value, "tolist") else value)]
    value = float(value)
    return None if np.isnan(value) else round(value, digits)


class DistillationLogMixin(CheckpointSectionMixin):
    """For the distillation trainers: ``distillation_log`` (list of per-epoch dicts), ``gradient_shares``
    (a GradientShareMeter over ``loss_term_names``, reset when each training epoch starts), the file written
    from ``on_epoch_end`` and the log kept in the checkpoint section.

    Place it before nnUNetTrainer in the bases. Subclasses extend ``checkpoint_state`` and
    ``load_checkpoint_state`` through ``super()``.
    """

    #: The loss terms whose gradient shares are measured, as named in the training log and the JSON file.
    loss_term_names: Sequence[str] = ()

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.distillation_log: List[dict] = []
        self.gradient_shares = GradientShareMeter(self.loss_term_names)

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self.gradient_shares.reset()

    def log_distillation_epoch(self, **fields: Any) -> Dict[str, Dict[str, float]]:
        """Append this epoch's entry: ``epoch``, ``gradient_share``, ``gradient_norm`` (over the steps since the
        epoch started, reduced over the ranks: every rank must call it), then ``fields``. Returns the shares
        and norms (GradientShareMeter.summary)."""
        shares = self.gradient_shares.summary()
        self.distillation_log.append({"epoch": self.current_epoch, "gradient_share": shares["share"],
                                      "gradient_norm": shares["norm"], **fields})
        return shares

    def update_distillation_epoch(self, **fields: Any) -> None:
        """Add ``fields`` to this epoch's entry (after validation), if the epoch has one."""
        if self.distillation_log and self.distillation_log[-1]["epoch"] == self.current_epoch:
            self.distillation_log[-1].update(fields)

    def on_epoch_end(self) -> None:
        self.write_distillation_log()
        super().on_epoch_end()

    def write_distillation_log(self) -> None:
        """The log as JSON in the fold folder, written atomically by rank 0."""
        if self.local_rank == 0:
            atomic_write_json(self.distillation_log, os.path.join(self.output_folder, DISTILLATION_LOG))

    def checkpoint_state(self) -> dict:
        return {CHECKPOINT_KEY: self.distillation_log}

    def load_checkpoint_state(self, state: dict) -> None:
        key = next((k for k in (CHECKPOINT_KEY,) + OLD_CHECKPOINT_KEYS if k in state), None)
        if key is None:
            raise RuntimeError(f"the checkpoint's '{self.checkpoint_section}' section has no distillation log "
                               f"('{CHECKPOINT_KEY}'); it was not written by {self.__class__.__name__}")
        self.distillation_log = list(state[key])
