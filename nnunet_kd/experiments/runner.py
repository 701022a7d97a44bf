"""The one way the package runs nnU-Net's (and its own) commands as subprocesses."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from nnunet_kd.paths import with_trainer_path
from nnunet_kd.training.budget import budget_environment


class CommandFailed(RuntimeError):
    """A command exited non-zero; the message holds the command, its exit status and its output's tail."""

    def __init__(self, cmd: Sequence[str], returncode: int, output_tail: str, log: Optional[str] = None):
        self.cmd, self.returncode, self.output_tail, self.log = list(cmd), returncode, output_tail, log
        where = f"; log: {log}" if log else ""
        super().__init__(f"{' '.join(self.cmd)} exited {returncode}{where}\n{output_tail}")


def command_path(name: str) -> str:
    """A console script of the running Python environment (falls back to ``name`` on the PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def nnunet_environment(root: Union[str, Path], base: Optional[Dict[str, str]] = None, folder_prefix: str = "",
                       **extra: str) -> Dict[str, str]:
    """Environment for nnU-Net subprocesses: ``root``/raw, preprocessed, results (each name after
    ``folder_prefix``) as nnU-Net's folders, the plugin's trainers on ``nnUNet_extTrainer``, plus ``extra``
    variables (values turned into strings)."""
    root = Path(root)
    env = with_trainer_path(base)
    env.update({f"nnUNet_{kind}": str(root / f"{folder_prefix}{kind}") for kind in ("raw", "preprocessed", "results")})
    env.update({k: str(v) for k, v in extra.items()})
    return env


def default_device() -> str:
    """``cuda`` when a GPU is usable, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def budget_variables(epochs: int, iterations: int, val_iterations: int, device: str,
                     cpu_processes: int, save_every: int = 50) -> Dict[str, str]:
    """Environment variables for a short training run: the ``nnUNet_kd_*`` budget, torch.compile off unless the
    environment says otherwise, and on the CPU ``cpu_processes`` nnU-Net workers unless the environment sets them."""
    extra: Dict[str, Union[str, int]] = {
        **budget_environment(num_epochs=epochs, num_iterations_per_epoch=iterations,
                             num_val_iterations_per_epoch=val_iterations, save_every=save_every),
        "nnUNet_compile": os.environ.get("nnUNet_compile", "0")}
    if device == "cpu":
        for key in ("nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
            extra[key] = os.environ.get(key, cpu_processes)
    return {k: str(v) for k, v in extra.items()}


def run_command(cmd: Sequence[str], env: Optional[Dict[str, str]] = None, log_file: Optional[Union[str, Path]] = None,
                capture: bool = False, check: bool = True, timeout: Optional[float] = None,
                echo: Optional[str] = None, tail_chars: int = 6000) -> subprocess.CompletedProcess:
    """Run ``cmd``; its output goes to ``log_file`` (if given), else is captured (``capture``), else to stderr.

    ``echo``: a prefix under which the command and its duration are printed. With ``check`` a non-zero
    exit raises :class:`CommandFailed` carrying the output's last ``tail_chars`` characters.
    """
    cmd = [str(c) for c in cmd]
    if echo:
        print(f"{echo} {' '.join(cmd)}", file=sys.stderr, flush=True)
    start = time.time()
    sys.stdout.flush()
    sys.stderr.flush()
    if log_file is not None:
        os.makedirs(os.path.dirname(os.path.abspath(log_file)), exist_ok=True)
        with open(log_file, "w") as f:
            proc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        output = lambda: Path(log_file).read_text(errors="replace")  # noqa: E731
    elif capture:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        output = lambda: f"STDOUT:\n{proc.stdout[-tail_chars:]}\nSTDERR:\n{proc.stderr[-tail_chars:]}"  # noqa: E731
    else:
        proc = subprocess.run(cmd, env=env, stdout=sys.stderr.fileno(), stderr=sys.stderr.fileno(), timeout=timeout)
        output = lambda: "(output above)"  # noqa: E731
    if check and proc.returncode != 0:
        raise CommandFailed(cmd, proc.returncode, output()[-2 * tail_chars:],
                            None if log_file is None else str(log_file))
    if echo:
        print(f"{echo}   done in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    return proc


def python_module_command(module: str, *args: str) -> List[str]:
    """``python -m module args`` with this interpreter (for the package's own tools)."""
    return [sys.executable, "-m", module, *[str(a) for a in args]]
