"""Stock nnUNetTrainer whose epochs and iterations can be shortened through the environment.

Only the training budget changes (``nnUNet_kd_num_epochs``, ``nnUNet_kd_iterations_per_epoch``,
``nnUNet_kd_val_iterations``), so baselines get exactly the budget the distillation trainers get, and
like them it runs its steps in bf16 autocast on the CPU when ``nnUNet_kd_autocast=bf16``.
"""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_kd.training.budget import apply_budget_overrides, check_budget_environment
from nnunet_kd.training.compilation import CompiledGraphLogMixin
from nnunet_kd.training.precision import CPUAutocastMixin


class nnUNetTrainerBudget(CompiledGraphLogMixin, CPUAutocastMixin, nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        check_budget_environment()  # before nnU-Net creates the fold folder and its log
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_budget_overrides(self)
