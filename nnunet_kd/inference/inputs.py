"""The input files of a prediction when some MRI modalities are missing.

Input files keep their dataset channel numbers: with T1ce and FLAIR available (channels 1 and 3 of a
T1, T1ce, T2, FLAIR dataset) a case consists of ``CASE_0001.nii.gz`` and ``CASE_0003.nii.gz``. This
module finds the cases of a folder (or takes ``{case: {channel or modality name: file}}``), turns
modality names into channels (:mod:`nnunet_kd.brats` names and aliases) and picks, per case, the files
to use: those of the ``--available`` modalities, or every file present.
"""
from __future__ import annotations

import os
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from nnunet_kd.brats import canonical_modality, display_name, modalities_text, modality_label

FilesByChannel = Dict[int, str]
CasesInput = Union[str, Mapping[str, Union[Mapping[Union[int, str], str], Sequence[str]]]]


class PredictionError(ValueError):
    """Bad input to the prediction (model folder, modality names, missing files)."""


# --------------------------------------------------------------------------------------
# modality names -> channels
# --------------------------------------------------------------------------------------
def resolve_modality(name: Union[str, int], channel_names: Mapping[int, str]) -> int:
    """Channel index of a modality name (case-insensitive; BraTS aliases such as t1c, t2f work)."""
    if isinstance(name, (int, np.integer)):
        if int(name) in channel_names:
            return int(name)
        raise PredictionError(f"channel {name} is not in the model's dataset; it has {modalities_text(channel_names)}")
    key = str(name).strip()
    exact = [c for c, n in channel_names.items() if n.strip().lower() == key.lower()]
    if len(exact) == 1:
        return exact[0]
    try:
        wanted = canonical_modality(key)
    except ValueError:
        wanted = None
    if wanted is not None:
        matches = [c for c, n in channel_names.items() if display_name(n) == wanted]
        if len(matches) == 1:
            return matches[0]
    raise PredictionError(
        f"unknown modality {str(name)!r}: the model's dataset has {modalities_text(channel_names)}"
    )


def resolve_available(names: Optional[Sequence[Union[str, int]]],
                      channel_names: Mapping[int, str]) -> Optional[List[int]]:
    """Sorted channel indices of the named modalities; ``None`` stays ``None`` (infer per case).

    Names may also be comma separated (``T1ce,FLAIR``). An empty list is an error.
    """
    if names is None:
        return None
    if isinstance(names, (str, int)):
        names = [names]
    flat: List[Union[str, int]] = []
    for n in names:
        if isinstance(n, str):
            flat.extend(p for p in (s.strip() for s in n.split(",")) if p)
        else:
            flat.append(n)
    if not flat:
        raise PredictionError(
            f"--available needs at least one modality name; the model's dataset has "
            f"{modalities_text(channel_names)}"
        )
    return sorted({resolve_modality(n, channel_names) for n in flat})


# --------------------------------------------------------------------------------------
# input files
# --------------------------------------------------------------------------------------
def _channel_file_pattern(file_ending: str) -> "re.Pattern[str]":
    return re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending) + r"$")


def find_cases(input_folder: str, file_ending: str) -> Dict[str, FilesByChannel]:
    """``{case: {channel: path}}`` from the ``CASE_XXXX<file_ending>`` files of a folder."""
    if not os.path.isdir(input_folder):
        raise PredictionError(f"input folder {input_folder!r} does not exist or is not a folder")
    pattern = _channel_file_pattern(file_ending)
    cases: Dict[str, FilesByChannel] = {}
    for f in sorted(os.listdir(input_folder)):
        m = pattern.match(f)
        if m is None or not os.path.isfile(os.path.join(input_folder, f)):
            continue
        cases.setdefault(m.group("case"), {})[int(m.group("channel"))] = os.path.join(input_folder, f)
    if not cases:
        raise PredictionError(
            f"input folder {input_folder!r} contains no images named CASE_XXXX{file_ending} "
            f"(XXXX = the dataset's 4-digit channel number)"
        )
    return cases


def _channel_of_file(path: str, file_ending: str) -> int:
    m = _channel_file_pattern(file_ending).match(os.path.basename(path))
    if m is None:
        raise PredictionError(f"cannot tell the channel of {path!r}: expected a name like CASE_0001{file_ending}")
    return int(m.group("channel"))


def normalize_cases(input_folder_or_cases: CasesInput, channel_names: Mapping[int, str],
                    file_ending: str) -> Dict[str, FilesByChannel]:
    """Turn a folder or ``{case: {channel or modality name: path} | [paths]}`` into ``{case: {channel: path}}``."""
    if isinstance(input_folder_or_cases, (str, os.PathLike)):
        cases = find_cases(os.fspath(input_folder_or_cases), file_ending)
    elif isinstance(input_folder_or_cases, Mapping):
        cases = {}
        for case, files in input_folder_or_cases.items():
            if isinstance(files, Mapping):
                cases[str(case)] = {resolve_modality(k if not (isinstance(k, str) and k.isdigit()) else int(k),
                                                     channel_names): os.fspath(v) for k, v in files.items()}
            else:
                cases[str(case)] = {_channel_of_file(os.fspath(p), file_ending): os.fspath(p) for p in files}
    else:
        raise PredictionError("input must be a folder or a mapping {case: {channel: file}}")
    if not cases:
        raise PredictionError("no cases to predict")
    for case, files in cases.items():
        extra = sorted(set(files) - set(channel_names))
        if extra:
            raise PredictionError(
                f"case {case}: file {os.path.basename(files[extra[0]])!r} has channel {extra[0]:04d}, but the model's "
                f"dataset has only {modalities_text(channel_names)}"
            )
    return cases


def select_available_files(cases: Mapping[str, FilesByChannel], available: Optional[Sequence[int]],
                           channel_names: Mapping[int, str], file_ending: str,
                           log: Optional[Callable[[str], None]] = print) -> Dict[str, FilesByChannel]:
    """Per case, the files to use: those of ``available`` (all required), or every file present when ``None``."""
    selected: Dict[str, FilesByChannel] = {}
    for case in sorted(cases):
        files = cases[case]
        if not files:
            raise PredictionError(
                f"case {case} has no modality file; expected at least one of "
                + ", ".join(f"{case}_{c:04d}{file_ending} ({display_name(n)})" for c, n in channel_names.items())
            )
        if available is None:
            chosen = dict(sorted(files.items()))
            if log is not None:
                missing = [c for c in channel_names if c not in chosen]
                log(f"case {case}: available modalities inferred from the files present: "
                    f"{modality_label(channel_names, chosen, ', ')}"
                    + (f" (missing, zero-filled: {modality_label(channel_names, missing, ', ')})" if missing else ""))
        else:
            absent = [c for c in available if c not in files]
            if absent:
                folder = os.path.dirname(next(iter(files.values())))
                expected = [os.path.join(folder, f"{case}_{c:04d}{file_ending}") for c in absent]
                raise PredictionError(
                    f"case {case}: missing file for available modality "
                    + ", ".join(f"{display_name(channel_names[c])} (expected {e})" for c, e in zip(absent, expected))
                )
            chosen = {c: files[c] for c in available}
            ignored = sorted(set(files) - set(available))
            if ignored and log is not None:
                log(f"case {case}: ignoring files of modalities not in --available: "
                    + ", ".join(f"{display_name(channel_names[c])} ({os.path.basename(files[c])})" for c in ignored))
        selected[case] = chosen
    return selected
