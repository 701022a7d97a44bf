"""The training budget (epochs, iterations) from the environment, for tests, demos and studies."""
from __future__ import annotations

import os
from typing import Any, Dict

from nnunet_kd.cli import fail

#: Environment variables that shorten training: name -> trainer attribute.
BUDGET_ENV = {
    "nnUNet_kd_num_epochs": "num_epochs",
    "nnUNet_kd_iterations_per_epoch": "num_iterations_per_epoch",
    "nnUNet_kd_val_iterations": "num_val_iterations_per_epoch",
    # checkpoint_latest every N epochs (nnU-Net: 50), so that a killed short run continues with --c
    "nnUNet_kd_save_every": "save_every",
}


def budget_environment(**budget: int) -> Dict[str, str]:
    """The ``nnUNet_kd_*`` variables that set these trainer attributes, e.g.
    ``budget_environment(num_epochs=2)`` -> ``{"nnUNet_kd_num_epochs": "2"}``; an unknown attribute raises KeyError."""
    env_name_of = {attribute: env_name for env_name, attribute in BUDGET_ENV.items()}
    unknown = sorted(set(budget) - set(env_name_of))
    if unknown:
        raise KeyError(f"no budget variable sets {', '.join(unknown)}; known: {', '.join(env_name_of)}")
    return {env_name_of[attribute]: str(value) for attribute, value in budget.items()}


def read_budget() -> Dict[str, int]:
    """Trainer attribute -> value for each ``nnUNet_kd_*`` budget variable that is set (empty = unset).

    nnUNetv2_train passes no trainer options, so like nnU-Net's ``nnUNet_compile`` the budget comes from
    the environment. A bad value raises a ValueError naming the variable and the allowed values.
    """
    budget = {}
    for env_name, attribute in BUDGET_ENV.items():
        raw = os.environ.get(env_name)
        if raw is None or raw == "":
            continue
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"environment variable {env_name}={raw!r}: allowed are whole numbers of at least 1 "
                             f"(e.g. {env_name}=2), or leave it unset for nnU-Net's default")
        budget[attribute] = value
    return budget


def check_budget_environment() -> None:
    """Stop with one ``error: ...`` line on stderr and exit status 1 if a budget variable is bad.

    Trainers call it before ``nnUNetTrainer.__init__``, which creates the fold folder and its log.
    """
    try:
        read_budget()
    except ValueError as e:
        fail(str(e))


def apply_budget_overrides(trainer: Any) -> None:
    """Set epochs / iterations from the ``nnUNet_kd_*`` environment variables that are set (see read_budget)."""
    for attribute, value in read_budget().items():
        setattr(trainer, attribute, value)
