"""Where nnU-Net finds the plugin's trainers."""
from __future__ import annotations

import os
from typing import Dict, MutableMapping, Optional


def trainer_dir() -> str:
    """The folder to put in ``nnUNet_extTrainer`` (the directory of ``nnunet_kd.trainers``)."""
    import nnunet_kd.trainers

    return os.path.dirname(os.path.abspath(nnunet_kd.trainers.__file__))


def with_trainer_path(env: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """A copy of ``env`` (default: ``os.environ``) whose ``nnUNet_extTrainer`` includes our trainers."""
    env = dict(os.environ if env is None else env)
    current = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if trainer_dir() not in current:
        current.append(trainer_dir())
    env["nnUNet_extTrainer"] = os.pathsep.join(current)
    return env


def main() -> None:
    """Print a shell line that points nnU-Net at the plugin: ``eval "$(nnunet_kd_env)"``."""
    print(f'export nnUNet_extTrainer="{with_trainer_path()["nnUNet_extTrainer"]}"')


if __name__ == "__main__":
    main()


def ensure_trainer_lookup() -> None:
    """Let nnU-Net code running in this process (e.g. nnUNetPredictor) find the plugin's trainers by name."""
    os.environ["nnUNet_extTrainer"] = with_trainer_path()["nnUNet_extTrainer"]
