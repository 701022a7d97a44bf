"""The real trainers under DDP (2 gloo processes on the CPU) at nnU-Net's defaults, over several steps across
an epoch boundary (two full epochs: training steps, validation, epoch end).

- ``compiled``: the CUDA default. nnU-Net compiles its network (forced here, with the aot_eager backend) and
  gives the lowest deep-supervision level loss weight 0, so the heads of that level get no gradient in any
  network that runs eagerly; compiled networks give every parameter one, zeros included.
- ``eager``: ``nnUNet_compile=0``. nnU-Net then gives the lowest level a weight of 1e-6 instead; every trainer
  must use exactly that weight and train.

After the steps, on different data per rank, every module of the trainer (student, teachers, CDSFL, EMA,
auxiliary heads) must hold the same weights on both ranks.
"""
from __future__ import annotations

import datetime
import hashlib
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

#: trainer class name -> module. Epochs 0 and 1: MTCM-KD's KD starts in epoch 1.
TRAINERS = {
    "nnUNetTrainerMTCMKD": "nnunet_kd.trainers.nnUNetTrainerMTCMKD",
    "nnUNetTrainerMTCMKD_FrozenTeachers": "nnunet_kd.trainers.nnUNetTrainerMTCMKD_variants",
    "nnUNetTrainerMTCMKD_MultimodalTeacher": "nnunet_kd.trainers.nnUNetTrainerMTCMKD_variants",
    "nnUNetTrainerMTCMKD_PaperWeights": "nnunet_kd.trainers.nnUNetTrainerMTCMKD_variants",  # training-Dice tracker
    "nnUNetTrainerMTCMKD_AllLevels": "nnunet_kd.trainers.nnUNetTrainerMTCMKD_variants",  # CDSFL on several levels
    "nnUNetTrainerMGSD_adv": "nnunet_kd.trainers.nnUNetTrainerMGSD_variants",  # discriminator among the heads
    "nnUNetTrainerMGSD": "nnunet_kd.trainers.nnUNetTrainerMGSD",
    "nnUNetTrainerModalityDropout": "nnunet_kd.trainers.nnUNetTrainerMGSD",
}
EPOCHS, STEPS = 2, 2
MODES = ("compiled", "eager")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stock_weights(num_levels: int, lowest: float) -> np.ndarray:
    """nnU-Net's deep-supervision weights: 1/2^i, the lowest level ``lowest`` (0 compiled, 1e-6 under DDP
    without compilation), normalised to sum 1."""
    weights = np.array([1 / 2 ** i for i in range(num_levels)])
    weights[-1] = lowest
    return weights / weights.sum()


def _patch_nnunet_for_cpu_ddp(mode: str) -> None:
    """Let this process's nnU-Net build DDP trainers on the CPU; in ``compiled`` mode, compile as on CUDA.

    nnU-Net wraps its network in DDP with CUDA device ids; on the CPU DDP takes none. Nothing else changes:
    the plugin's own DDP wrappers are what this test checks.
    """
    import functools

    import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as base

    def ddp_on_cpu(module, device_ids=None, **kwargs):
        return DistributedDataParallel(module, **kwargs)

    base.DDP = ddp_on_cpu
    if mode == "compiled":
        base.nnUNetTrainer._do_i_compile = lambda self: True
        torch.compile = functools.partial(torch.compile, backend="aot_eager")


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


