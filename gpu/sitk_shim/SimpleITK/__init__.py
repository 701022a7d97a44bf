"""A stand-in for SimpleITK on the lent GPU machine, which lacks it (its wheel, about 53 MB, does not fit the
64 MiB that travels beside the data): the few calls that nnU-Net 2.8.1 (``SimpleITKIO``), MedPy and nnunet_kd
make on 3-D NIfTI files, done with nibabel, in SimpleITK's conventions:

- arrays in (z, y, x) order, as ``GetArrayFromImage`` gives them, in the file's own data type;
- spacing, origin and direction in ITK's LPS world coordinates (NIfTI stores RAS: x and y flip sign);
- spacing from ``pixdim``, direction from the sform or qform (they must agree where both are set).

Anything else fails loudly: other file formats, 2-D/4-D or vector images, scaled voxel values
(``scl_slope``/``scl_inter``), files whose sform and qform disagree or whose affine does not match ``pixdim``,
unsupported pixel types, and every SimpleITK function or method not defined here (NotImplementedError naming
it). ``tests/gpu/test_sitk_shim.py`` checks it against the real SimpleITK on real BraTS cases.

Put ``gpu/sitk_shim`` on ``PYTHONPATH`` only where the real SimpleITK is missing (``gpu/run_on_gpu.sh`` does).
"""
from __future__ import annotations

import os
from typing import Any, Sequence, Tuple

import numpy as np

#: Lets a program (and gpu/run_on_gpu.sh) tell this stand-in from the real SimpleITK.
NIBABEL_SHIM = True
__version__ = "0+nibabel-shim"

sitkUnknown = -1
_LPS = np.diag([-1.0, -1.0, 1.0])  # RAS <-> LPS (its own inverse)
_DTYPES = tuple(np.dtype(t) for t in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64,
                                       np.int64, np.float32, np.float64))
_ATOL = 1e-4  # mm, and for direction cosines


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"SimpleITK stand-in (gpu/sitk_shim, nibabel): {what} is not supported; "
                               f"install the real SimpleITK for this")


def _nifti_path(path: Any, what: str) -> str:
    path = os.fspath(path)
    if not path.lower().endswith((".nii", ".nii.gz")):
        raise _unsupported(f"{what} of {path!r} (only .nii and .nii.gz)")
    return path


def _check_dtype(dtype: np.dtype, where: str) -> None:
    if np.dtype(dtype) not in _DTYPES:
        raise _unsupported(f"pixel type {np.dtype(dtype)} ({where})")


class Image:
    """A 3-D scalar image: a (z, y, x) array plus ITK geometry. Made by ReadImage or GetImageFromArray."""

    def __init__(self, *args: Any) -> None:
        if args:
            raise _unsupported("Image(...) with arguments (use GetImageFromArray)")
        self._array = np.zeros((1, 1, 1), np.uint8)
        self._spacing: Tuple[float, ...] = (1.0, 1.0, 1.0)
        self._origin: Tuple[float, ...] = (0.0, 0.0, 0.0)
        self._direction: Tuple[float, ...] = tuple(float(v) for v in np.eye(3).ravel())

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise _unsupported(f"Image.{name}")

    def GetDimension(self) -> int:
        return 3

    def GetSize(self) -> Tuple[int, ...]:
        return tuple(int(s) for s in self._array.shape[::-1])

    def GetNumberOfComponentsPerPixel(self) -> int:
        return 1

    def GetSpacing(self) -> Tuple[float, ...]:
        return self._spacing

    def SetSpacing(self, spacing: Sequence[float]) -> None:
        values = tuple(float(s) for s in spacing)
        if len(values) != 3 or min(values) <= 0:
            raise RuntimeError(f"SetSpacing: need 3 positive values, got {values}")
        self._spacing = values

    def GetOrigin(self) -> Tuple[float, ...]:
        return self._origin

    def SetOrigin(self, origin: Sequence[float]) -> None:
        values = tuple(float(o) for o in origin)
        if len(values) != 3:
            raise RuntimeError(f"SetOrigin: need 3 values, got {values}")
        self._origin = values

    def GetDirection(self) -> Tuple[float, ...]:
        return self._direction

    def SetDirection(self, direction: Sequence[float]) -> None:
        values = tuple(float(d) for d in direction)
        if len(values) != 9:
            raise RuntimeError(f"SetDirection: need 9 values, got {len(values)}")
        if abs(abs(np.linalg.det(np.reshape(values, (3, 3)))) - 1) > 1e-3:
            raise RuntimeError(f"SetDirection: {values} is not a rotation (ITK refuses a singular direction)")
        self._direction = values

    def CopyInformation(self, other: "Image") -> None:
        if not isinstance(other, Image):
            raise _unsupported(f"CopyInformation from {type(other).__name__}")
        if other.GetSize() != self.GetSize():
            raise RuntimeError(f"CopyInformation: size {other.GetSize()} differs from {self.GetSize()}")
        self._spacing, self._origin, self._direction = other._spacing, other._origin, other._direction


def GetImageFromArray(arr: Any, isVector: bool = False) -> Image:
    """A copy of a (z, y, x) array as an image (spacing 1, origin 0, identity direction)."""
    if isVector:
        raise _unsupported("GetImageFromArray(isVector=True)")
    array = np.asarray(arr)
    if array.ndim != 3:
        raise _unsupported(f"a {array.ndim}-D array in GetImageFromArray (3-D only)")
    _check_dtype(array.dtype, "GetImageFromArray")
    image = Image()
    image._array = np.array(array, copy=True, order="C")
    return image


