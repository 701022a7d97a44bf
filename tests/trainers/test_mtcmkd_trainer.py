"""MTCM-KD trainers in this process: channels by name, losses, gradients, variants, both output kinds."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from nnunet_kd.losses import cdsfl_seg_loss
from nnunet_kd.training.features import unwrap_network
from nnunet_kd.training.performance import RegionPerformance
from nnunet_kd.trainers.nnUNetTrainerMTCMKD import nnUNetTrainerMTCMKD
from nnunet_kd.trainers.nnUNetTrainerMTCMKD_variants import (nnUNetTrainerMTCMKD_AllLevels,
                                                             nnUNetTrainerMTCMKD_FrozenTeachers,
                                                             nnUNetTrainerMTCMKD_FrozenTeachers_WarmStart,
                                                             nnUNetTrainerMTCMKD_KDFromStart,
                                                             nnUNetTrainerMTCMKD_MultimodalTeacher,
                                                             nnUNetTrainerMTCMKD_PaperWeights,
                                                             nnUNetTrainerMTCMKD_StrongKD, nnUNetTrainerMTCMKD_T1,
                                                             nnUNetTrainerMTCMKD_VoxelMeanT1)


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
    outputs, fused, from_detached = trainer._teacher_forward(data, detached_fusion=True)
    teacher_loss = trainer._teacher_loss(outputs, fused, target, from_detached)
    student_out = trainer.network(data[:, trainer.student_channels])
    student_loss = sum(trainer._student_terms(student_out, outputs, fused, target).values())
    return outputs, fused, teacher_loss, student_out, student_loss


def _reference_terms(trainer, batch, outputs, fused, student_out) -> dict:
    """The student-loss terms of METHODS.md, computed one by one (the paper's one weight per teacher)."""
    target = batch["target"]
    return {"seg": trainer.loss(student_out, target), "ds_seg": trainer.loss.loss(student_out[1], target[1]),
            "kd": sum(w * trainer._kd(student_out[0], o[0])
                      for w, o in zip(trainer.performance_weights.tolist(), outputs)),
            "ds_kd": trainer._kd(student_out[1], fused[1])}


#: Known per-teacher, per-region (WT, TC, ET) weights and CDSFL factors for the default's student-loss test.
KNOWN_WEIGHTS = torch.tensor([[0.1, 0.0, 0.05], [0.0, 0.0, 0.0], [0.02, 0.03, 0.0]], dtype=torch.float64)
KNOWN_CDSFL = torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.float64)


def test_default_student_loss_supervised_at_1_and_region_kd_ramped(trainer, synthetic_batch):
    batch = synthetic_batch(trainer)
    target = batch["target"]
    saved = trainer.kd_region_weights, trainer.cdsfl_region_weights
    trainer.kd_region_weights, trainer.cdsfl_region_weights = KNOWN_WEIGHTS.clone(), KNOWN_CDSFL.clone()
    try:
        with torch.no_grad():
            outputs, fused, _, student_out, loss_epoch0 = _losses(trainer, batch, 0)
            seg = trainer.loss(student_out, target)
            assert torch.equal(loss_epoch0, seg)  # before KD starts: nnU-Net's loss alone
            kd = sum(trainer._kd(student_out[0], o[0], w) for w, o in zip(KNOWN_WEIGHTS, outputs))
            ds_kd = trainer._kd(student_out[1], fused[1], KNOWN_CDSFL[0])
            assert kd > 0 and ds_kd > 0
            # the second teacher (weight 0 everywhere) does not distil at all
            assert torch.isclose(kd, sum(trainer._kd(student_out[0], outputs[i][0], KNOWN_WEIGHTS[i]) for i in (0, 2)))
            for epoch, ramp in [(1, 0.1), (5, 0.5), (10, 1.0), (40, 1.0)]:
                trainer.current_epoch = epoch
                terms = trainer._student_terms(student_out, outputs, fused, target)
                assert torch.equal(terms["supervised"], seg)  # supervised weight 1.0 at every epoch
                assert torch.isclose(terms["response_kd"], ramp * kd, rtol=1e-5)
                assert torch.isclose(terms["cdsfl_kd"], ramp * 0.10 * 0.3 * ds_kd, rtol=1e-5)
    finally:
        trainer.kd_region_weights, trainer.cdsfl_region_weights = saved
        trainer.current_epoch = 0


def test_default_kd_is_off_until_the_first_validation(trainer, synthetic_batch):
    fresh = trainer.region_performance
    trainer.region_performance = RegionPerformance()
    trainer._update_weights_after_validation()
    try:
        assert trainer.kd_region_weights.abs().sum() == 0 and trainer.cdsfl_region_weights.abs().sum() == 0
        batch = synthetic_batch(trainer)
        with torch.no_grad():
            outputs, fused, _, student_out, loss = _losses(trainer, batch, 1)
            assert torch.equal(loss, trainer.loss(student_out, batch["target"]))
    finally:
        trainer.region_performance = fresh
        trainer._update_weights_after_validation()
        trainer.current_epoch = 0


