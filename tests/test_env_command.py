"""nnunet_kd_env: prints the export line; --help prints help; unknown options are refused."""
from __future__ import annotations

import subprocess


def test_env_help_and_unknown_options(bin_path):
    proc = subprocess.run([bin_path("nnunet_kd_env"), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: nnunet_kd_env" in proc.stdout and "export" not in proc.stdout
    proc = subprocess.run([bin_path("nnunet_kd_env"), "--bogus"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unrecognized arguments: --bogus" in proc.stderr and not proc.stdout
    proc = subprocess.run([bin_path("nnunet_kd_env")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith('export nnUNet_extTrainer="')
