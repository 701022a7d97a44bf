"""Dataset steps the experiment tools share: the conversion and planning commands, and input folders that
hold only some channels of each case."""
from __future__ import annotations

from pathlib import Path
from typing import List, Sequence, Union

from nnunet_kd.experiments.runner import command_path, python_module_command


def convert_command(source: Union[str, Path], dataset_id: int, *options: str) -> List[str]:
    """``nnunet_kd_convert_brats -i source -d dataset_id options`` (run as a module of this interpreter)."""
    return python_module_command("nnunet_kd.conversion.cli", "-i", str(source), "-d", str(dataset_id), *options)


def plan_command(dataset_id: int, num_processes: int, *options: str) -> List[str]:
    """``nnUNetv2_plan_and_preprocess`` of the 3d_fullres configuration of one dataset."""
    return [command_path("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres",
            "-np", str(num_processes), *options]


def link_channels(images: Path, channels: Sequence[int], out: Path) -> None:
    """An input folder holding only some channel files of each case (symbolic links, nothing copied)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(images.glob("*.nii.gz")):
        if int(f.name[-len("0000.nii.gz"):-len(".nii.gz")]) in channels:
            (out / f.name).symlink_to(f.resolve())