def test_paper_weights_student_loss_before_and_after_kd_start(brats_dataset, load_trainer, synthetic_batch):
    trainer = load_trainer(brats_dataset, nnUNetTrainerMTCMKD_PaperWeights)
    batch = synthetic_batch(trainer)
    assert trainer.performance_weights.tolist() == pytest.approx([0.5 / 3] * 3)
    with torch.no_grad():
        outputs, fused, _, student_out, loss_epoch0 = _losses(trainer, batch, 0)
        t = _reference_terms(trainer, batch, outputs, fused, student_out)
        # Before KD starts: nnU-Net's deep-supervised loss at weight 1.0, as in the reference.
        assert torch.equal(loss_epoch0, t["seg"])
        _, _, _, _, loss_epoch1 = _losses(trainer, batch, 1)
        assert t["kd"] > 0 and t["ds_kd"] > 0
        assert torch.isclose(loss_epoch1, 0.75 * t["seg"] + 0.10 * 0.7 * t["ds_seg"] + t["kd"]
                             + 0.10 * 0.3 * t["ds_kd"], rtol=1e-5)
    # one weight per teacher from the training-batch WT Dice, summing to kd_total_weight
    trainer.performance_tracker.reset()
    for i, stats in enumerate([[4.0, 1.0, 1.0], [2.0, 3.0, 3.0], [0.0, 5.0, 5.0]]):
        trainer.performance_tracker.update(i, stats)
    trainer._update_weights_after_training()
    assert trainer.performance_weights.tolist() == pytest.approx([0.5 * 0.8 / 1.2, 0.5 * 0.4 / 1.2, 0.0])
    assert trainer._kd_weight_record()["T1"] == pytest.approx(0.5 * 0.8 / 1.2)


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


def test_cdsfl_head_learns_at_full_weight_and_teachers_get_only_0_08_of_its_loss(trainer, synthetic_batch):
    batch = synthetic_batch(trainer, seed=4)
    data, target = batch["data"], batch["target"]
    head = list(trainer.cdsfl.parameters())
    teachers = [p for t in trainer.teachers for p in t.parameters()]

    def grads(loss, params):
        return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)

    outputs, fused, from_detached = trainer._teacher_forward(data, detached_fusion=True)
    assert from_detached is not None and torch.allclose(fused[1], from_detached[1])
    loss = trainer._teacher_loss(outputs, fused, target, from_detached)
    got_head, got_teachers = grads(loss, head), grads(loss, teachers)
    # references from one ordinary (non-detached) pass: head at 1.0 x its loss, teachers at their own + 0.08 x it
    ref_outputs, ref_fused, none = trainer._teacher_forward(data)
    assert none is None
    cdsfl_loss = cdsfl_seg_loss(trainer.loss.loss, ref_fused, target, 1.0)
    ref_head = grads(cdsfl_loss, head)
    ref_teachers = grads(sum(trainer.loss(o, target) for o in ref_outputs) + 0.08 * cdsfl_loss, teachers)
    for g, r in zip(got_head, ref_head):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    for g, r in zip(got_teachers, ref_teachers):
        if r is None:
            assert g is None or g.abs().sum() == 0
        else:
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-7)
    assert any(g is not None and g.abs().sum() > 0 for g in got_head)


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
    assert trainer.distillation_log[-1]["next_kd_weights"] == trainer._kd_weight_record(ramp=1.0)
    assert set(trainer.distillation_log[-1]["next_kd_weights"]) == {"T1", "T2", "FLAIR", "cdsfl1"}


def test_validation_reports_student_teachers_and_cdsfl(trainer, synthetic_batch):
    trainer.on_validation_epoch_start()
    with torch.no_grad():
        result = trainer.validation_step(synthetic_batch(trainer, seed=2))
    assert {"tp_hard", "student_stats", "teacher0_stats", "teacher1_stats", "teacher2_stats", "cdsfl1_stats"} <= set(result)
    assert result["teacher0_stats"].shape == (3, 3)
    assert np.array_equal(result["student_stats"], np.stack([result["tp_hard"], result["fp_hard"], result["fn_hard"]]))


def _val_output(**dice_counts) -> dict:
    """A validation step's output whose counts per source are (tp, fp, fn) per region."""
    out = {f"{name}_stats": np.array(counts, dtype=np.float64).T for name, counts in dice_counts.items()}
    tp, fp, fn = out["student_stats"]
    return {**out, "loss": np.float32(0.5), "tp_hard": tp, "fp_hard": fp, "fn_hard": fn}


