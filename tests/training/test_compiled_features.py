"""FeatureTap under torch.compile: a compiled network gives the eager network's outputs, decoder and
bottleneck features and gradients (inductor on CPU), for the plain and the residual-encoder U-Net."""
from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch
from torch import nn

from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet

from nnunet_kd.training.features import FeatureTap, unwrap_network

NORM = dict(norm_op=nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
            nonlin_kwargs={"inplace": True}, deep_supervision=True)


def _cxx_compiler():
    return next(filter(None, (shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)),
                None)


def _plain_unet(n_stages: int) -> nn.Module:
    torch.manual_seed(0)
    return PlainConvUNet(1, n_stages, (4, 8, 16)[:n_stages], nn.Conv3d, 3, (1, 2, 2)[:n_stages], 1, 2, 1, True,
                         **NORM)


def _resenc_unet() -> nn.Module:
    torch.manual_seed(0)
    return ResidualEncoderUNet(1, 3, (4, 8, 16), nn.Conv3d, 3, (1, 2, 2), (1, 1, 1), 2, (1, 1), True, **NORM)


class CountingBackend:
    """A torch.compile backend that runs the captured graphs eagerly and counts the compilations."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


def _loss(outputs, features) -> torch.Tensor:
    """Depends on every output and every tapped feature, so each one's gradient reaches the weights."""
    return (sum(o.square().mean() for o in outputs) + features["bottleneck"].square().mean()
            + sum(f.square().mean() for f in features["decoder"].values()))


def _run(network: nn.Module, tap: FeatureTap, x: torch.Tensor):
    network.zero_grad(set_to_none=True)
    outputs = network(x)
    features = tap.take()
    _loss(outputs, features).backward()
    grads = {n: p.grad.clone() for n, p in unwrap_network(network).named_parameters() if p.grad is not None}
    return outputs, features, grads


def _assert_same(eager, compiled, atol: float = 1e-4) -> None:
    (out_e, feat_e, grad_e), (out_c, feat_c, grad_c) = eager, compiled
    assert len(out_e) == len(out_c)
    for a, b in zip(out_e, out_c):
        torch.testing.assert_close(b, a, atol=atol, rtol=1e-4)
    assert set(feat_c["decoder"]) == set(feat_e["decoder"])
    for level, a in feat_e["decoder"].items():
        torch.testing.assert_close(feat_c["decoder"][level], a, atol=atol, rtol=1e-4)
    torch.testing.assert_close(feat_c["bottleneck"], feat_e["bottleneck"], atol=atol, rtol=1e-4)
    assert set(grad_c) == set(grad_e) and grad_e
    # Biases in front of InstanceNorm have (numerically) zero gradient: compare against the largest gradient.
    scale = max(g.abs().max() for g in grad_e.values())
    for name, g in grad_e.items():
        assert (grad_c[name] - g).abs().max() <= 1e-4 * scale, name


@pytest.mark.skipif(_cxx_compiler() is None, reason="inductor on CPU needs a C++ compiler (none found: g++, c++, clang++)")
def test_inductor_compiled_unet_matches_eager_outputs_features_and_gradients():
    eager = _plain_unet(2)
    compiled = copy.deepcopy(eager)
    # As the trainers do it: compile first (lazy), create the taps, then run.
    compiled.compile()
    tap_e, tap_c = FeatureTap(eager, (0,), bottleneck=True), FeatureTap(compiled, (0,), bottleneck=True)
    for seed in (1, 2):  # the second pass reuses the compiled graph with new data
        x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))
        result_c = _run(compiled, tap_c, x)
        assert result_c[1]["decoder"][0].shape == (2, 4, 16, 16, 16)
        assert result_c[1]["bottleneck"].shape == (2, 8, 8, 8, 8)
        assert result_c[1]["bottleneck"].grad_fn is not None  # a graph output, not a detached copy
        _assert_same(_run(eager, tap_e, x), result_c)


