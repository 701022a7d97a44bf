"""The real trainers' train_step under DDP (2 gloo processes on the CPU) at nnU-Net's CUDA defaults.

On CUDA nnU-Net compiles its network and then gives the lowest deep-supervision level loss weight 0, so
the heads of that level get no gradient in any network that runs eagerly. After a few steps on different
data per rank, every module of the trainer (student, teachers, CDSFL, EMA, auxiliary heads) must hold
the same weights on both ranks.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import traceback
from typing import Dict

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from nnunet_kd.training.features import unwrap_network

#: trainer class name -> (module, epoch to run: MTCM-KD's KD starts in epoch 1)
TRAINERS = {
    "nnUNetTrainerMTCMKD": ("nnunet_kd.trainers.nnUNetTrainerMTCMKD", 1),
    "nnUNetTrainerMTCMKD_FrozenTeachers": ("nnunet_kd.trainers.nnUNetTrainerMTCMKD", 1),
    "nnUNetTrainerMTCMKD_MultimodalTeacher": ("nnunet_kd.trainers.nnUNetTrainerMTCMKD", 1),
    "nnUNetTrainerMGSD": ("nnunet_kd.trainers.nnUNetTrainerMGSD", 0),
    "nnUNetTrainerModalityDropout": ("nnunet_kd.trainers.nnUNetTrainerMGSD", 0),
}
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cuda_compile_weights(num_levels: int) -> np.ndarray:
    """nnU-Net's deep-supervision weights when it compiles (CUDA default): 1/2^i, lowest level 0, sum 1."""
    weights = np.array([1 / 2 ** i for i in range(num_levels)])
    weights[-1] = 0
    return weights / weights.sum()


def _patch_nnunet_for_cpu_ddp() -> None:
    """Make this process's nnU-Net build DDP trainers on the CPU with its CUDA-compile loss weights.

    nnU-Net wraps its own network in DDP with CUDA device ids; on CUDA that network is compiled, and a
    compiled network gives every parameter a gradient (zeros for the unused heads). Here it runs eagerly,
    so its DDP wrapper looks for unused parameters instead: the stand-in for compilation. The plugin's
    own DDP wrappers are left as they are: they are what this test checks.
    """
    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as base

    def ddp_as_if_compiled(module, device_ids=None, **kwargs):
        return DistributedDataParallel(module, find_unused_parameters=True)

    build_loss = base.nnUNetTrainer._build_loss

    def build_loss_as_on_cuda(self):
        loss = build_loss(self)
        loss.weight_factors = tuple(cuda_compile_weights(len(loss.weight_factors)))
        return loss

    base.DDP = ddp_as_if_compiled
    base.nnUNetTrainer._build_loss = build_loss_as_on_cuda


def _modules(trainer) -> Dict[str, nn.Module]:
    """Every network and head the trainer holds, unwrapped from DDP and compilation."""
    found = {}
    for name, value in vars(trainer).items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, item in enumerate(items):
            if isinstance(item, nn.Module) and name != "loss":
                found[name if len(items) == 1 else f"{name}{i}"] = unwrap_network(item)
    return found


