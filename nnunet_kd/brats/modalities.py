"""MRI modalities of BraTS: canonical names, the aliases of the releases, channels found by name, and the
subsets of modalities (the missing-modality combinations).

Modalities are always found by name (case-insensitive, with the aliases used by the BraTS releases --
``t1``/``t1ce`` up to BraTS 2021, ``t1n``/``t1c``/``t2w``/``t2f`` from BraTS 2023 -- and by the Medical
Segmentation Decathlon's Task01), never by a fixed channel index.
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, Mapping, Tuple

#: Canonical modality names, in the channel order the converter writes.
MODALITIES: Tuple[str, ...] = ("T1", "T1ce", "T2", "FLAIR")

MODALITY_ALIASES: Dict[str, Tuple[str, ...]] = {
    "T1": ("t1", "t1n", "t1w", "t1native", "native"),
    "T1ce": ("t1ce", "t1c", "t1gd", "t1post", "t1-ce", "t1_ce", "t1contrast"),
    "T2": ("t2", "t2w"),
    "FLAIR": ("flair", "t2f", "t2flair", "t2-flair"),
}
_ALIAS_TO_CANONICAL = {alias: name for name, aliases in MODALITY_ALIASES.items() for alias in aliases}

#: File-name token of each modality: BraTS 2018-2021 (``<case>_t1ce.nii.gz``) and the BraTS 2023+ cohorts
#: (``<case>-t1c.nii.gz``).
MODALITY_FILE_TOKENS: Dict[str, Dict[str, str]] = {
    "brats2021": {"T1": "t1", "T1ce": "t1ce", "T2": "t2", "FLAIR": "flair"},
    "brats2023": {"T1": "t1n", "T1ce": "t1c", "T2": "t2w", "FLAIR": "t2f"},
}


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
