"""BraTS conventions shared by the converter, the trainers and the evaluation.

Modalities are always found by name (case-insensitive, with the aliases used by
the BraTS releases and the Decathlon), never by a fixed channel index.
Labels inside nnU-Net follow nnU-Net's own BraTS convention:
1 = edema (ED), 2 = necrosis / non-enhancing core (NCR), 3 = enhancing tumour (ET).
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, Mapping, Tuple

import numpy as np

#: Canonical modality names, in the channel order the converter writes.
MODALITIES: Tuple[str, ...] = ("T1", "T1ce", "T2", "FLAIR")

MODALITY_ALIASES: Dict[str, Tuple[str, ...]] = {
    "T1": ("t1", "t1n", "t1w", "t1native", "native"),
    "T1ce": ("t1ce", "t1c", "t1gd", "t1post", "t1-ce", "t1_ce", "t1contrast"),
    "T2": ("t2", "t2w"),
    "FLAIR": ("flair", "t2f", "t2flair", "t2-flair"),
}
_ALIAS_TO_CANONICAL = {alias: name for name, aliases in MODALITY_ALIASES.items() for alias in aliases}

#: nnU-Net label values (nnU-Net's BraTS convention).
NNUNET_LABELS: Dict[str, int] = {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}

#: Region definitions in nnU-Net labels; the order is regions_class_order (1, 2, 3).
REGIONS: Dict[str, Tuple[int, ...]] = {"WT": (1, 2, 3), "TC": (2, 3), "ET": (3,)}

#: Release label value -> nnU-Net label value.
RELEASE_TO_NNUNET: Dict[str, Dict[int, int]] = {
    "brats2021": {0: 0, 1: 2, 2: 1, 4: 3},  # 2018-2021: 1 NCR, 2 ED, 4 ET
    "brats2023": {0: 0, 1: 2, 2: 1, 3: 3},  # 2023+ GLI: 1 NCR, 2 ED, 3 ET
    "msd": {0: 0, 1: 1, 2: 2, 3: 3},  # Task01: 1 edema, 2 non-enhancing, 3 enhancing
}

#: BraTS 2018, 2019 and 2020 share the 2021 label values, so the years users know are accepted as names of it.
LABEL_CONVENTION_ALIASES: Dict[str, str] = {"brats2018": "brats2021", "brats2019": "brats2021",
                                            "brats2020": "brats2021"}

#: How messages name each label convention (the key ``brats2021`` alone reads as if 2018-2020 differed).
LABEL_SET_NAMES: Dict[str, str] = {"brats2021": "BraTS 2018-2021", "brats2023": "BraTS 2023 GLI",
                                   "msd": "Decathlon Task01"}


def canonical_label_convention(name: str) -> str:
    """``brats2018``/``brats2019``/``brats2020`` -> ``brats2021``; any other name is returned unchanged."""
    return LABEL_CONVENTION_ALIASES.get(name, name)


def canonical_modality(name: str) -> str:
    """Return the canonical modality name (``T1``, ``T1ce``, ``T2``, ``FLAIR``) for ``name``.

    Raises ValueError naming the unknown modality and the accepted names.
    """
    key = str(name).strip().lower().replace(" ", "")
    if key in _ALIAS_TO_CANONICAL:
        return _ALIAS_TO_CANONICAL[key]
    accepted = ", ".join(f"{k} ({'/'.join(v)})" for k, v in MODALITY_ALIASES.items())
    raise ValueError(f"unknown MRI modality {name!r}; accepted names: {accepted}")


def channel_index(channel_names: Mapping[str, str], modality: str) -> int:
    """Index of ``modality`` in a dataset.json ``channel_names`` mapping, found by name with aliases."""
    wanted = canonical_modality(modality)
    matches = []
    for idx, name in channel_names.items():
        try:
            if canonical_modality(name) == wanted:
                matches.append(int(idx))
        except ValueError:
            continue
    if len(matches) != 1:
        raise ValueError(
            f"dataset.json channel_names {dict(channel_names)} has {len(matches)} channels for modality "
            f"{wanted!r}; exactly one is needed"
        )
    return matches[0]


def channel_indices(channel_names: Mapping[str, str], modalities: Iterable[str]) -> List[int]:
    """Indices of several modalities in ``channel_names``, in the order given."""
    return [channel_index(channel_names, m) for m in modalities]


def dataset_modalities(channel_names: Mapping[str, str]) -> List[str]:
    """Canonical modality names of all channels, in channel order."""
    return [canonical_modality(channel_names[k]) for k in sorted(channel_names, key=int)]


def channel_names_of(dataset_json: Mapping) -> Dict[int, str]:
    """``{channel index: name}`` from a dataset.json (``channel_names``, or the old ``modality`` key).

    The one place the package reads channel names; ValueError when the dataset.json has none.
    """
    names = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not names:
        raise ValueError("the dataset.json has no channel_names")
    return {int(k): str(v) for k, v in sorted(names.items(), key=lambda kv: int(kv[0]))}


def display_name(name: str) -> str:
    """Canonical modality name (T1, T1ce, T2, FLAIR) when ``name`` is a known alias, else ``name``."""
    try:
        return canonical_modality(name)
    except ValueError:
        return str(name)


def modality_label(channel_names: Mapping[int, str], channels: Iterable[int], sep: str = "+") -> str:
    """``T1ce+FLAIR`` style name of a set of channels (in channel order)."""
    return sep.join(display_name(channel_names[c]) for c in sorted(channels))


def modalities_text(channel_names: Mapping[int, str]) -> str:
    """``T1 (channel 0), T1ce (channel 1), ...`` for error messages."""
    return ", ".join(f"{display_name(n)} (channel {c})" for c, n in sorted(channel_names.items()))


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


def region_masks(seg: np.ndarray) -> Dict[str, np.ndarray]:
    """Boolean WT/TC/ET masks from a segmentation in nnU-Net labels."""
    return {name: np.isin(seg, members) for name, members in REGIONS.items()}


# --------------------------------------------------------------------------------------
# modality subsets (the missing-modality combinations)
# --------------------------------------------------------------------------------------
def all_modality_subsets(num_modalities: int = 4) -> List[Tuple[int, ...]]:
    """All ``2**M - 1`` non-empty subsets of ``range(M)``, ordered by size, then lexicographically.

    For M = 4: (0,), (1,), (2,), (3,), (0, 1), ..., (0, 1, 2, 3) -- 15 tuples.
    The order is stable so that evaluation tables line up across runs.
    """
    if num_modalities < 1:
        raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
    return [c for r in range(1, num_modalities + 1) for c in itertools.combinations(range(num_modalities), r)]


def modality_order(channel_names: Mapping[int, str]) -> List[int]:
    """Channels in the order the subsets refer to: T1, T1ce, T2, FLAIR when the dataset has them, else channel order."""
    try:
        if len(channel_names) == len(MODALITIES):
            return channel_indices({str(k): v for k, v in channel_names.items()}, MODALITIES)
    except ValueError:
        pass
    return sorted(channel_names)


def modality_combinations(channel_names: Mapping[int, str]) -> List[Tuple[str, List[int]]]:
    """``[(name, channels)]`` for every non-empty subset of the dataset's modalities, in
    :func:`all_modality_subsets` order, named like ``T1ce+FLAIR`` (channels sorted)."""
    order = modality_order(channel_names)
    out = []
    for subset in all_modality_subsets(len(order)):
        channels = [order[m] for m in subset]
        out.append(("+".join(display_name(channel_names[c]) for c in channels), sorted(channels)))
    return out