def GetArrayFromImage(image: Image) -> np.ndarray:
    """A copy of the image's voxels, (z, y, x)."""
    if not isinstance(image, Image):
        raise _unsupported(f"GetArrayFromImage of {type(image).__name__}")
    return image._array.copy()


def _affine_of(header: Any, path: str) -> np.ndarray:
    """The one voxel-to-RAS affine of a header: sform and qform, where both are set, must agree."""
    sform, scode = header.get_sform(coded=True)
    qform, qcode = header.get_qform(coded=True)
    if sform is not None and qform is not None and not np.allclose(sform, qform, rtol=0, atol=_ATOL):
        raise _unsupported(f"{path}: sform (code {scode}) and qform (code {qcode}) disagree (ITK picks one by "
                           f"rules this stand-in does not copy)")
    affine = sform if sform is not None else qform
    if affine is None:
        raise _unsupported(f"{path}: neither sform nor qform is set")
    return np.asarray(affine, dtype=np.float64)


def ReadImage(fileName: Any, outputPixelType: int = sitkUnknown, imageIO: str = "") -> Image:
    """A 3-D scalar NIfTI file, as SimpleITK reads it; RuntimeError where the file cannot be read."""
    import nibabel

    path = _nifti_path(fileName, "ReadImage")
    if outputPixelType != sitkUnknown or imageIO:
        raise _unsupported("ReadImage with outputPixelType or imageIO")
    try:
        nii = nibabel.load(path)
        header = nii.header
        if not isinstance(nii, (nibabel.Nifti1Image, nibabel.Nifti2Image)):
            raise _unsupported(f"{path}: {type(nii).__name__} (NIfTI-1/2 only)")
        if len(nii.shape) != 3:
            raise _unsupported(f"{path}: a {len(nii.shape)}-D image (3-D only)")
        if int(header["intent_code"]) != 0:
            raise _unsupported(f"{path}: intent code {int(header['intent_code'])}")
        # nibabel moves the header's scl_slope/scl_inter onto the array proxy (the image's header then says nan)
        slope, inter = (float(getattr(nii.dataobj, k)) for k in ("slope", "inter"))
        if not (np.isnan(slope) or slope in (0.0, 1.0)) or not (np.isnan(inter) or inter == 0.0):
            raise _unsupported(f"{path}: scaled voxel values (scl_slope {slope}, scl_inter {inter})")
        _check_dtype(header.get_data_dtype(), path)
        affine = _affine_of(header, path)
        spacing = np.array([float(z) for z in header.get_zooms()[:3]])
        norms = np.linalg.norm(affine[:3, :3], axis=0)
        if np.any(spacing <= 0) or not np.allclose(norms, spacing, rtol=1e-4, atol=0):
            raise _unsupported(f"{path}: affine column lengths {tuple(norms)} differ from pixdim {tuple(spacing)}")
        data = np.asanyarray(nii.dataobj)  # every voxel decoded (a truncated file fails here)
    except NotImplementedError:
        raise
    except Exception as e:  # noqa: BLE001 - SimpleITK raises RuntimeError for every unreadable file
        raise RuntimeError(f"Exception thrown in SimpleITK ReadImage (stand-in): {path}: {e}") from None
    if data.dtype != header.get_data_dtype().newbyteorder("="):
        data = data.astype(header.get_data_dtype().newbyteorder("="))
    image = Image()
    image._array = np.ascontiguousarray(data.transpose(2, 1, 0))
    image._spacing = tuple(float(s) for s in spacing)
    image._origin = tuple(float(o) for o in _LPS @ affine[:3, 3])
    image._direction = tuple(float(d) for d in (_LPS @ (affine[:3, :3] / spacing)).ravel())
    return image


def WriteImage(image: Image, fileName: Any, useCompression: bool = False, compressionLevel: int = -1,
               imageIO: str = "", compressor: str = "") -> None:
    """Writes a NIfTI-1 file (gzip by the name's ``.gz``), sform and qform both set (code 1), as ITK does."""
    import nibabel

    path = _nifti_path(fileName, "WriteImage")
    if not isinstance(image, Image):
        raise _unsupported(f"WriteImage of {type(image).__name__}")
    if imageIO or compressor:
        raise _unsupported("WriteImage with imageIO or compressor")
    spacing = np.array(image._spacing)
    affine = np.eye(4)
    affine[:3, :3] = (_LPS @ np.reshape(image._direction, (3, 3))) * spacing
    affine[:3, 3] = _LPS @ np.array(image._origin)
    nii = nibabel.Nifti1Image(image._array.transpose(2, 1, 0), affine)
    nii.header.set_data_dtype(image._array.dtype)
    nii.header.set_zooms(tuple(float(s) for s in spacing))
    nii.set_sform(affine, code=1)
    nii.set_qform(affine, code=1)
    nii.header.set_xyzt_units("mm", "sec")
    try:
        nibabel.save(nii, path)
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"Exception thrown in SimpleITK WriteImage (stand-in): {path}: {e}") from None


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    raise _unsupported(f"SimpleITK.{name}")
