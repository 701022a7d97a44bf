"""BraTS label conventions: nnU-Net's labels, each release's label values and the mapping between them.

Inside nnU-Net every label map follows nnU-Net's BraTS convention (nnU-Net by Isensee et al. 2021, its
BraTS dataset conversion): 1 = edema (ED), 2 = necrosis / non-enhancing core (NCR), 3 = enhancing tumour
(ET). The releases label differently: BraTS 2018-2021 (Baid et al. 2021) 1 NCR, 2 ED, 4 ET; BraTS 2023 GLI
1 NCR, 2 ED, 3 ET; the Medical Segmentation Decathlon's Task01 1 edema, 2 non-enhancing, 3 enhancing. The
2023+ cohorts whose labels differ from GLI's are in :mod:`nnunet_kd.brats.cohorts`.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import numpy as np

#: nnU-Net label values (nnU-Net's BraTS convention).
NNUNET_LABELS: Dict[str, int] = {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}

#: Label convention -> (release label value -> nnU-Net label value).
RELEASE_TO_NNUNET: Dict[str, Dict[int, int]] = {
    "brats2021": {0: 0, 1: 2, 2: 1, 4: 3},  # 2018-2021: 1 NCR, 2 ED, 4 ET
    "brats2023": {0: 0, 1: 2, 2: 1, 3: 3},  # 2023+ GLI: 1 NCR, 2 ED, 3 ET
    "msd": {0: 0, 1: 1, 2: 2, 3: 3},  # Task01: 1 edema, 2 non-enhancing, 3 enhancing
}

#: Release -> its label convention (a key of RELEASE_TO_NNUNET). BraTS 2018-2020 share the 2021 label
#: values; 2024 and 2025 keep the 2023 GLI values for the cohorts that have them (cohorts.py has the others).
RELEASE_LABEL_CONVENTIONS: Dict[str, str] = {
    "brats2018": "brats2021", "brats2019": "brats2021", "brats2020": "brats2021", "brats2021": "brats2021",
    "brats2023": "brats2023", "brats2024": "brats2023", "brats2025": "brats2023", "msd": "msd",
}

#: BraTS 2018, 2019 and 2020 share the 2021 label values, so the years users know are accepted as names of it.
LABEL_CONVENTION_ALIASES: Dict[str, str] = {release: RELEASE_LABEL_CONVENTIONS[release]
                                            for release in ("brats2018", "brats2019", "brats2020")}

#: How messages name each label convention (the key ``brats2021`` alone reads as if 2018-2020 differed).
LABEL_SET_NAMES: Dict[str, str] = {"brats2021": "BraTS 2018-2021", "brats2023": "BraTS 2023 GLI",
                                   "msd": "Decathlon Task01"}


def canonical_label_convention(name: str) -> str:
    """``brats2018``/``brats2019``/``brats2020`` -> ``brats2021``; any other name is returned unchanged."""
    return LABEL_CONVENTION_ALIASES.get(name, name)


def release_labels(convention: str) -> Tuple[int, ...]:
    """The label values allowed in segmentations of a release convention."""
    return tuple(sorted(RELEASE_TO_NNUNET[convention]))


def map_labels(seg: np.ndarray, mapping: Mapping[int, int]) -> np.ndarray:
    """Map label values with a lookup table. Values absent from ``mapping`` raise ValueError."""
    present = np.unique(seg)
    unknown = sorted(set(int(v) for v in present) - set(mapping))
    if unknown:
        raise ValueError(f"label values {unknown} are not in the allowed set {sorted(mapping)}")
    out = np.zeros(seg.shape, dtype=np.uint8)
    for src, dst in mapping.items():
        if dst != 0:
            out[seg == src] = dst
    return out


def nnunet_to_release(seg: np.ndarray, convention: str) -> np.ndarray:
    """Map nnU-Net labels (1 ED, 2 NCR, 3 ET) back to a release's labels."""
    inverse = {v: k for k, v in RELEASE_TO_NNUNET[convention].items()}
    return map_labels(seg, inverse)