def test_validation_sets_next_weights_by_the_rule_and_checkpoint_restores_them(trainer):
    saved = trainer.region_performance, trainer.kd_region_weights, trainer.cdsfl_region_weights
    trainer.region_performance = RegionPerformance(trainer.kd_dice_momentum)
    try:
        # the next epoch of nnU-Net's logger (its EMA pseudo Dice reads the previous epoch's value)
        trainer.current_epoch = len(trainer.logger.local_logger.my_fantastic_logging["mean_fg_dice"])
        # student Dice 0.8 on WT, TC, ET; T1 better on WT and TC (0.9), worse on ET; T2 equal; FLAIR +0.02 on WT
        student = [(4, 1, 1)] * 3
        trainer.on_validation_epoch_end([_val_output(
            student=student, teacher0=[(9, 1, 1), (9, 1, 1), (1, 1, 1)], teacher1=student,
            teacher2=[(41, 9, 9), (4, 1, 1), (0, 1, 1)], cdsfl1=[(0, 1, 1), (9, 1, 1), (4, 1, 1)])])
        m = 0.5 / 3
        expected = torch.tensor([[m, m, 0.0], [0.0, 0.0, 0.0], [m * 0.4, 0.0, 0.0]],
                                dtype=torch.float64)
        assert torch.allclose(trainer.kd_region_weights, expected)
        assert torch.allclose(trainer.cdsfl_region_weights, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
        assert trainer.region_performance.ema["student"].tolist() == pytest.approx([0.8] * 3)
        state = copy.deepcopy(trainer.checkpoint_state())
        # --c: a fresh state is overwritten by the checkpoint's weights and moving averages
        trainer.region_performance = RegionPerformance()
        trainer.kd_region_weights = torch.zeros_like(expected)
        trainer.cdsfl_region_weights = torch.zeros(1, 3, dtype=torch.float64)
        trainer.load_checkpoint_state(state)
        assert torch.allclose(trainer.kd_region_weights, expected)
        assert torch.allclose(trainer.cdsfl_region_weights, torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64))
        assert trainer.region_performance.ema.keys() == {"student", "teacher0", "teacher1", "teacher2", "cdsfl1"}
        assert trainer.region_performance.ema["teacher0"].tolist() == pytest.approx([0.9, 0.9, 0.5])
        # the next validation smooths: EMA 0.9 x 0.8 + 0.1 x 1.0 = 0.82 for the student's WT
        trainer.current_epoch += 1
        trainer.on_validation_epoch_end([_val_output(
            student=[(1, 0, 0), (4, 1, 1), (4, 1, 1)], teacher0=[(9, 1, 1), (9, 1, 1), (1, 1, 1)], teacher1=student,
            teacher2=[(41, 9, 9), (4, 1, 1), (0, 1, 1)], cdsfl1=[(0, 1, 1), (9, 1, 1), (4, 1, 1)])])
        assert trainer.region_performance.ema["student"].tolist() == pytest.approx([0.82, 0.8, 0.8])
        assert trainer.kd_region_weights[0, 0].item() == pytest.approx(m)  # T1 still leads by 0.08 >= the margin
        assert trainer.kd_region_weights[2, 0].item() == 0.0  # FLAIR's 0.82 is no longer ahead of the student
    finally:
        trainer.region_performance, trainer.kd_region_weights, trainer.cdsfl_region_weights = saved
        trainer.current_epoch = 0


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
    assert result["student_stats"].shape == (3, 3)
    trainer.on_validation_epoch_end([result])
    # per-class weights: one column per output (background and the 3 labels); the background's is always 0
    assert trainer.kd_region_weights.shape == (3, 4) and (trainer.kd_region_weights[:, 0] == 0).all()
    assert trainer._region_names() == ["background", "edema", "necrosis", "enhancing"]
    channel_weights = torch.tensor([0.0, 0.1, 0.0, 0.2], dtype=torch.float64)
    trainer.kd_region_weights = channel_weights.expand(3, 4).clone()
    trainer.current_epoch = trainer.kd_start_epoch + trainer.kd_rampup_epochs
    trainer.on_train_epoch_start()
    assert np.isfinite(trainer.train_step(synthetic_batch(trainer))["loss"])
    assert trainer.gradient_shares.summary()["share"]["response_kd"] > 0


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


def test_warm_start_student_starts_as_the_teacher_with_the_other_channels_at_zero(
        brats_dataset, stock_model, monkeypatch, load_trainer, synthetic_batch):
    monkeypatch.setenv("nnUNet_kd_teachers", str(stock_model))
    trainer = load_trainer(brats_dataset, nnUNetTrainerMTCMKD_FrozenTeachers_WarmStart)
    student, teacher = unwrap_network(trainer.network), trainer.teachers[0]
    assert trainer.student_channels == [1] and trainer.teacher_channels == [[0, 1, 2, 3]]
    data = synthetic_batch(trainer)["data"]
    zeroed = torch.zeros_like(data)
    zeroed[:, 1] = data[:, 1]
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(student(data[:, [1]])[0], teacher(zeroed), rtol=1e-4, atol=1e-4)
    trainer.current_epoch = 1
    trainer.on_train_epoch_start()
    assert np.isfinite(trainer.train_step(synthetic_batch(trainer))["loss"])


def test_frozen_teachers_need_a_model(brats_dataset, monkeypatch, tmp_path, load_trainer):
    monkeypatch.delenv("nnUNet_kd_teachers", raising=False)
    with pytest.raises(ValueError, match="nnUNet_kd_teachers"):
        load_trainer(brats_dataset, nnUNetTrainerMTCMKD_FrozenTeachers)
    monkeypatch.setenv("nnUNet_kd_teachers", str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="nowhere"):
        load_trainer(brats_dataset, nnUNetTrainerMTCMKD_FrozenTeachers)
