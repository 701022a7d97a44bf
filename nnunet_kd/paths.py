"""Where things are: nnU-Net's dataset folders, and the folder nnU-Net finds the plugin's trainers in.

This module does not import the trainers (they sit at the bottom of the dependency order).
"""
from __future__ import annotations

import os
from typing import Dict, List, MutableMapping, Optional, Sequence, Union


def trainer_dir() -> str:
    """The folder to put in ``nnUNet_extTrainer`` (``nnunet_kd/trainers``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "trainers")


def with_trainer_path(env: Optional[MutableMapping[str, str]] = None) -> Dict[str, str]:
    """A copy of ``env`` (default: ``os.environ``) whose ``nnUNet_extTrainer`` includes our trainers."""
    env = dict(os.environ if env is None else env)
    current = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if trainer_dir() not in current:
        current.append(trainer_dir())
    env["nnUNet_extTrainer"] = os.pathsep.join(current)
    return env


def ensure_trainer_lookup() -> None:
    """Let nnU-Net code running in this process (e.g. nnUNetPredictor) find the plugin's trainers by name."""
    os.environ["nnUNet_extTrainer"] = with_trainer_path()["nnUNet_extTrainer"]


def dataset_folders(base: str, dataset: Union[int, str]) -> List[str]:
    """The folders of ``base`` that are dataset ``dataset``: ``DatasetXXX_*`` for an id, the name itself for a
    full ``DatasetXXX_Name``. Sorted; empty when ``base`` has none."""
    if not os.path.isdir(base):
        return []
    name = str(dataset)
    if name.startswith("Dataset"):
        return [os.path.join(base, name)] if os.path.isdir(os.path.join(base, name)) else []
    prefix = f"Dataset{int(name):03d}_"
    return sorted(os.path.join(base, d) for d in os.listdir(base)
                  if d.startswith(prefix) and os.path.isdir(os.path.join(base, d)))


def find_dataset_folder(base: str, dataset: Union[int, str], where: str = "") -> str:
    """The one folder of dataset ``dataset`` (id or ``DatasetXXX_Name``) in ``base``.

    ValueError naming ``base`` (as ``where``, e.g. ``nnUNet_results=/x``) when there is none or several.
    """
    where = where or repr(base)
    name = str(dataset)
    if not name.startswith("Dataset"):
        try:
            int(name)
        except ValueError:
            raise ValueError(f"a dataset is given by its id or as DatasetXXX_Name, got {name!r}") from None
    found = dataset_folders(base, name)
    if not found:
        raise ValueError(f"no dataset {name} in {where}")
    if len(found) > 1:
        raise ValueError(f"several datasets with id {name} in {where}: "
                         f"{', '.join(os.path.basename(f) for f in found)}")
    return found[0]


def env_folder(name: str, hint: str = "") -> str:
    """The folder an nnU-Net environment variable (``nnUNet_raw``, ...) names; ValueError if unset or not a folder."""
    value = os.environ.get(name)
    if not value:
        raise ValueError(f"{name} is not set{'; ' + hint if hint else ''}")
    if not os.path.isdir(value):
        raise ValueError(f"{name}={value!r} is not a folder")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nnunet_kd_env``: print the shell line that points nnU-Net at the plugin (``eval "$(nnunet_kd_env)"``)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="nnunet_kd_env",
        description="Print the shell line that lets nnU-Net find the plugin's trainers: "
                    'eval "$(nnunet_kd_env)"')
    parser.parse_args(argv)
    print(f'export nnUNet_extTrainer="{with_trainer_path()["nnUNet_extTrainer"]}"')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