def _train(rank: int, trainer_name: str, mode: str, setup: dict) -> dict:
    import importlib

    from batchgenerators.utilities.file_and_folder_operations import load_json

    _patch_nnunet_for_cpu_ddp(mode)
    cls = getattr(importlib.import_module(TRAINERS[trainer_name]), trainer_name)
    plans = load_json(setup["plans"])
    plans["continue_training"] = False
    trainer = cls(plans=plans, configuration="3d_fullres", fold=0, dataset_json=load_json(setup["dataset_json"]),
                  device=torch.device("cpu"))
    assert trainer.is_ddp
    trainer.device, trainer.grad_scaler = torch.device("cpu"), None  # nnU-Net assumes that DDP means CUDA
    trainer.initialize()
    expected = stock_weights(len(trainer.loss.weight_factors), 0.0 if mode == "compiled" else 1e-6)
    np.testing.assert_allclose(trainer.loss.weight_factors, expected, rtol=1e-12, atol=0)
    before = _digests(_modules(trainer))
    losses = []
    for epoch in range(EPOCHS):
        trainer.current_epoch = epoch
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = [trainer.train_step(batch) for batch in setup["batches"][rank][epoch]]
        trainer.on_train_epoch_end(outputs)
        losses += [float(o["loss"]) for o in outputs]
        trainer.on_validation_epoch_start()
        trainer.on_validation_epoch_end([trainer.validation_step(setup["batches"][rank][0][0])])
        trainer.on_epoch_end()
    after = _digests(_modules(trainer))
    history = getattr(trainer, "distillation_log", None)  # the KD trainers; none for modality dropout
    return {"before": before, "after": after, "losses": losses, "last_history": history[-1] if history else None}


def _worker(rank: int, port: int, trainer_name: str, mode: str, setup: dict, results) -> None:
    os.environ.update(setup["env"])
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=120))
    try:
        results[rank] = _train(rank, trainer_name, mode, setup)
    except BaseException:
        results[rank] = {"error": traceback.format_exc()}
        raise
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_setup(brats_dataset, small_plans, tmp_path_factory, load_trainer, synthetic_batch) -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_kd.experiments.benchmark.measure import make_frozen_teachers

    root = tmp_path_factory.mktemp("ddp")
    teachers, _ = make_frozen_teachers(str(root), small_plans["plans"], brats_dataset["dataset_json"], "3d_fullres",
                                       "unimodal", (0, 1, 2))
    # Batches for all trainers (same plans, all four channels): per rank, epoch and step, different on each rank.
    stock = load_trainer(brats_dataset, nnUNetTrainer, plans=small_plans["name"])
    batches = [[[synthetic_batch(stock, batch_size=1, seed=1000 * rank + 100 * epoch + step) for step in range(STEPS)]
                for epoch in range(EPOCHS)] for rank in range(2)]
    return {"plans": str(small_plans["file"]), "batches": batches,
            "dataset_json": str(brats_dataset["preprocessed"] / "dataset.json"),
            "env": {"nnUNet_preprocessed": str(brats_dataset["root"] / "preprocessed"),
                    "nnUNet_results": str(root / "results"), "nnUNet_compile": "0", "OMP_NUM_THREADS": "1",
                    "nnUNet_kd_teachers": os.pathsep.join(teachers)}}


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("trainer_name", list(TRAINERS))
def test_ranks_hold_identical_weights_after_two_epochs(ddp_setup, trainer_name, mode):
    results = mp.Manager().dict()
    try:
        mp.spawn(_worker, args=(_free_port(), trainer_name, mode, ddp_setup, results), nprocs=2, join=True)
    except Exception as e:
        errors = "\n".join(r["error"] for r in results.values() if "error" in r)
        pytest.fail(f"{trainer_name} failed under DDP ({mode}): {e}\n{errors}")
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
        # the region weights come from validation counts summed over the ranks: identical on both
        assert r0["last_history"]["kd_weights"] == r1["last_history"]["kd_weights"]
        assert r0["last_history"]["next_kd_weights"] == r1["last_history"]["next_kd_weights"]
    if trainer_name == "nnUNetTrainerMGSD":
        assert {"ema_network", "aux_modules"} <= changed
        # the logged loss-term means and gradient shares are taken over both ranks' steps
        assert r0["last_history"]["loss_terms"] == r1["last_history"]["loss_terms"]
        assert r0["last_history"]["gradient_share"] == r1["last_history"]["gradient_share"]
        assert r0["last_history"]["loss_terms"]["modality"] > 0
