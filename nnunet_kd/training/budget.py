"""The training budget (epochs, iterations) from the environment, for tests, demos and studies."""
from __future__ import annotations

import os
from typing import Any

#: Environment variables that shorten training: name -> trainer attribute.
BUDGET_ENV = {
    "nnUNet_kd_num_epochs": "num_epochs",
    "nnUNet_kd_iterations_per_epoch": "num_iterations_per_epoch",
    "nnUNet_kd_val_iterations": "num_val_iterations_per_epoch",
    # checkpoint_latest every N epochs (nnU-Net: 50), so that a killed short run continues with --c
    "nnUNet_kd_save_every": "save_every",
}


def apply_budget_overrides(trainer: Any) -> None:
    """Set epochs / iterations from ``nnUNet_kd_*`` environment variables when present.

    nnUNetv2_train passes no trainer options, so like nnU-Net's ``nnUNet_compile`` the
    budget comes from the environment. Bad values raise a ValueError naming the variable.
    """
    for env_name, attribute in BUDGET_ENV.items():
        raw = os.environ.get(env_name)
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            raise ValueError(f"environment variable {env_name}={raw!r} must be a positive integer") from None
        if value < 1:
            raise ValueError(f"environment variable {env_name}={raw!r} must be a positive integer")
        setattr(trainer, attribute, value)
