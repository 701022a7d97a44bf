"""BraTS releases (2018-2025, every 2023+ cohort) and the Decathlon Task01 to nnU-Net v2 raw datasets, and
predictions back.

The BraTS conventions (modalities, label conventions, regions, the 2023+ cohorts) are :mod:`nnunet_kd.brats`'s.
Modules, in dependency order: ``releases`` (release names, layouts, detection, ConversionError),
``cohort_detection`` (which 2023+ cohort a folder holds), ``discovery`` (the cases of a folder), ``cases``
(per-case checks and writing, run in workers), ``dataset_json`` (the dataset.json), ``convert``
(orchestration), ``back`` (``--to-brats``), ``cli`` (the command).
"""
from nnunet_kd.conversion.back import convert_to_brats
from nnunet_kd.conversion.convert import convert_brats
from nnunet_kd.conversion.discovery import resolve_modalities
from nnunet_kd.conversion.releases import ConversionError, detect_release

__all__ = ["ConversionError", "convert_brats", "convert_to_brats", "detect_release", "resolve_modalities"]
