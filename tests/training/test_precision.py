"""nnUNet_kd_autocast: parsing, the autocast context per device and the precision log line."""
from __future__ import annotations

import pytest
import torch

from nnunet_kd.training import precision
from nnunet_kd.training.precision import (AUTOCAST_ENV, CPUAutocastMixin, _float_outputs, autocast_for,
                                          cpu_autocast_dtype, cpu_has_native_bf16, parse_cpu_autocast,
                                          precision_description, require_native_cpu_bf16)


@pytest.mark.parametrize("value", [None, "", " ", "none", "NONE"])
def test_unset_empty_or_none_means_no_autocast(value):
    assert parse_cpu_autocast(value) is None


@pytest.mark.parametrize("value", ["bf16", " BF16 "])
def test_bf16_means_bfloat16(value):
    assert parse_cpu_autocast(value) is torch.bfloat16


@pytest.mark.parametrize("value", ["fp16", "abc", "bfloat16", "1"])
def test_an_unknown_value_names_the_variable_and_the_allowed_values(value):
    with pytest.raises(ValueError) as exc:
        parse_cpu_autocast(value)
    message = str(exc.value)
    assert AUTOCAST_ENV in message and repr(value) in message
    assert "'bf16'" in message and "'none'" in message


def test_the_environment_is_read(monkeypatch):
    monkeypatch.delenv(AUTOCAST_ENV, raising=False)
    assert cpu_autocast_dtype() is None
    monkeypatch.setenv(AUTOCAST_ENV, "bf16")
    assert cpu_autocast_dtype() is torch.bfloat16
    assert cpu_autocast_dtype({AUTOCAST_ENV: ""}) is None


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # machines without a GPU
def test_autocast_on_the_cpu_only_when_a_dtype_is_given():
    cpu = torch.device("cpu")
    conv = torch.nn.Conv3d(2, 2, 3)
    x = torch.randn(1, 2, 5, 5, 5)
    with autocast_for(cpu):
        assert not torch.is_autocast_enabled("cpu")
        assert conv(x).dtype == torch.float32
    with autocast_for(cpu, torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert conv(x).dtype == torch.bfloat16
    # CUDA keeps nnU-Net's float16 autocast whatever the CPU setting is
    for dtype in (None, torch.bfloat16):
        ctx = autocast_for(torch.device("cuda"), dtype)
        assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.float16


def test_precision_line():
    env = {AUTOCAST_ENV: "bf16"}
    assert precision_description(torch.device("cpu"), torch.bfloat16, env) == \
        "precision: bf16 autocast on the CPU (nnUNet_kd_autocast=bf16)"
    assert precision_description(torch.device("cpu"), None, {}) == "precision: fp32"
    assert precision_description(torch.device("cuda"), None, {}) == "precision: nnU-Net's fp16 autocast on CUDA"
    cuda_line = precision_description(torch.device("cuda"), torch.bfloat16, env)
    assert cuda_line.startswith("precision: nnU-Net's fp16 autocast on CUDA") and "ignored" in cuda_line


class _StockSteps:
    """Stands in for nnUNetTrainer: its steps run ``self.network`` and hand the output to a 'loss'."""

    def __init__(self, plans, configuration, fold, dataset_json, device):
        self.device, self.loss_inputs = device, []
        self.network = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.Conv3d(2, 2, 1))
        self.autocast_seen = []
        self.network[0].register_forward_hook(
            lambda m, a, out: self.autocast_seen.append((out.dtype, torch.is_autocast_enabled("cpu"))))

    def train_step(self, batch):
        out = self.network(batch)
        self.loss_inputs.append(out.dtype)
        return out

    validation_step = train_step


class _Trainer(CPUAutocastMixin, _StockSteps):
    pass


def _trainer(device: str = "cpu") -> _Trainer:
    return _Trainer({}, "3d_fullres", 0, {}, torch.device(device))


