"""Reading NIfTI images safely, and comparing image grids: the one implementation the package uses.

ITK silently zero-fills voxels missing from a cut-off ``.nii`` or ``.nii.gz``, so a file that
SimpleITK reads can still be incomplete. :func:`read_image` reads every voxel and then checks the
file against its header (:func:`incomplete_reason`).
"""
from __future__ import annotations

import gzip
import struct
import zlib
from typing import Optional, Tuple

import numpy as np
import SimpleITK as sitk


class NiftiError(ValueError):
    """An image file that cannot be read whole (unreadable, corrupt or truncated)."""


def incomplete_reason(path: str) -> Optional[str]:
    """Why a NIfTI file is truncated or corrupt, or None if it is complete (or not NIfTI).

    Decompresses the whole stream (gzip checks its CRC and end marker) and compares its length with
    what the header promises (vox_offset + voxels * bitpix / 8).
    """
    if not path.lower().endswith((".nii", ".nii.gz")):
        return None
    opener = gzip.open if path.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            header = f.read(540)
            total = len(header)
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                total += len(chunk)
    except (EOFError, OSError, zlib.error) as e:
        return f"corrupt or truncated ({e})"
    if len(header) < 348:
        return f"truncated header ({len(header)} bytes)"
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0]
        if sizeof_hdr == 348:  # NIfTI-1
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540 and len(header) == 540:  # NIfTI-2
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None  # not a header we know; SimpleITK already accepted the file
    ndim = max(1, min(int(dims[0]), 7))
    expected = max(vox_offset, 348) + int(np.prod([max(int(d), 1) for d in dims[1:ndim + 1]])) * bitpix // 8
    if total < expected:
        return f"truncated: {total} bytes of image data where the header needs {expected}"
    return None


def read_image(path: str) -> Tuple[sitk.Image, np.ndarray]:
    """``(image, array (z, y, x))`` with every voxel decoded; NiftiError naming the file otherwise.

    The message is ``cannot read {path}: {reason}``; callers prefix what the file is.
    """
    try:
        image = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(image)  # forces every voxel to be decoded
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in reversed(lines) if ln.strip()), "unreadable")
        raise NiftiError(f"cannot read {path}: {detail}") from None
    problem = incomplete_reason(str(path))
    if problem:
        raise NiftiError(f"cannot read {path}: {problem}")
    return image, array


Geometry = Tuple[Tuple[int, ...], np.ndarray, np.ndarray, np.ndarray]


def geometry(image: sitk.Image) -> Geometry:
    """``(size (x, y, z), spacing, origin, direction)`` of an image."""
    return (tuple(image.GetSize()), np.array(image.GetSpacing()), np.array(image.GetOrigin()),
            np.array(image.GetDirection()))


def grid_mismatch(image: sitk.Image, reference: sitk.Image, spacing_rtol: float = 1e-4,
                  origin_atol: Optional[float] = None, direction_atol: float = 1e-4,
                  origin_rtol: float = 0.0) -> Optional[str]:
    """What differs between two images' voxel grids (``"spacing (..) differs from (..)"``), or None.

    Compared in order: dimension, size, spacing (relative), origin (absolute, default 1e-4 of the
    reference's largest spacing and at least 1e-4 mm, plus ``origin_rtol`` relative) and direction
    (absolute).
    """
    if image.GetDimension() != reference.GetDimension():
        return f"dimension {image.GetDimension()}D differs from {reference.GetDimension()}D"
    size_r, sp_r, or_r, dir_r = geometry(reference)
    size, sp, org, dirc = geometry(image)
    if origin_atol is None:
        origin_atol = 1e-4 * float(max(sp_r.max(), 1.0))
    if size != size_r:
        return f"shape {size} differs from {size_r}"
    if not np.allclose(sp, sp_r, rtol=spacing_rtol, atol=1e-7):
        return f"spacing {tuple(sp)} differs from {tuple(sp_r)}"
    if not np.allclose(org, or_r, rtol=origin_rtol, atol=origin_atol):
        return f"origin {tuple(org)} differs from {tuple(or_r)}"
    if not np.allclose(dirc, dir_r, rtol=0, atol=direction_atol):
        return f"direction {tuple(dirc)} differs from {tuple(dir_r)}"
    return None
