"""The evaluated tumour regions, in nnU-Net labels (1 ED, 2 NCR, 3 ET; :mod:`nnunet_kd.brats.labels`).

WT (whole tumour) = {1, 2, 3}, TC (tumour core) = {2, 3}, ET (enhancing tumour) = {3}: the regions of
the BraTS 2018-2021 challenges (Baid et al. 2021) and of every BraTS 2023 cohort. The 2024+ cohorts add
regions of their own (RC, CC, GTV; :mod:`nnunet_kd.brats.cohorts`).
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import numpy as np

#: Region definitions in nnU-Net labels; the order is regions_class_order (1, 2, 3).
REGIONS: Dict[str, Tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}

#: Long names of the regions, as written into dataset.json ``labels``.
REGION_NAMES: Dict[str, str] = {
    "WT": "whole tumor", "TC": "tumor core", "ET": "enhancing tumor", "RC": "resection cavity",
    "CC": "cystic component", "GTV": "gross tumor volume",
}


def region_masks(seg: np.ndarray, regions: Mapping[str, Tuple[int, ...]] = REGIONS) -> Dict[str, np.ndarray]:
    """Boolean mask of each region from a segmentation in nnU-Net labels.

    ``regions``: region -> nnU-Net labels; WT/TC/ET by default, a cohort's ``regions`` for 2023+ cohorts.
    """
    return {name: np.isin(seg, members) for name, members in regions.items()}