def _digests(modules: Dict[str, nn.Module]) -> Dict[str, str]:
    return {f"{m}.{k}": hashlib.sha256(v.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
            for m, module in modules.items() for k, v in module.state_dict().items()}


def _train(rank: int, trainer_name: str, setup: dict) -> dict:
    import importlib

    from batchgenerators.utilities.file_and_folder_operations import load_json

    _patch_nnunet_for_cpu_ddp()
    module_name, epoch = TRAINERS[trainer_name]
    cls = getattr(importlib.import_module(module_name), trainer_name)
    plans = load_json(setup["plans"])
    plans["continue_training"] = False
    trainer = cls(plans=plans, configuration="3d_fullres", fold=0, dataset_json=load_json(setup["dataset_json"]),
                  device=torch.device("cpu"))
    assert trainer.is_ddp
    trainer.device, trainer.grad_scaler = torch.device("cpu"), None  # nnU-Net assumes that DDP means CUDA
    trainer.initialize()
    assert trainer.loss.weight_factors[-1] == 0
    before = _digests(_modules(trainer))
    trainer.current_epoch = epoch
    trainer.on_train_epoch_start()
    outputs = [trainer.train_step(batch) for batch in setup["batches"][rank]]
    trainer.on_train_epoch_end(outputs)
    after = _digests(_modules(trainer))
    history = getattr(trainer, "kd_history", None) or getattr(trainer, "distillation_log", None)
    return {"before": before, "after": after, "losses": [float(o["loss"]) for o in outputs],
            "last_history": history[-1] if history else None}


def _worker(rank: int, port: int, trainer_name: str, setup: dict, results) -> None:
    os.environ.update(setup["env"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results[rank] = _train(rank, trainer_name, setup)
    except BaseException:
        results[rank] = {"error": traceback.format_exc()}
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_setup(brats_dataset, tmp_path_factory, load_trainer, synthetic_batch) -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_kd.experiments.benchmark_measure import make_frozen_teachers

    root = tmp_path_factory.mktemp("ddp")
    dataset_json = brats_dataset["dataset_json"]
    plans_file = brats_dataset["preprocessed"] / "nnUNetPlans.json"
    teachers, _ = make_frozen_teachers(str(root), json.loads(plans_file.read_text()), dataset_json, "3d_fullres",
                                       "unimodal", (0, 1, 2))
    # Batches for all trainers (same plans, all four channels), different on each rank.
    stock = load_trainer(brats_dataset, nnUNetTrainer)
    batches = [[synthetic_batch(stock, batch_size=1, seed=100 * step + rank) for step in range(STEPS)]
               for rank in range(2)]
    return {"plans": str(plans_file), "batches": batches, "dataset_json": str(brats_dataset["preprocessed"] / "dataset.json"),
            "env": {"nnUNet_preprocessed": str(brats_dataset["root"] / "preprocessed"),
                    "nnUNet_results": str(root / "results"), "nnUNet_compile": "0", "OMP_NUM_THREADS": "1",
                    "nnUNet_kd_teachers": os.pathsep.join(teachers)}}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("trainer_name", list(TRAINERS))
def test_ranks_hold_identical_weights_after_train_steps(ddp_setup, trainer_name):
    results = mp.Manager().dict()
    try:
        mp.spawn(_worker, args=(_free_port(), trainer_name, ddp_setup, results), nprocs=2, join=True)
    except Exception as e:
        errors = "\n".join(r["error"] for r in results.values() if "error" in r)
        pytest.fail(f"{trainer_name} failed under DDP: {e}\n{errors}")
    r0, r1 = results[0], results[1]
    assert r0["after"].keys() == r1["after"].keys()
    differing = [k for k in r0["after"] if r0["after"][k] != r1["after"][k]]
    assert not differing, f"weights differ across ranks: {differing[:10]}"
    # the ranks saw different data, and the networks did train
    assert r0["losses"] != r1["losses"]
    changed = {k.split(".")[0] for k in r0["after"] if r0["after"][k] != r0["before"][k]}
    assert "network" in changed
    if trainer_name.startswith("nnUNetTrainerMTCMKD"):
        assert "cdsfl" in changed
        frozen = trainer_name.endswith("FrozenTeachers")
        assert any(name.startswith("teachers") for name in changed) != frozen
        # gradient shares are reduced over the ranks: both report the same numbers
        assert r0["last_history"]["gradient_share"] == r1["last_history"]["gradient_share"]
        assert r0["last_history"]["gradient_share"]["response_kd"] > 0
    if trainer_name == "nnUNetTrainerMGSD":
        assert {"ema_network", "aux_modules"} <= changed
        # the logged loss-term means and gradient shares are taken over both ranks' steps
        assert r0["last_history"]["loss_terms"] == r1["last_history"]["loss_terms"]
        assert r0["last_history"]["gradient_share"] == r1["last_history"]["gradient_share"]
        assert r0["last_history"]["loss_terms"]["modality"] > 0