@pytest.mark.parametrize("build", [_plain_unet, _resenc_unet], ids=["PlainConvUNet", "ResidualEncoderUNet"])
def test_dynamo_traces_the_taps_without_recompiling(build):
    eager = build(3) if build is _plain_unet else build()
    compiled = copy.deepcopy(eager)
    backend = CountingBackend()
    wrapper = torch.compile(compiled, backend=backend)  # nnU-Net's way: an OptimizedModule around the U-Net
    tap_e, tap_c = FeatureTap(eager, (0, 1), bottleneck=True), FeatureTap(wrapper, (0, 1), bottleneck=True)
    for seed in (1, 2, 3):
        x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(seed))
        result_c = _run(wrapper, tap_c, x)
        _assert_same(_run(eager, tap_e, x), result_c, atol=1e-5)
    assert backend.graphs == 1  # take() empties the store every pass without invalidating the graph
    assert set(result_c[1]["decoder"]) == {0, 1}


def test_tap_created_after_the_first_compiled_call_fails_loudly(monkeypatch):
    # a process in which no tap existed at the first compilation: Dynamo's default, no guards on hooks
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)
    torch._dynamo.reset()
    network = torch.compile(_plain_unet(2), backend=CountingBackend())
    x = torch.randn(1, 1, 16, 16, 16)
    network(x)
    tap = FeatureTap(network, (0,), bottleneck=True)
    network(x)
    with pytest.raises(RuntimeError, match="first compiled call"):
        tap.take()


def test_a_deepcopy_of_the_tapped_network_does_not_feed_the_tap():
    network = _plain_unet(2)
    tap = FeatureTap(network, (0,), bottleneck=True)
    ema = copy.deepcopy(network)  # carries the hooks, as MGSD's EMA teacher would
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        network(x)
        expected = tap.take()
        ema(x * 2)
        with pytest.raises(RuntimeError):
            tap.take()
        network(x)
    torch.testing.assert_close(tap.take()["bottleneck"], expected["bottleneck"])


def test_untapped_and_tapped_networks_of_one_shape_keep_their_own_graphs(monkeypatch):
    """MTCM-KD's case: a student without hooks and teachers with taps, all the same U-Net on one channel.

    Dynamo shares a graph between instances of a class. Without guards on hooks (its default), the student's
    hook-free graph, compiled after the teachers', ran for the teachers from the next step on and their taps
    stayed empty ("FeatureTap.take() called before a forward pass")."""
    monkeypatch.setattr(torch._dynamo.config, "skip_nnmodule_hook_guards", True)  # Dynamo's default
    torch._dynamo.reset()
    teachers = [_plain_unet(2) for _ in range(2)]
    student = _plain_unet(2)
    backend = CountingBackend()
    for network in (*teachers, student):
        network.compile(backend=backend)  # in place, as the trainers compile teachers
    taps = [FeatureTap(t, (0,), bottleneck=True) for t in teachers]
    for step in range(3):
        x = torch.randn(2, 1, 16, 16, 16, generator=torch.Generator().manual_seed(step))
        for teacher, tap in zip(teachers, taps):
            outputs = teacher(x)
            features = tap.take()
            torch.testing.assert_close(outputs[0], teacher._call_impl(x)[0], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(features["bottleneck"], tap.take()["bottleneck"], atol=1e-5, rtol=1e-4)
        student(x)
    # one graph for the tapped U-Nets, one for the untapped student; none after the first step
    assert backend.graphs == 2


def test_passes_without_take_do_not_recompile():
    """nnU-Net's validation runs the tapped network and nobody takes the features; the next training pass
    must reuse its graph (the store's keys stay fixed: Dynamo guards on them)."""
    network = _plain_unet(2)
    backend = CountingBackend()
    network.compile(backend=backend)
    tap = FeatureTap(network, (0,), bottleneck=True)
    x = torch.randn(1, 1, 16, 16, 16)
    for _ in range(2):
        network(x)  # a training pass ...
        first = tap.take()
        with torch.no_grad():  # ... and two validation passes without take()
            network(x)
            network(x * 2)
    assert backend.graphs == 2  # one with gradients, one without
    # the store holds the last pass's features, replaced, not accumulated
    last = tap.take()["bottleneck"]
    assert last.shape == first["bottleneck"].shape and last.grad_fn is None
    with pytest.raises(RuntimeError):
        tap.take()
