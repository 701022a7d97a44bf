"""The plugin's own state inside nnU-Net's checkpoints, under one key per trainer family.

``network_weights`` stays what stock nnU-Net inference loads; the plugin's section sits beside it. Each
checkpoint is written once, whole, through a temporary file and a rename, so a kill never leaves a 0-byte
file or a stock checkpoint without the section; when ``--c`` still meets one (e.g. from an older version),
loading falls back to the newest intact checkpoint of the same training, with a warning in the log.
"""
from __future__ import annotations

import os
from typing import Callable, List, Union
from unittest import mock

import torch

from nnunet_kd.atomic import atomic_torch_save

#: The checkpoints nnU-Net writes into a fold folder (``nnUNetv2_train --c`` picks one of them).
CHECKPOINT_NAMES = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
#: What nnU-Net's load_checkpoint reads from every checkpoint.
_NNUNET_KEYS = ("network_weights", "optimizer_state", "logging", "_best_ema", "current_epoch", "init_args")


def save_with_section(save: Callable[[str], None], filename: str, key: str, state: dict) -> None:
    """Run nnU-Net's ``save(filename)`` but write its checkpoint dict, plus ``state`` under ``key``, atomically.

    nnU-Net builds the dict inline and hands it to ``torch.save(checkpoint, filename)``; that one call is
    intercepted (every other torch.save passes through), so nnU-Net's own keys stay exactly its own.
    """
    real_save = torch.save
    written: List[str] = []

    def save_whole(obj, f, *args, **kwargs):
        if isinstance(f, str) and f == filename and isinstance(obj, dict) and not written:
            atomic_torch_save({**obj, key: state}, filename)
            written.append(filename)
        else:
            real_save(obj, f, *args, **kwargs)

    with mock.patch.object(torch, "save", save_whole):
        save(filename)
    if not written:
        raise RuntimeError(f"nnU-Net's save_checkpoint did not write {filename} through torch.save; "
                           "the plugin's checkpoint section could not be added")


def checkpoint_problem(filename: str, key: str, device: torch.device) -> Union[str, dict]:
    """The checkpoint in ``filename`` if it is whole and has the ``key`` section, else why not (a str)."""
    try:
        checkpoint = torch.load(filename, map_location=device, weights_only=False)
    except Exception as e:  # 0-byte or truncated files raise EOFError, RuntimeError, UnpicklingError, ...
        return f"cannot be read ({type(e).__name__}: {e})"
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in _NNUNET_KEYS):
        return "is not a complete nnU-Net checkpoint"
    if key not in checkpoint:
        return f"has no '{key}' section"
    return checkpoint


def fallback_candidates(filename: str) -> List[str]:
    """The other checkpoints of the training that wrote ``filename``, newest first (none for other names)."""
    folder, name = os.path.split(os.path.abspath(filename))
    if name not in CHECKPOINT_NAMES:
        return []
    others = [os.path.join(folder, n) for n in CHECKPOINT_NAMES if n != name]
    return sorted((p for p in others if os.path.isfile(p)), key=os.path.getmtime, reverse=True)


class CheckpointSectionMixin:
    """For nnUNetTrainer subclasses: save and restore ``checkpoint_state()`` under ``checkpoint_section``.

    Put it before nnUNetTrainer in the bases; subclasses implement ``checkpoint_state`` and
    ``load_checkpoint_state``.
    """

    checkpoint_section: str = ""

    def checkpoint_state(self) -> dict:
        raise NotImplementedError

    def load_checkpoint_state(self, state: dict) -> None:
        raise NotImplementedError

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # nothing written (nnU-Net logs why)
            return
        save_with_section(super().save_checkpoint, filename, self.checkpoint_section, self.checkpoint_state())

    def load_checkpoint(self, filename_or_checkpoint: Union[str, dict]) -> None:
        if not isinstance(filename_or_checkpoint, str):
            checkpoint = filename_or_checkpoint
            if self.checkpoint_section not in checkpoint:
                raise RuntimeError(f"the given checkpoint has no '{self.checkpoint_section}' section: "
                                   f"it was not written by {self.__class__.__name__}")
            super().load_checkpoint(checkpoint)
        else:
            filename, checkpoint = self._intact_checkpoint(filename_or_checkpoint)
            super().load_checkpoint(filename)
        self.load_checkpoint_state(checkpoint[self.checkpoint_section])

    def _intact_checkpoint(self, filename: str):
        """(file, checkpoint): ``filename`` if intact, else the newest intact sibling (warned in the log)."""
        found = checkpoint_problem(filename, self.checkpoint_section, self.device)
        if isinstance(found, dict):
            return filename, found
        problem = found
        for candidate in fallback_candidates(filename):
            found = checkpoint_problem(candidate, self.checkpoint_section, self.device)
            if isinstance(found, dict):
                self.print_to_log_file(
                    f"WARNING: {filename} {problem} (was the training killed while writing it?); "
                    f"continuing from {candidate} instead (epoch {found['current_epoch']})")
                return candidate, found
        others = ", and no other checkpoint in its folder is intact" if fallback_candidates(filename) else ""
        raise RuntimeError(f"{filename} {problem}{others}: {self.__class__.__name__} cannot continue from it")
