"""Mixed precision of the training and validation steps: nnU-Net's fp16 autocast on CUDA, and on the CPU,
opt-in through ``nnUNet_kd_autocast=bf16``, bfloat16 autocast.

nnU-Net switches autocast off on the CPU (slow there in float16). bfloat16 autocast is the CPU's own mixed
precision (oneDNN bf16 convolutions); it stays opt-in because its benefit depends on the CPU: with native
bfloat16 (AVX512-BF16 or AMX) it halved the 4 mm plans' training step, without it (AVX2) the arithmetic is
emulated and the step ran about 60 times slower than in float32, so bf16 is refused on such a CPU
(:func:`require_native_cpu_bf16`). The networks' outputs leave autocast as float32, so the losses (Dice
sums, cross-entropy, KL, BCE) stay in float32.

torch is imported where it is used: the study's and the benchmark's command lines read AUTOCAST_CHOICES and
autocast_environment without loading it.
"""
from __future__ import annotations

import contextlib
import os
import platform
from typing import TYPE_CHECKING, Any, ContextManager, Dict, Mapping, Optional, Type

from nnunet_kd.cli import fail

if TYPE_CHECKING:
    import torch

#: Environment variable that picks the CPU mixed precision (like nnU-Net's ``nnUNet_compile``).
AUTOCAST_ENV = "nnUNet_kd_autocast"
#: Accepted values: name -> torch dtype name of the CPU autocast (None: float32, no autocast). Unset or empty
#: means "none".
CPU_AUTOCAST_DTYPES: Dict[str, Optional[str]] = {"none": None, "bf16": "bfloat16"}
#: The choices of ``--autocast`` in the study and the benchmark.
AUTOCAST_CHOICES = tuple(CPU_AUTOCAST_DTYPES)


def parse_cpu_autocast(value: Optional[str]) -> Optional[torch.dtype]:
    """The CPU autocast dtype a value of ``nnUNet_kd_autocast`` names (None, "" and "none": no autocast).

    Raises ValueError naming the variable and the allowed values for anything else.
    """
    key = (value or "").strip().lower() or "none"
    if key not in CPU_AUTOCAST_DTYPES:
        raise ValueError(f"environment variable {AUTOCAST_ENV}={value!r}: allowed are 'bf16' (bfloat16 autocast on "
                         f"the CPU) and 'none' (float32), or leave it unset or empty for float32")
    dtype_name = CPU_AUTOCAST_DTYPES[key]
    if dtype_name is None:
        return None
    import torch

    return getattr(torch, dtype_name)


