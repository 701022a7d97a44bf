"""nnU-Net's preprocessing of a case of which only some modalities exist.

The available channels are read and preprocessed exactly as nnU-Net does it; the missing channels get an
all-zero placeholder before preprocessing (zeros never change nnU-Net's crop to the nonzero region, which
is the union over channels) and are set to exactly 0 after normalisation and resampling -- what the MGSD
trainer feeds the network for a missing modality during training. Nothing is written to disk.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterable, Mapping, Optional

import numpy as np

from nnunet_kd.brats import channel_names_of
from nnunet_kd.inference.inputs import PredictionError
from nnunet_kd.nifti import incomplete_reason


def zero_fill_missing(data, missing_channels: Iterable[int], channel_axis: int = 0):
    """A copy of ``data`` (numpy array or torch tensor) with the ``missing_channels`` set to exactly 0.

    ``data`` has its channels on ``channel_axis`` (default 0: ``(C, *spatial)``). The other channels are
    bit-identical copies. Same type, dtype and device as the input.
    """
    missing = sorted({int(c) for c in missing_channels})
    n = data.shape[channel_axis]
    if any(not 0 <= c < n for c in missing):
        raise PredictionError(f"missing channels {missing} out of range for {n} channels")
    try:
        import torch
    except ImportError:  # pragma: no cover
        torch = None
    if torch is not None and isinstance(data, torch.Tensor):
        out = data.clone()
    else:
        out = np.array(data, copy=True)
    if missing:
        index = [slice(None)] * out.ndim
        index[channel_axis] = missing
        out[tuple(index)] = 0
    return out


def read_case_with_placeholders(predictor, files_by_channel: Mapping[int, str], case: Optional[str] = None):
    """Read the available channel images; return ``(data (C, z, y, x) with zeros for missing channels, properties)``.

    Every file is checked for completeness first (ITK would zero-fill a truncated file silently).
    """
    num_channels = len(channel_names_of(predictor.dataset_json))
    what = f"case {case}" if case else "case"
    channels = sorted(int(c) for c in files_by_channel)
    if not channels:
        raise PredictionError(f"{what} has no modality file")
    if any(not 0 <= c < num_channels for c in channels):
        raise PredictionError(f"{what}: channels {channels} out of range for a {num_channels}-channel model")
    files = [files_by_channel[c] for c in channels]
    for f in files:
        if not os.path.isfile(f):
            raise PredictionError(f"{what}: file {f!r} does not exist")
        problem = incomplete_reason(str(f))
        if problem:
            raise PredictionError(f"{what}: cannot read {f}: {problem}")
    rw = predictor.plans_manager.image_reader_writer_class()
    try:
        with contextlib.redirect_stdout(sys.stderr):  # nnU-Net prints its geometry complaints
            images, properties = rw.read_images(files)
    except RuntimeError as e:
        raise PredictionError(
            f"{what}: cannot read {', '.join(map(os.path.basename, files))}: "
            f"{str(e).strip() or 'the images differ in shape or spacing'}"
        ) from None
    if images.shape[0] != len(channels):
        raise PredictionError(f"{what}: expected one 3D image per file, got {images.shape[0]} channels "
                              f"from {len(files)} file(s)")
    data = np.zeros((num_channels, *images.shape[1:]), dtype=images.dtype)
    data[channels] = images
    return data, properties


def preprocess_case_with_missing(predictor, files_by_channel: Mapping[int, str], case: Optional[str] = None):
    """Preprocess one case from the files of its available channels; ``(data float32 (C, ...), properties)``.

    Missing channels enter nnU-Net's preprocessing as all-zero images (which leaves the crop to the
    nonzero region, the union over channels, unchanged) and are set to exactly 0 afterwards, i.e. after
    normalisation and resampling, as in MGSD training.
    """
    data, properties = read_case_with_placeholders(predictor, files_by_channel, case)
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    data, _, properties = preprocessor.run_case_npy(data, None, properties, predictor.plans_manager,
                                                   predictor.configuration_manager, predictor.dataset_json)
    present = {int(k) for k in files_by_channel}
    data = zero_fill_missing(data, [c for c in range(data.shape[0]) if c not in present])
    return np.ascontiguousarray(data, dtype=np.float32), properties
