"""The MTCM-KD student's loss terms: epoch-0 loss, KD reductions of the variants, the default's gradient share."""
from __future__ import annotations

import math

import pytest
import torch

from nnunet_kd.experiments.kd_gradient_shares import measure, nnunet_region_loss
from nnunet_kd.losses import STUDENT_TERMS, ResponseKD, student_loss_terms
from nnunet_kd.trainers.nnUNetTrainerMTCMKD import nnUNetTrainerMTCMKD
from nnunet_kd.trainers.nnUNetTrainerMTCMKD_variants import (nnUNetTrainerMTCMKD_KDFromStart,
                                                             nnUNetTrainerMTCMKD_PaperWeights,
                                                             nnUNetTrainerMTCMKD_Reference,
                                                             nnUNetTrainerMTCMKD_StrongKD,
                                                             nnUNetTrainerMTCMKD_VoxelMeanT1)

#: Band of the response-KD share of the student's gradient at its logits that the default is chosen for
#: (docs/methods.md, "KD defaults"), at the issue's logit gap of 3.
DEFAULT_RESPONSE_KD_SHARE = (0.25, 0.45)


def kd_of(cls) -> ResponseKD:
    return ResponseKD(cls.kd_temperature, cls.kd_temperature_power, cls.kd_reduction, use_regions=True)


def binary_kl(p: float, q: float) -> float:
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


@pytest.mark.parametrize("cls, voxels_summed", [(nnUNetTrainerMTCMKD_Reference, True),
                                                (nnUNetTrainerMTCMKD_VoxelMeanT1, False)])
def test_variant_kd_reductions_have_known_values(cls, voxels_summed):
    # Teacher logit T*ln(3) -> p = 0.75 at temperature T; student logit 0 -> q = 0.5, at every voxel.
    T = cls.kd_temperature
    assert (T, cls.kd_temperature_power, cls.kd_total_weight) == (20.0, 1, 0.15)
    batch, spatial = 2, (2, 3, 4)
    student = torch.zeros(batch, 1, *spatial)
    teacher = torch.full_like(student, T * math.log(3.0))
    per_voxel = binary_kl(0.75, 0.5)  # 0.1308...
    voxels = math.prod(spatial)
    expected = per_voxel * T * (voxels if voxels_summed else 1)  # batchmean: sum over the patch / batch size
    assert kd_of(cls)(student, teacher).item() == pytest.approx(expected, rel=1e-5)


def test_reference_starts_with_0_1_per_teacher_and_paper_weights_split_their_total():
    assert nnUNetTrainerMTCMKD_Reference.initial_kd_weight == 0.1
    assert nnUNetTrainerMTCMKD_PaperWeights.initial_kd_weight is None  # kd_total_weight / number of teachers


def test_default_is_the_region_rule_with_full_supervision_and_the_variants_keep_the_papers():
    cls = nnUNetTrainerMTCMKD
    # supervision: nnU-Net's loss at 1.0 and nothing else; KD on top, ramped in over 10 epochs
    assert (cls.student_seg_weight, cls.student_ds_seg_fraction, cls.kd_rampup_epochs) == (1.0, 0.0, 10)
    assert (cls.kd_region_weight, cls.kd_dice_margin, cls.kd_dice_momentum) == (None, 0.05, 0.9)
    assert cls.cdsfl_head_full_weight
    for variant in (nnUNetTrainerMTCMKD_PaperWeights, nnUNetTrainerMTCMKD_Reference, nnUNetTrainerMTCMKD_VoxelMeanT1,
                    nnUNetTrainerMTCMKD_StrongKD, nnUNetTrainerMTCMKD_KDFromStart):
        assert issubclass(variant, nnUNetTrainerMTCMKD_PaperWeights)
        assert (variant.student_seg_weight, variant.student_ds_seg_fraction, variant.kd_rampup_epochs) == (0.75, 0.7, 0)
        assert not variant.cdsfl_head_full_weight


def _toy_inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, 3, 8, 8, 8), (1, 3, 4, 4, 4), (1, 3, 2, 2, 2)]
    out = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    target = [(torch.rand(s, generator=gen) > 0.5).float() for s in shapes]
    teachers = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    fused = {1: torch.randn(shapes[1], generator=gen)}
    return out, teachers, fused, target


def _terms(kd_active: bool, **overrides):
    out, teachers, fused, target = _toy_inputs()
    seg_loss = nnunet_region_loss(3)
    kwargs = dict(seg_loss=seg_loss, kd=kd_of(nnUNetTrainerMTCMKD), kd_weights=[0.2, 0.2, 0.1], levels=(1,),
                  kd_active=kd_active, seg_weight=0.75, ds_weight=0.10, ds_seg_fraction=0.7, ds_kd_fraction=0.3)
    kwargs.update(overrides)
    return student_loss_terms(out, teachers, fused, target, **kwargs), (out, teachers, fused, target, seg_loss)


def test_epoch_0_loss_is_the_supervised_loss_at_weight_1():
    terms, (out, _, _, target, seg_loss) = _terms(kd_active=False)
    assert list(terms) == ["supervised"]
    assert torch.equal(terms["supervised"], seg_loss(out, target))


def test_terms_once_kd_is_on_sum_to_the_documented_loss():
    terms, (out, teachers, fused, target, seg_loss) = _terms(kd_active=True)
    assert list(terms) == list(STUDENT_TERMS)
    kd = kd_of(nnUNetTrainerMTCMKD)
    expected = (0.75 * seg_loss(out, target) + 0.07 * seg_loss.loss(out[1], target[1])
                + sum(w * kd(out[0], t[0]) for w, t in zip([0.2, 0.2, 0.1], teachers)) + 0.03 * kd(out[1], fused[1]))
    assert torch.isclose(sum(terms.values()), expected, rtol=1e-6)
    assert terms["response_kd"] > 0 and terms["cdsfl_kd"] > 0


def test_response_kd_rejects_bad_settings():
    with pytest.raises(ValueError, match="reduction"):
        ResponseKD(2.0, 2, "sum", True)
    with pytest.raises(ValueError, match="temperature"):
        ResponseKD(0.0, 2, "mean", True)


def test_default_kd_gradient_share_lies_in_the_documented_band():
    cls = nnUNetTrainerMTCMKD
    settings = {"default": (cls.kd_temperature, cls.kd_temperature_power, cls.kd_reduction, cls.kd_total_weight),
                "voxel-mean T1": (20.0, 1, "mean", 0.15), "reference": (20.0, 1, "batchmean", 0.15)}
    shares = {k: v["share"] for k, v in measure((24, 24, 24), gap=3.0, seeds=1, settings=settings).items()}
    for share in shares.values():
        assert sum(share.values()) == pytest.approx(1.0) and all(0 <= s <= 1 for s in share.values())
    low, high = DEFAULT_RESPONSE_KD_SHARE
    assert low <= shares["default"]["response_kd"] <= high
    # the reasons for the new default: the old one barely acts, the reference drowns the ground truth
    assert shares["voxel-mean T1"]["response_kd"] < 0.03
    assert shares["reference"]["supervised"] < 0.02
