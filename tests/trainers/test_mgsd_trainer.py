"""MGSD trainers in this process and through nnUNetv2_train: masking, EMA, loss terms, variants, resume."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import nnunet_kd.trainers.nnUNetTrainerMGSD as mgsd_module
from nnunet_kd.losses import image_kd_loss
from nnunet_kd.training.budget import budget_environment
from nnunet_kd.training.ema import warmed_up_momentum
from nnunet_kd.training.features import unwrap_network
from nnunet_kd.trainers.nnUNetTrainerMGSD import nnUNetTrainerMGSD, nnUNetTrainerModalityDropout
from nnunet_kd.trainers.nnUNetTrainerMGSD_variants import (nnUNetTrainerMGSD_adv, nnUNetTrainerMGSD_ImageKDBothPasses,
                                                           nnUNetTrainerMGSD_LightModalityKD,
                                                           nnUNetTrainerMGSD_ModalityKD)


@pytest.fixture(scope="module")
def trainer(brats_dataset, load_trainer):
    t = load_trainer(brats_dataset, nnUNetTrainerMGSD)
    t.on_train_epoch_start()
    return t


def test_two_pass_inputs_mask_each_sample(trainer, synthetic_batch):
    data = synthetic_batch(trainer, batch_size=4)["data"]
    torch.manual_seed(0)
    mask, stacked = trainer._two_pass_inputs(data)
    assert mask.shape == (4, 4) and mask.any(1).all() and not mask.all(1).any()
    assert torch.equal(stacked[:4], data)
    for b in range(4):
        for m, channel in enumerate(trainer.modality_channels):
            expected = data[b, channel] if mask[b, m] else torch.zeros_like(data[b, channel])
            assert torch.equal(stacked[4 + b, channel], expected)


def test_stacked_forward_equals_two_passes(trainer, synthetic_batch):
    """The full and masked samples share one forward: instance norm keeps them independent."""
    data = synthetic_batch(trainer)["data"]
    _, stacked = trainer._two_pass_inputs(data)
    net = unwrap_network(trainer.network)
    with torch.no_grad():
        full, masked = trainer._split(net(stacked))
        assert torch.allclose(full[0], net(data)[0], atol=1e-4)
        assert torch.allclose(masked[0], net(stacked[2:])[0], atol=1e-4)
    # both passes give every deep-supervision level, shaped like the targets of that level
    targets = synthetic_batch(trainer)["target"]
    assert len(full) == len(masked) == len(targets)
    for f, m, t in zip(full, masked, targets):
        assert f.shape == m.shape == (2, trainer.label_manager.num_segmentation_heads, *t.shape[2:])
    assert not torch.allclose(full[0], masked[0])  # the masked pass saw less


def test_train_step_updates_ema_by_its_formula(trainer, synthetic_batch):
    net = unwrap_network(trainer.network)
    trainer.train_step(synthetic_batch(trainer, seed=5))  # past step 0, where the warm-up copies (momentum 0)
    ema_before = {k: v.clone() for k, v in trainer.ema_network.state_dict().items()}
    m = warmed_up_momentum(trainer.ema_step, trainer.ema_momentum)
    assert 0 < m < trainer.ema_momentum
    student_before = {k: v.detach().clone() for k, v in net.named_parameters()}
    out = trainer.train_step(synthetic_batch(trainer, seed=1))
    assert np.isfinite(out["loss"])
    for name, p in net.named_parameters():
        expected = ema_before[name] * m + p.detach() * (1 - m)
        assert torch.allclose(trainer.ema_network.state_dict()[name], expected, atol=1e-7), name
    assert set(trainer._term_sums) >= {"supervised", "image", "feature", "modality"}
    # the step moved the student, and the teacher followed only part of the way: it is a different network
    assert any(not torch.equal(student_before[k], p) for k, p in net.named_parameters())
    ema = trainer.ema_network.state_dict()
    assert any(not torch.allclose(ema[k], p.detach()) for k, p in net.named_parameters())
    assert all(not p.requires_grad for p in trainer.ema_network.parameters())


def test_defaults_of_issue_22():
    """The modality-level term is off by default (a logged probe) and kept in variants; the image-level term
    acts on the masked pass; the distillation weights ramp up over 10 epochs, capped at a 0.3 share."""
    assert nnUNetTrainerMGSD.modality_kd_weight == 0
    assert nnUNetTrainerMGSD_ModalityKD.modality_kd_weight == 50.0
    assert nnUNetTrainerMGSD_ModalityKD.modality_kd_target == "fixed"
    assert nnUNetTrainerMGSD.image_kd_passes == ("masked",)
    assert nnUNetTrainerMGSD_ImageKDBothPasses.image_kd_passes == ("full", "masked")
    assert nnUNetTrainerMGSD.distillation_rampup_epochs == 10 and nnUNetTrainerMGSD.max_distillation_share == 0.3


def _terms(trainer, batch):
    data = batch["data"]
    mask, stacked = trainer._two_pass_inputs(data)
    full_out, masked_out = trainer._split(trainer.network(stacked))
    return trainer._distillation_terms(data, stacked, mask, full_out, masked_out, trainer.tap.take())


def test_every_distillation_term_has_gradient(trainer, synthetic_batch):
    terms = _terms(trainer, synthetic_batch(trainer, seed=2))
    for name, value in terms.items():
        assert torch.isfinite(value) and value > 0, name
        trainer.network.zero_grad(set_to_none=True)
        trainer.aux_modules.zero_grad(set_to_none=True)
        value.backward(retain_graph=True)
        reaches_network = any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.network.parameters())
        # at weight 0 the modality-level term is a probe: it trains its heads, not the network
        assert reaches_network == (name != "modality"), name
        if name == "modality":
            assert any(p.grad is not None for p in trainer.mutual_attention.parameters())
    assert all(p.grad is None for p in trainer.ema_network.parameters())
    assert list(trainer.multiview.parameters()) == []  # the feature level has no learnable head


def test_modality_variant_term_reaches_the_network(brats_dataset, load_trainer, synthetic_batch):
    t = load_trainer(brats_dataset, nnUNetTrainerMGSD_ModalityKD)
    t.on_train_epoch_start()
    t.network.zero_grad(set_to_none=True)
    _terms(t, synthetic_batch(t, seed=2))["modality"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in t.network.parameters())


@pytest.mark.parametrize("passes", [("masked",), ("full", "masked")])
def test_image_kd_passes(trainer, synthetic_batch, monkeypatch, passes):
    monkeypatch.setattr(trainer, "image_kd_passes", passes)
    data = synthetic_batch(trainer, seed=6)["data"]
    torch.manual_seed(0)
    mask, stacked = trainer._two_pass_inputs(data)
    with torch.no_grad():
        full_out, masked_out = trainer._split(trainer.network(stacked))
        image = trainer._distillation_terms(data, stacked, mask, full_out, masked_out, trainer.tap.take())["image"]
        ema_out, _ = trainer._ema_forward(data)
        expected = image_kd_loss(masked_out, ema_out, trainer.loss.weight_factors, use_regions=True)
        if "full" in passes:
            expected = expected + image_kd_loss(full_out, ema_out, trainer.loss.weight_factors, use_regions=True)
    assert torch.allclose(image, expected, rtol=1e-5)


@pytest.mark.parametrize("cls, modality_weight", [(nnUNetTrainerMGSD, 0.0), (nnUNetTrainerMGSD_LightModalityKD, 5.0)])
@pytest.mark.parametrize("epoch, ramp", [(0, 0.0), (4, 0.4)])
def test_step_loss_is_the_weighted_sum_of_its_terms(brats_dataset, cls, modality_weight, epoch, ramp, load_trainer,
                                                    synthetic_batch):
    t = load_trainer(brats_dataset, cls)
    t.current_epoch = epoch
    t.on_train_epoch_start()
    assert t.distillation_ramp == pytest.approx(ramp)
    out = t.train_step(synthetic_batch(t, seed=4))
    terms = {k: float(v) for k, v in t._term_sums.items()}  # one step since the epoch started: this step's terms
    assert t._epoch_step == 1 and terms["modality"] > 0
    # the step's loss: supervised + cap factor x ramp x weighted distillation terms (the probe not included)
    scale = t.distillation_scale
    assert 0 < scale <= 1 and (scale == 1 or ramp > 0)
    expected = terms["supervised"] + scale * ramp * (10 / 3 * terms["image"] + 50 / 3 * terms["feature"]
                                                     + modality_weight * terms["modality"])
    assert float(out["loss"]) == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert t._network_max_norm() == pytest.approx(12.0 if ramp == 0 else 12.0 / 0.7)


def test_loss_finite_with_one_modality(trainer, monkeypatch, synthetic_batch):
    def one_modality(batch_size, num_modalities, generator=None, device=None):
        mask = torch.zeros(batch_size, num_modalities, dtype=torch.bool, device=device)
        mask[:, 1] = True
        return mask

    seen = []
    network_forward = trainer.network.forward
    monkeypatch.setattr(mgsd_module, "sample_modality_masks", one_modality)
    monkeypatch.setattr(trainer.network, "forward", lambda x: seen.append(x.detach().clone()) or network_forward(x))
    batch = synthetic_batch(trainer, seed=3)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    trainer.on_train_epoch_start()
    out = trainer.train_step(batch)
    assert np.isfinite(out["loss"])
    # the network saw the full batch and, stacked after it, the batch with every modality but T1ce zeroed
    (stacked,) = seen
    data, kept = batch["data"], trainer.modality_channels[1]
    assert torch.equal(stacked[:2], data) and torch.equal(stacked[2:, kept], data[:, kept])
    assert all((stacked[2:, c] == 0).all() for c in trainer.modality_channels if c != kept)
    assert all(np.isfinite(float(v)) for v in trainer._term_sums.values())
    assert float(trainer._term_sums["supervised"]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.network.parameters()))


def test_repeated_steps_on_one_batch_lower_the_supervised_loss(brats_dataset, load_trainer, synthetic_batch):
    """Learning, not just finite numbers: a few steps on one batch (same masks each time) fit it better."""
    t = load_trainer(brats_dataset, nnUNetTrainerMGSD)
    t.on_train_epoch_start()
    batch = synthetic_batch(t, seed=7)
    supervised = []
    for _ in range(4):
        torch.manual_seed(0)  # the same modality masks in every step
        t.train_step(batch)
        supervised.append(float(t._term_sums["supervised"]) - sum(supervised))  # this step's term
    assert supervised[-1] < supervised[0], supervised


def test_feature_levels_follow_the_plan(trainer):
    num_levels = len(unwrap_network(trainer.network).decoder.stages)
    assert trainer.feature_kd_levels == tuple(range(min(3, num_levels)))
    assert len(trainer.multiview.channels_per_stage) == len(trainer.feature_kd_levels)


@pytest.mark.parametrize("cls", [nnUNetTrainerModalityDropout, nnUNetTrainerMGSD_adv])
def test_variants_train(brats_dataset, cls, load_trainer, synthetic_batch):
    t = load_trainer(brats_dataset, cls)
    t.on_train_epoch_start()
    before = [p.detach().clone() for p in t.network.parameters()]
    heads_before = [p.detach().clone() for p in getattr(t, "discriminator", t.network).parameters()]
    assert np.isfinite(t.train_step(synthetic_batch(t))["loss"])
    assert any(not torch.equal(a, b) for a, b in zip(before, t.network.parameters()))
    if cls is nnUNetTrainerMGSD_adv:
        assert {"discriminator", "adversarial"} <= set(t._term_sums)
        assert float(t._term_sums["discriminator"]) > 0 and float(t._term_sums["adversarial"]) > 0
        # the discriminator learns from its own loss (it is not part of the network)
        assert any(not torch.equal(a, b) for a, b in zip(heads_before, t.discriminator.parameters()))
    else:  # the baseline has no teacher and no distillation terms
        assert not hasattr(t, "ema_network") and not hasattr(t, "distillation_log")


def test_train_and_resume_through_nnunetv2_train(mgsd_model, brats_dataset, bin_path, dataset_id, run_cmd):
    checkpoint = torch.load(mgsd_model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    state = checkpoint["mgsd_state"]
    assert set(state) == {"ema_weights", "aux_weights", "aux_optimizer_state", "ema_step", "distillation_log"}
    assert state["ema_step"] == 2 and [e["epoch"] for e in state["distillation_log"]] == [0]
    assert checkpoint["network_weights"].keys() == state["ema_weights"].keys()
    env = {**brats_dataset["env"], **budget_environment(num_epochs=2)}
    run_cmd([bin_path("nnUNetv2_train"), str(dataset_id), "3d_fullres", "all", "-tr", "nnUNetTrainerMGSD", "-device",
         "cpu", "--c"], env)
    resumed = torch.load(mgsd_model / "fold_all" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert resumed["current_epoch"] == 2
    assert resumed["mgsd_state"]["ema_step"] == 4  # the warm-up goes on from where it stopped
    assert [e["epoch"] for e in resumed["mgsd_state"]["distillation_log"]] == [0, 1]
    assert any(not torch.equal(resumed["mgsd_state"]["ema_weights"][k], v) for k, v in state["ema_weights"].items())
