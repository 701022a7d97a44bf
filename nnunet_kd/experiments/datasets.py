"""Dataset steps the experiment tools share: the conversion and planning commands, and input folders that
hold only some channels of each case."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Union

from nnunet_kd.experiments.runner import command_path, python_module_command


def convert_command(source: Union[str, Path], dataset_id: int, *options: str) -> List[str]:
    """``nnunet_kd_convert_brats -i source -d dataset_id options`` (run as a module of this interpreter)."""
    return python_module_command("nnunet_kd.conversion.cli", "-i", str(source), "-d", str(dataset_id), *options)


def plan_command(dataset_id: int, num_processes: int, *options: str) -> List[str]:
    """``nnUNetv2_plan_and_preprocess`` of the 3d_fullres configuration of one dataset."""
    return [command_path("nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", "3d_fullres",
            "-np", str(num_processes), *options]


def plans_name_for(target_spacing: Optional[Sequence[float]]) -> str:
    """nnU-Net's default plans name, or a name of its own for plans with another 3d_fullres target spacing."""
    if target_spacing is None:
        return "nnUNetPlans"
    return "nnUNetPlans_" + "x".join(f"{s:g}" for s in target_spacing) + "mm"


def planning_commands(dataset_id: int, num_processes: int,
                      target_spacing: Optional[Sequence[float]] = None) -> List[List[str]]:
    """The commands that plan and preprocess the 3d_fullres configuration of one dataset.

    With ``target_spacing`` (mm, nnU-Net's axis order) the plans go through nnU-Net's own planner
    (``nnUNetv2_plan_experiment -overwrite_target_spacing``) under :func:`plans_name_for`'s name, which
    training and prediction then name with ``-p``.
    """
    if target_spacing is None:
        return [plan_command(dataset_id, num_processes)]
    d, n, name = str(dataset_id), str(num_processes), plans_name_for(target_spacing)
    return [[command_path("nnUNetv2_extract_fingerprint"), "-d", d, "-np", n],
            [command_path("nnUNetv2_plan_experiment"), "-d", d, "-overwrite_target_spacing",
             *(f"{s:g}" for s in target_spacing), "-overwrite_plans_name", name],
            [command_path("nnUNetv2_preprocess"), "-d", d, "-plans_name", name, "-c", "3d_fullres", "-np", n]]


def link_channels(images: Path, channels: Sequence[int], out: Path) -> None:
    """An input folder holding only some channel files of each case (symbolic links, nothing copied)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(images.glob("*.nii.gz")):
        if int(f.name[-len("0000.nii.gz"):-len(".nii.gz")]) in channels:
            (out / f.name).symlink_to(f.resolve())
