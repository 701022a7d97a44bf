"""MTCM-KD trainers in this process: channels by name, losses, gradients, variants, both output kinds."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nnunet_kd.training.features import unwrap_network
from nnunet_kd.trainers.nnUNetTrainerMTCMKD import (nnUNetTrainerMTCMKD, nnUNetTrainerMTCMKD_AllLevels,
                                                    nnUNetTrainerMTCMKD_FrozenTeachers, nnUNetTrainerMTCMKD_KDFromStart,
                                                    nnUNetTrainerMTCMKD_MultimodalTeacher, nnUNetTrainerMTCMKD_StrongKD,
                                                    nnUNetTrainerMTCMKD_T1, nnUNetTrainerMTCMKD_VoxelMeanT1)


def first_conv_in_channels(network) -> int:
    return unwrap_network(network).encoder.stages[0][0].convs[0].conv.in_channels


def label_training_json(dataset_json: dict) -> dict:
    """The same dataset declared for plain label (softmax) training instead of regions."""
    ds = copy.deepcopy(dataset_json)
    ds["labels"] = {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}
    ds.pop("regions_class_order", None)
    return ds


@pytest.fixture(scope="module")
def trainer(brats_dataset, load_trainer):
    return load_trainer(brats_dataset, nnUNetTrainerMTCMKD)


def test_student_and_teachers_see_their_channels(trainer):
    assert trainer.student_channels == [1]
    assert trainer.teacher_channels == [[0], [2], [3]]
    assert first_conv_in_channels(trainer.network) == 1
    assert [first_conv_in_channels(t) for t in trainer.teachers] == [1, 1, 1]
    assert trainer.student_dataset_json["channel_names"] == {"0": "T1ce"}


def test_channels_found_by_name_with_aliases(brats_dataset):
    ds = copy.deepcopy(brats_dataset["dataset_json"])
    ds["channel_names"] = {"0": "flair", "1": "t1c", "2": "t1n", "3": "t2w"}
    t = nnUNetTrainerMTCMKD.__new__(nnUNetTrainerMTCMKD)
    from nnunet_kd.brats import channel_indices
    assert channel_indices(ds["channel_names"], [t.student_modality]) == [1]
    assert [channel_indices(ds["channel_names"], m) for m in t.teacher_modalities] == [[2], [3], [0]]


def test_dataset_without_student_modality_is_a_clear_error(brats_dataset, load_trainer):
    ds = copy.deepcopy(brats_dataset["dataset_json"])
    ds["channel_names"] = {"0": "T1", "1": "T2", "2": "FLAIR", "3": "T2"}
    with pytest.raises(ValueError, match="T1ce"):
        load_trainer(brats_dataset, nnUNetTrainerMTCMKD, dataset_json=ds)


def _losses(trainer, batch, epoch):
    trainer.current_epoch = epoch
    data, target = batch["data"], batch["target"]
    outputs, fused = trainer._teacher_forward(data)
    teacher_loss = trainer._teacher_loss(outputs, fused, target)
    student_out = trainer.network(data[:, trainer.student_channels])
    return outputs, fused, teacher_loss, student_out, trainer._student_loss(student_out, outputs, fused, target)


def _reference_terms(trainer, batch, outputs, fused, student_out) -> dict:
    """The student-loss terms of METHODS.md, computed one by one."""
    target = batch["target"]
    return {"seg": trainer.loss(student_out, target), "ds_seg": trainer.loss.loss(student_out[1], target[1]),
            "kd": sum(w * trainer._kd(student_out[0], o[0])
                      for w, o in zip(trainer.performance_weights.tolist(), outputs)),
            "ds_kd": trainer._kd(student_out[1], fused[1])}


def test_student_loss_before_and_after_kd_start(trainer, synthetic_batch):
    batch = synthetic_batch(trainer)
    with torch.no_grad():
        outputs, fused, _, student_out, loss_epoch0 = _losses(trainer, batch, 0)
        t = _reference_terms(trainer, batch, outputs, fused, student_out)
        # Before KD starts: nnU-Net's deep-supervised loss at weight 1.0, as in the reference.
        assert torch.equal(loss_epoch0, t["seg"])
        _, _, _, _, loss_epoch1 = _losses(trainer, batch, 1)
        assert t["kd"] > 0 and t["ds_kd"] > 0
        assert torch.isclose(loss_epoch1, 0.75 * t["seg"] + 0.10 * 0.7 * t["ds_seg"] + t["kd"]
                             + 0.10 * 0.3 * t["ds_kd"], rtol=1e-5)
    trainer.current_epoch = 0


@pytest.mark.parametrize("cls, kd_scale", [(nnUNetTrainerMTCMKD_KDFromStart, None),
                                           (nnUNetTrainerMTCMKD_StrongKD, 20.0)])
def test_kd_variants_distil_from_epoch_0(trainer, brats_dataset, cls, kd_scale, load_trainer, synthetic_batch):
    variant = load_trainer(brats_dataset, cls)
    batch = synthetic_batch(variant)
    with torch.no_grad():
        outputs, fused, _, student_out, loss_epoch0 = _losses(variant, batch, 0)
        t = _reference_terms(variant, batch, outputs, fused, student_out)
        assert t["kd"] > 0
        assert torch.isclose(loss_epoch0, 0.75 * t["seg"] + t["kd"] + 0.10 * (0.7 * t["ds_seg"] + 0.3 * t["ds_kd"]),
                             rtol=1e-5)
        # KDFromStart keeps the default KD; StrongKD is _VoxelMeanT1's KD (T = 20, times T) times T.
        reference = trainer if kd_scale is None else load_trainer(brats_dataset, nnUNetTrainerMTCMKD_VoxelMeanT1)
        reference_kd = reference._kd(student_out[0], outputs[0][0])
        assert torch.isclose(variant._kd(student_out[0], outputs[0][0]), (kd_scale or 1.0) * reference_kd, rtol=1e-4)
    variant.current_epoch = 0


def test_gradients_reach_student_every_teacher_and_cdsfl_separately(trainer, synthetic_batch):
    batch = synthetic_batch(trainer)
    outputs, fused, teacher_loss, student_out, student_loss = _losses(trainer, batch, 1)
    modules = {"student": trainer.network, "cdsfl": trainer.cdsfl,
               **{f"teacher{i}": t for i, t in enumerate(trainer.teachers)}}
    for m in modules.values():
        m.zero_grad(set_to_none=True)
    student_loss.backward(retain_graph=True)
    # Teacher logits and the fused output enter the student loss detached.
    assert all(p.grad is None for name, m in modules.items() if name != "student" for p in m.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.network.parameters())
    trainer.network.zero_grad(set_to_none=True)
    teacher_loss.backward()
    assert all(p.grad is None for p in trainer.network.parameters())
    for name, m in modules.items():
        if name != "student":
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters()), name
    trainer.current_epoch = 0


def test_train_step_updates_all_networks_and_tracks_teacher_dice(trainer, synthetic_batch):
    before = {name: [p.detach().clone() for p in m.parameters()] for name, m in
              [("student", trainer.network), ("cdsfl", trainer.cdsfl)] +
              [(f"t{i}", t) for i, t in enumerate(trainer.teachers)]}
    trainer.performance_tracker.reset()
    trainer.on_train_epoch_start()
    out = trainer.train_step(synthetic_batch(trainer, seed=1))
    assert np.isfinite(out["loss"]) and np.isfinite(out["teacher_loss"])
    after = {"student": trainer.network, "cdsfl": trainer.cdsfl, **{f"t{i}": t for i, t in enumerate(trainer.teachers)}}
    for name, params in before.items():
        assert any(not torch.equal(a, b.detach()) for a, b in zip(params, after[name].parameters())), name
    assert trainer.performance_tracker.stats.sum() > 0
    trainer.on_train_epoch_end([out])
    assert torch.isclose(trainer.performance_weights.sum(), torch.tensor(trainer.kd_total_weight, dtype=torch.float64))
    assert trainer.kd_history[-1]["next_kd_weights"] == pytest.approx(trainer.performance_weights.tolist())


def test_validation_reports_student_teachers_and_cdsfl(trainer, synthetic_batch):
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        result = trainer.validation_step(synthetic_batch(trainer, seed=2))
    assert {"tp_hard", "teacher0_stats", "teacher1_stats", "teacher2_stats", "cdsfl1_stats"} <= set(result)
    assert result["teacher0_stats"].shape == (3, 3)


def test_label_training_softmax_path(brats_dataset, load_trainer, synthetic_batch):
    trainer = load_trainer(brats_dataset, nnUNetTrainerMTCMKD, dataset_json=label_training_json(
        brats_dataset["dataset_json"]))
    assert not trainer.label_manager.has_regions
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    out = trainer.train_step(synthetic_batch(trainer))
    assert np.isfinite(out["loss"])
    assert trainer.performance_tracker.stats.sum() > 0
    with torch.no_grad():
        result = trainer.validation_step(synthetic_batch(trainer, seed=3))
    assert result["teacher0_stats"].shape == (3, 3)  # background excluded, 3 tumour labels


@pytest.mark.parametrize("cls, student, teachers, levels", [
    (nnUNetTrainerMTCMKD_T1, [0], [[1], [2], [3]], (1,)),
    (nnUNetTrainerMTCMKD_MultimodalTeacher, [1], [[0, 1, 2, 3]], (1,)),
    (nnUNetTrainerMTCMKD_AllLevels, [1], [[0], [2], [3]], None),
])
def test_variants_train(brats_dataset, cls, student, teachers, levels, load_trainer, synthetic_batch):
    trainer = load_trainer(brats_dataset, cls)
    assert trainer.student_channels == student and trainer.teacher_channels == teachers
    assert [first_conv_in_channels(t) for t in trainer.teachers] == [len(c) for c in teachers]
    num_levels = len(unwrap_network(trainer.network).decoder.stages)
    expected_levels = levels or tuple(range(1, num_levels))
    assert levels or len(expected_levels) >= 2
    assert trainer.cdsfl_levels == expected_levels
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    assert np.isfinite(trainer.train_step(synthetic_batch(trainer))["loss"])


def test_frozen_teachers_stay_frozen(brats_dataset, stock_model, monkeypatch, load_trainer, synthetic_batch):
    monkeypatch.setenv("nnUNet_kd_teachers", str(stock_model))
    trainer = load_trainer(brats_dataset, nnUNetTrainerMTCMKD_FrozenTeachers)
    assert trainer.teacher_modalities == (("T1", "T1ce", "T2", "FLAIR"),)
    stock = torch.load(stock_model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    teacher = trainer.teachers[0]
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, stock["network_weights"][k]), k
    student_before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    trainer.train_step(synthetic_batch(trainer))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, stock["network_weights"][k]), k
    assert any(not torch.equal(a, b) for a, b in zip(student_before, trainer.network.parameters()))


def test_frozen_teachers_need_a_model(brats_dataset, monkeypatch, tmp_path, load_trainer):
    monkeypatch.delenv("nnUNet_kd_teachers", raising=False)
    with pytest.raises(ValueError, match="nnUNet_kd_teachers"):
        load_trainer(brats_dataset, nnUNetTrainerMTCMKD_FrozenTeachers)
    monkeypatch.setenv("nnUNet_kd_teachers", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="nowhere"):
        load_trainer(brats_dataset, nnUNetTrainerMTCMKD_FrozenTeachers)
