"""gpu/sitk_shim (the nibabel stand-in for SimpleITK on the lent GPU machine) against the real SimpleITK, on real
BraTS 2018 cases at 2 mm: same arrays, types, spacing, origin, direction and labels, both ways round, and loud
failures for what it does not support."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

sitk = pytest.importorskip("SimpleITK")
nibabel = pytest.importorskip("nibabel")

SHIM_FILE = Path(__file__).resolve().parents[2] / "gpu" / "sitk_shim" / "SimpleITK" / "__init__.py"
CASE = "Brats18_CBICA_ABM_1"


@pytest.fixture(scope="module")
def shim():
    spec = importlib.util.spec_from_file_location("sitk_shim_under_test", SHIM_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.NIBABEL_SHIM and not hasattr(sitk, "NIBABEL_SHIM")
    return module


def _same(shim_image, real_image) -> None:
    a, b = shim_image, real_image
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-6)
    assert all(isinstance(v, float) for v in a.GetSpacing() + a.GetOrigin() + a.GetDirection())


def _files(real_brats2018: Path):
    files = sorted((real_brats2018 / CASE).glob("*.nii.gz"))
    assert len(files) == 5
    return files


def test_reads_like_simpleitk(shim, real_brats2018):
    for f in _files(real_brats2018):
        mine, real = shim.ReadImage(str(f)), sitk.ReadImage(str(f))
        _same(mine, real)
        a, b = shim.GetArrayFromImage(mine), sitk.GetArrayFromImage(real)
        assert a.dtype == b.dtype and a.shape == b.shape and a.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(a, b)
        if f.name.endswith("_seg.nii.gz"):
            assert set(np.unique(a)) <= {0, 1, 2, 4} and a.any()


def test_written_files_read_alike(shim, real_brats2018, tmp_path):
    seg = next(f for f in _files(real_brats2018) if f.name.endswith("_seg.nii.gz"))
    real_ref = sitk.ReadImage(str(seg))
    labels = sitk.GetArrayFromImage(real_ref).astype(np.uint8)
    labels[labels == 4] = 3
    # written by the stand-in as nnU-Net's SimpleITKIO.write_seg does, read by both
    out = shim.GetImageFromArray(labels)
    out.SetSpacing(real_ref.GetSpacing())
    out.SetOrigin(real_ref.GetOrigin())
    out.SetDirection(real_ref.GetDirection())
    shim.WriteImage(out, str(tmp_path / "shim.nii.gz"), True)
    back_real, back_shim = sitk.ReadImage(str(tmp_path / "shim.nii.gz")), shim.ReadImage(str(tmp_path / "shim.nii.gz"))
    _same(back_shim, back_real)
    _same(back_shim, real_ref)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back_real), labels)
    assert sitk.GetArrayFromImage(back_real).dtype == np.uint8
    # written by SimpleITK (CopyInformation, as the converter does), read by the stand-in
    real_out = sitk.GetImageFromArray(labels.astype(np.int16))
    real_out.CopyInformation(real_ref)
    sitk.WriteImage(real_out, str(tmp_path / "real.nii.gz"), True)
    mine = shim.ReadImage(str(tmp_path / "real.nii.gz"))
    _same(mine, real_out)
    assert shim.GetArrayFromImage(mine).dtype == np.int16
    np.testing.assert_array_equal(shim.GetArrayFromImage(mine), labels)
    # CopyInformation in the stand-in
    copy = shim.GetImageFromArray(labels)
    copy.CopyInformation(shim.ReadImage(str(seg)))
    _same(copy, real_ref)


def test_fails_loudly(shim, real_brats2018, tmp_path):
    f = str(_files(real_brats2018)[0])
    with pytest.raises(NotImplementedError, match="DICOMOrient"):
        shim.DICOMOrient(shim.ReadImage(f), "RAS")
    with pytest.raises(NotImplementedError, match="Image.GetPixelIDValue"):
        shim.ReadImage(f).GetPixelIDValue()
    with pytest.raises(NotImplementedError, match="only .nii"):
        shim.ReadImage(str(tmp_path / "x.mha"))
    with pytest.raises(NotImplementedError, match="4-D"):
        shim.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32))
    with pytest.raises(NotImplementedError, match="bool"):
        shim.GetImageFromArray(np.zeros((2, 3, 4), bool))
    with pytest.raises(RuntimeError, match="ReadImage"):
        shim.ReadImage(str(tmp_path / "missing.nii.gz"))
    nii = nibabel.load(f)
    four_d = nibabel.Nifti1Image(np.zeros((3, 4, 5, 2), np.int16), nii.affine)
    nibabel.save(four_d, str(tmp_path / "4d.nii.gz"))
    with pytest.raises(NotImplementedError, match="4-D"):
        shim.ReadImage(str(tmp_path / "4d.nii.gz"))
    nibabel.save(nibabel.Nifti1Image(np.asanyarray(nii.dataobj), nii.affine, nii.header), str(tmp_path / "s.nii"))
    raw = bytearray((tmp_path / "s.nii").read_bytes())
    endian = nibabel.load(str(tmp_path / "s.nii")).header.endianness
    raw[112:120] = np.array([2.0, 1.0], endian + "f4").tobytes()  # scl_slope, scl_inter (nibabel's writer resets them)
    (tmp_path / "scaled.nii").write_bytes(bytes(raw))
    assert float(sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "scaled.nii"))).max()) > 1
    with pytest.raises(NotImplementedError, match="scaled"):
        shim.ReadImage(str(tmp_path / "scaled.nii"))
    skewed = nibabel.Nifti1Image(np.asanyarray(nii.dataobj), nii.affine, nii.header)
    moved = nii.affine.copy()
    moved[0, 3] += 5
    skewed.set_sform(moved, code=1)
    nibabel.save(skewed, str(tmp_path / "disagree.nii.gz"))
    with pytest.raises(NotImplementedError, match="disagree"):
        shim.ReadImage(str(tmp_path / "disagree.nii.gz"))
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(Path(f).read_bytes()[:20000])
    with pytest.raises(RuntimeError, match="ReadImage"):
        shim.ReadImage(str(truncated))
