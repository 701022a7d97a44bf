"""Frozen teachers load under nnUNet_compile=1, where nnU-Net's predictor wraps the network in torch.compile."""
from __future__ import annotations

import json

import torch
from torch._dynamo import OptimizedModule

from nnunet_kd.training.teachers import load_frozen_teacher


def test_frozen_teacher_loads_when_the_predictor_compiles(brats_dataset, load_trainer, tmp_path, monkeypatch):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_kd.experiments.benchmark.measure import make_frozen_teachers

    stock = load_trainer(brats_dataset, nnUNetTrainer)
    plans = json.loads((brats_dataset["preprocessed"] / "nnUNetPlans.json").read_text())
    (model_dir,), _ = make_frozen_teachers(str(tmp_path), plans, brats_dataset["dataset_json"], "3d_fullres",
                                           "multimodal", (0, 1, 2))
    saved = torch.load(f"{model_dir}/fold_all/checkpoint_final.pth", map_location="cpu", weights_only=False)
    monkeypatch.setenv("nnUNet_compile", "1")  # torch.compile wraps lazily: nothing is compiled here
    teacher = load_frozen_teacher(model_dir, "all", "checkpoint_final.pth", torch.device("cpu"),
                                  stock.configuration_manager, stock.label_manager)
    assert not isinstance(teacher, OptimizedModule)  # eager: its decoder features are read through hooks
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    state = teacher.state_dict()
    assert state.keys() == saved["network_weights"].keys()
    assert all(torch.equal(state[k], v) for k, v in saved["network_weights"].items())