@pytest.mark.parametrize("step", ["train_step", "validation_step"])
def test_stock_steps_run_under_bf16_autocast_and_hand_float32_to_the_loss(monkeypatch, native_bf16, step):
    monkeypatch.setenv(AUTOCAST_ENV, "bf16")
    trainer = _trainer()
    getattr(trainer, step)(torch.randn(1, 1, 5, 5, 5))
    assert trainer.autocast_seen == [(torch.bfloat16, True)] and trainer.loss_inputs == [torch.float32]
    assert not torch.is_autocast_enabled("cpu")  # only inside the step


def test_stock_steps_unchanged_when_unset(monkeypatch):
    monkeypatch.delenv(AUTOCAST_ENV, raising=False)
    trainer = _trainer()
    trainer.train_step(torch.randn(1, 1, 5, 5, 5))
    assert trainer.autocast_seen == [(torch.float32, False)] and not trainer.network._forward_hooks


def test_float_outputs_hook_casts_tensors_and_deep_supervision_lists():
    bf = torch.ones(2, dtype=torch.bfloat16)
    assert _float_outputs(None, (), bf).dtype == torch.float32
    assert [o.dtype for o in _float_outputs(None, (), [bf, bf])] == [torch.float32] * 2
    assert isinstance(_float_outputs(None, (), (bf,)), tuple)


@pytest.mark.parametrize("value", ["fp16", "abc"])
def test_a_bad_value_stops_before_the_trainer_is_built(monkeypatch, capsys, value):
    monkeypatch.setenv(AUTOCAST_ENV, value)
    monkeypatch.setattr(_StockSteps, "__init__", lambda *a: pytest.fail("nnUNetTrainer.__init__ was reached"))
    with pytest.raises(SystemExit) as exc:
        _trainer()
    assert exc.value.code == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: environment variable {AUTOCAST_ENV}={value!r}")


def _cpu(monkeypatch, machine: str, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(precision.platform, "machine", lambda: machine)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("machine,avx512_bf16,amx,native", [
    ("x86_64", False, False, False), ("x86_64", True, False, True), ("AMD64", False, True, True),
    ("aarch64", False, False, True),  # not checked there
])
def test_native_bf16_is_avx512_bf16_or_amx_on_x86(monkeypatch, machine, avx512_bf16, amx, native):
    _cpu(monkeypatch, machine, avx512_bf16, amx)
    assert cpu_has_native_bf16() is native


def test_emulated_bf16_is_refused_with_the_setting_and_the_remedy(monkeypatch):
    _cpu(monkeypatch, "x86_64", False, False)
    class Refused(Exception):
        pass

    with pytest.raises(Refused) as exc:
        require_native_cpu_bf16("--autocast bf16", "Use --autocast none.", Refused)
    message = str(exc.value)
    assert message.startswith("--autocast bf16: this CPU has no native bfloat16") and "Use --autocast none." in message
    assert torch.backends.cpu.get_cpu_capability() in message and "60 times slower" in message
    _cpu(monkeypatch, "x86_64", True, False)
    require_native_cpu_bf16("--autocast bf16", "Use --autocast none.")  # native: nothing raised


def test_a_trainer_on_a_cpu_without_native_bf16_stops_before_it_is_built(monkeypatch, capsys):
    monkeypatch.setenv(AUTOCAST_ENV, "bf16")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(_StockSteps, "__init__", lambda *a: pytest.fail("nnUNetTrainer.__init__ was reached"))
    with pytest.raises(SystemExit) as exc:
        _trainer()
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: nnUNet_kd_autocast=bf16: this CPU has no native bfloat16") and \
        "Unset nnUNet_kd_autocast to train in float32." in err


def test_emulated_bf16_is_no_concern_on_cuda(monkeypatch):
    """On CUDA the variable is ignored (nnU-Net's fp16 autocast): a trainer there is built whatever the CPU."""
    monkeypatch.setenv(AUTOCAST_ENV, "bf16")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert _trainer("cuda").cpu_autocast_dtype is torch.bfloat16
