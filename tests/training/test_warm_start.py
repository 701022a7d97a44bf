"""A student initialised from a teacher that sees more input channels (training.teachers.initialise_from_teacher)."""
from __future__ import annotations

import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_kd.training.teachers import initialise_from_teacher


def unet(cls, in_channels: int, features=(8, 16, 32)):
    kwargs = dict(input_channels=in_channels, n_stages=3, features_per_stage=features, conv_op=torch.nn.Conv3d,
                  kernel_sizes=3, strides=(1, 2, 2), num_classes=3, n_conv_per_stage_decoder=(1, 1),
                  conv_bias=True, norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                  nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=True)
    kwargs["n_blocks_per_stage" if cls is ResidualEncoderUNet else "n_conv_per_stage"] = (1, 1, 1)
    torch.manual_seed(in_channels)
    return cls(**kwargs)


@pytest.mark.parametrize("cls", [PlainConvUNet, ResidualEncoderUNet])
@pytest.mark.parametrize("kept", [[1], [0, 3]])
def test_student_computes_what_the_teacher_computes_with_the_other_inputs_at_zero(cls, kept):
    teacher, student = unet(cls, 4).eval(), unet(cls, len(kept)).eval()
    with torch.no_grad():  # an affine norm that is not the identity, so the copy of every tensor shows
        for p in teacher.parameters():
            p.add_(0.1 * torch.randn_like(p))
    params_before = list(student.parameters())
    initialise_from_teacher(student, teacher, kept)
    assert all(a is b for a, b in zip(params_before, student.parameters()))  # written in place
    x = torch.randn(2, 4, 16, 16, 16)
    zeroed = torch.zeros_like(x)
    zeroed[:, kept] = x[:, kept]
    with torch.no_grad():
        for s, t in zip(student(x[:, kept]), teacher(zeroed)):
            torch.testing.assert_close(s, t, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(teacher(x)[0], teacher(zeroed)[0], atol=1e-3)  # the other inputs mattered


def test_other_architectures_are_refused_naming_the_tensor():
    with pytest.raises(ValueError, match="different architectures"):
        initialise_from_teacher(unet(ResidualEncoderUNet, 1), unet(PlainConvUNet, 4), [1])
    with pytest.raises(ValueError, match=r"tensor encoder\.stages\.1.*only the input convolution may differ"):
        initialise_from_teacher(unet(PlainConvUNet, 1, (8, 24, 32)), unet(PlainConvUNet, 4), [1])