#: Per step of the 4 mm plans' U-Net (patch 40x48x40, batch 2), forward + backward + SGD, 2 threads, measured
#: 2026-12-01 on an AMD EPYC (Zen 3, AVX2, no native bfloat16): 2.2 s in float32, 130 s in bf16 autocast.
EMULATED_BF16_SLOWDOWN = 60
#: x86 names of platform.machine(); other architectures are not checked (see cpu_has_native_bf16).
_X86_MACHINES = ("x86_64", "amd64", "i386", "i686")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively. On x86: AVX512-BF16 or AMX, as torch detects them; without
    either, oneDNN emulates bf16 (correct, but much slower than float32). Other architectures, and a torch
    without these checks, are taken to be native (not checked)."""
    if platform.machine().lower() not in _X86_MACHINES:
        return True
    import torch

    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    checks = [check for check in checks if check is not None]
    return not checks or any(check() for check in checks)


def require_native_cpu_bf16(setting: str, remedy: str, error: Type[Exception] = ValueError) -> None:
    """Raise ``error`` when bf16 autocast would be emulated on this CPU; the message names ``setting`` (the
    variable or option that asked for bf16) and says what to do (``remedy``)."""
    if cpu_has_native_bf16():
        return
    import torch

    raise error(f"{setting}: this CPU has no native bfloat16 arithmetic (torch reports "
                     f"{torch.backends.cpu.get_cpu_capability()}; bf16 needs AVX512-BF16 or AMX), so bf16 autocast "
                     f"would be emulated: about {EMULATED_BF16_SLOWDOWN} times slower than float32 (measured on an "
                     f"AVX2 AMD EPYC). {remedy}")


def cpu_autocast_dtype(environ: Optional[Mapping[str, str]] = None) -> Optional[torch.dtype]:
    """The CPU autocast dtype ``nnUNet_kd_autocast`` asks for in ``environ`` (default: os.environ)."""
    return parse_cpu_autocast((os.environ if environ is None else environ).get(AUTOCAST_ENV))


def autocast_environment(choice: str) -> Dict[str, str]:
    """The environment that makes trainings use ``choice`` ("none" or "bf16", as the study's and the
    benchmark's ``--autocast``): the variable set even for "none", so that a value in the caller's
    environment does not leak into trainings recorded as float32."""
    parse_cpu_autocast(choice)
    return {AUTOCAST_ENV: "" if choice == "none" else choice}


def autocast_for(device: torch.device, cpu_dtype: Optional[torch.dtype] = None) -> ContextManager:
    """The steps' autocast: nnU-Net's (float16) on CUDA; ``cpu_dtype`` autocast on the CPU when given;
    nothing elsewhere (MPS does not support it)."""
    import torch

    if device.type == "cuda":
        return torch.autocast("cuda", enabled=True)
    if device.type == "cpu" and cpu_dtype is not None:
        return torch.autocast("cpu", dtype=cpu_dtype)
    return contextlib.nullcontext()


def precision_description(device: torch.device, cpu_dtype: Optional[torch.dtype],
                          environ: Optional[Mapping[str, str]] = None) -> str:
    """One log line saying in which precision the steps run on ``device``."""
    env_value = (os.environ if environ is None else environ).get(AUTOCAST_ENV, "")
    if device.type == "cuda":
        ignored = f" ({AUTOCAST_ENV}={env_value} applies to the CPU only: ignored)" if cpu_dtype is not None else ""
        return f"precision: nnU-Net's fp16 autocast on CUDA{ignored}"
    if device.type == "cpu" and cpu_dtype is not None:
        name = next(k for k, v in CPU_AUTOCAST_DTYPES.items() if v is not None and f"torch.{v}" == str(cpu_dtype))
        return f"precision: {name} autocast on the CPU ({AUTOCAST_ENV}={env_value})"
    return "precision: fp32"


def _float_outputs(module: Any, args: Any, output: Any) -> Any:
    """Forward hook: the network's output (a tensor or a deep-supervision list of tensors) as float32."""
    if isinstance(output, (list, tuple)):
        return type(output)(o.float() for o in output)
    return output.float()


def _device_argument(args: tuple, kwargs: dict) -> torch.device:
    """The ``device`` a trainer is constructed with (nnUNetTrainer's fifth argument; its default is CUDA)."""
    import torch

    device = kwargs.get("device", args[4] if len(args) > 4 else None)
    return torch.device("cuda") if device is None else torch.device(device)


class CPUAutocastMixin:
    """Puts a trainer's training and validation steps under :func:`autocast_for` with the CPU dtype that
    ``nnUNet_kd_autocast`` names, and logs the precision once when training starts.

    Stock steps (nnUNetTrainer's train_step / validation_step) are wrapped here; trainers with their own
    steps use :meth:`step_autocast` in them. Place it before nnUNetTrainer in the class bases.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        # Read before nnU-Net's __init__ creates the fold folder and its log: a bad value writes nothing and,
        # like a bad budget variable (training/budget.py), stops with one error line.
        try:
            self.cpu_autocast_dtype: Optional[torch.dtype] = cpu_autocast_dtype()
            if self.cpu_autocast_dtype is not None and _device_argument(args, kwargs).type == "cpu":
                require_native_cpu_bf16(f"{AUTOCAST_ENV}={os.environ.get(AUTOCAST_ENV)}",
                                        f"Unset {AUTOCAST_ENV} to train in float32.")
        except ValueError as e:
            fail(str(e))
        self._float_output_network: Optional[torch.nn.Module] = None
        super().__init__(*args, **kwargs)

    @property
    def uses_cpu_autocast(self) -> bool:
        return self.device.type == "cpu" and self.cpu_autocast_dtype is not None

    def step_autocast(self) -> ContextManager:
        """The autocast context of a training or validation step on this trainer's device."""
        if self.uses_cpu_autocast:
            self._cast_network_outputs_to_float()
        return autocast_for(self.device, self.cpu_autocast_dtype)

    def _cast_network_outputs_to_float(self) -> None:
        # A hook on the U-Net itself (inside DDP / torch.compile, which trace it when first called), so stock
        # nnU-Net steps hand float32 logits to their losses without copying their code.
        from nnunet_kd.training.features import unwrap_network

        network = unwrap_network(self.network)
        if self._float_output_network is not network:
            network.register_forward_hook(_float_outputs)
            self._float_output_network = network

    def on_train_start(self) -> None:
        super().on_train_start()
        self.print_to_log_file(precision_description(self.device, self.cpu_autocast_dtype))

    def train_step(self, batch: dict) -> dict:
        if not self.uses_cpu_autocast:
            return super().train_step(batch)  # nnU-Net's own step, its CUDA autocast included, untouched
        # nnU-Net's autocast is CUDA-only, so on the CPU this one holds inside its step. Its backward then runs
        # under autocast too, which leaves a U-Net's gradients unchanged (convolution_backward is no autocast op).
        with self.step_autocast():
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        if not self.uses_cpu_autocast:
            return super().validation_step(batch)
        with self.step_autocast():
            return super().validation_step(batch)
