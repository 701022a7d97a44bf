"""A view of the session's trained MGSD model (conftest's ``brats_dataset`` + ``mgsd_model``) for the
prediction and missing-modality tests."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, List


@dataclass(frozen=True)
class TrainedModel:
    """Where the trained test model and its data live."""

    raw_dataset: str
    model_folder: str
    dataset_id: int
    dataset_name: str
    environment: Dict[str, str] = field(repr=False)
    configuration: str = "3d_fullres"
    trainer: str = "nnUNetTrainerMGSD"
    plans: str = "nnUNetPlans"
    fold: str = "all"

    @property
    def images_tr(self) -> str:
        return os.path.join(self.raw_dataset, "imagesTr")

    @property
    def labels_tr(self) -> str:
        return os.path.join(self.raw_dataset, "labelsTr")

    def env(self) -> Dict[str, str]:
        """Environment for nnU-Net commands: data folders, plugin trainers, tiny budget."""
        return dict(self.environment)

    def cases(self) -> List[str]:
        """Case identifiers in imagesTr (sorted)."""
        return sorted(f[: -len("_0000.nii.gz")] for f in os.listdir(self.images_tr) if f.endswith("_0000.nii.gz"))

    def channel_file(self, case: str, channel: int) -> str:
        return os.path.join(self.images_tr, f"{case}_{channel:04d}.nii.gz")
