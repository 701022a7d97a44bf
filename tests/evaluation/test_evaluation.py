"""Tests of nnunet_kd.evaluation (metrics, evaluate, plots): known values, an independent cross-check, the CLI end to end."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

sitk = pytest.importorskip("SimpleITK")

from nnunet_kd.evaluation import evaluate_cli  # noqa: E402
from nnunet_kd.evaluation.evaluate import evaluate_case, evaluate_folders  # noqa: E402
from nnunet_kd.evaluation.metrics import (BRATS_HD95_PENALTY, EvaluationError, mean_metrics,  # noqa: E402
                                          region_metrics)
from nnunet_kd.evaluation.plots import plot_region_boxplots  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
REGION_NAMES = ["WT", "TC", "ET"]


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
def write_nifti(path, array, spacing_zyx=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None):
    """Write ``array`` (z, y, x) with spacing given in array axis order."""
    img = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    img.SetOrigin(origin)
    if direction is not None:
        img.SetDirection(direction)
    sitk.WriteImage(img, str(path))
    return str(path)


def run_cli(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "nnunet_kd.evaluation.evaluate_cli", *map(str, args)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )


def box(shape, lo, hi):
    m = np.zeros(shape, dtype=bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


# Independent reference implementation (no medpy). It follows medpy 0.5.2's definition:
# surface = mask XOR binary_erosion(mask, connectivity-1 structure, border 0); the distances
# from each surface voxel of one mask to the nearest surface voxel of the other come from
# distance_transform_edt(~other_surface, sampling=spacing); HD95 is the 95th percentile of the
# POOLED distances of both directions (medpy 0.5.2: np.percentile(np.hstack((hd1, hd2)), 95)).
def ref_dice(a, b):
    a, b = a.astype(bool), b.astype(bool)
    sa, sb = set(zip(*np.nonzero(a))), set(zip(*np.nonzero(b)))
    if not sa and not sb:
        return 1.0
    return 2.0 * len(sa & sb) / (len(sa) + len(sb))


def _surface(mask):
    struct = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=struct, iterations=1, border_value=0)


def ref_hd95(a, b, spacing):
    a, b = a.astype(bool), b.astype(bool)
    if not a.any() and not b.any():
        return 0.0
    if a.any() != b.any():
        return BRATS_HD95_PENALTY
    sa, sb = _surface(a), _surface(b)
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return float(np.percentile(np.concatenate([d_ab, d_ba]), 95))


def random_blob(rng, shape, threshold):
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(1.5, 3.0))
    return noise > threshold * noise.std()


def random_labels(rng, shape):
    """Nested random blobs in nnU-Net labels: WT blob with TC and ET inside, plus stray spots."""
    seg = np.zeros(shape, dtype=np.uint8)
    wt = random_blob(rng, shape, rng.uniform(0.3, 1.2))
    tc = wt & random_blob(rng, shape, rng.uniform(0.0, 1.0))
    et = tc & random_blob(rng, shape, rng.uniform(0.0, 1.0))
    seg[wt] = 1
    seg[tc] = 2
    seg[et] = 3
    return seg


# --------------------------------------------------------------------------------------
# known values
# --------------------------------------------------------------------------------------
def test_dice_two_overlapping_boxes():
    shape = (30, 30, 30)
    a = box(shape, (5, 5, 5), (15, 15, 15))  # 1000 voxels
    b = box(shape, (10, 5, 5), (20, 15, 15))  # 1000 voxels, 500 shared
    seg_a = a.astype(np.uint8) * 3
    seg_b = b.astype(np.uint8) * 3
    m = region_metrics(seg_a, seg_b, (1.0, 1.0, 1.0))
    for r in REGION_NAMES:
        assert m[r]["dice"] == pytest.approx(0.5)
    # different overlaps per region: WT = everything, ET only in a corner
    seg_a2 = seg_a.copy()
    seg_a2[seg_a2 == 3] = 1
    m2 = region_metrics(seg_a2, seg_b, (1.0, 1.0, 1.0))
    assert m2["WT"]["dice"] == pytest.approx(0.5)
    assert m2["TC"]["dice"] == 0.0 and m2["ET"]["dice"] == 0.0
    assert m2["TC"]["hd95"] == BRATS_HD95_PENALTY


@pytest.mark.parametrize("axis,spacing", [(0, (2.5, 1.0, 0.7)), (1, (1.0, 3.0, 0.7)), (2, (1.0, 0.7, 2.5))])
@pytest.mark.parametrize("k", [1, 3])
def test_hd95_shifted_slabs_anisotropic(axis, spacing, k):
    # one-voxel-thick slabs: every surface voxel lies exactly k voxels from its partner
    shape = [20, 20, 20]
    lo, hi = [4, 4, 4], [14, 14, 14]
    lo[axis], hi[axis] = 5, 6
    a = box(shape, lo, hi)
    lo[axis], hi[axis] = 5 + k, 6 + k
    b = box(shape, lo, hi)
    m = region_metrics(a.astype(np.uint8), b.astype(np.uint8), spacing)
    assert m["WT"]["hd95"] == pytest.approx(k * spacing[axis])
    assert m["WT"]["dice"] == 0.0
    assert m["TC"] == {"dice": 1.0, "hd95": 0.0}


def test_hd95_single_voxels_and_identity():
    shape = (10, 10, 10)
    a = np.zeros(shape, np.uint8)
    b = np.zeros(shape, np.uint8)
    a[2, 3, 4] = 3
    b[5, 7, 4] = 3
    spacing = (2.0, 0.5, 1.0)
    m = region_metrics(a, b, spacing)
    expected = np.hypot(3 * 2.0, 4 * 0.5)
    for r in REGION_NAMES:
        assert m[r]["hd95"] == pytest.approx(expected)
    same = region_metrics(a, a, spacing)
    for r in REGION_NAMES:
        assert same[r] == {"dice": 1.0, "hd95": 0.0}


def test_empty_conventions():
    shape = (8, 8, 8)
    empty = np.zeros(shape, np.uint8)
    full = np.zeros(shape, np.uint8)
    full[2:5, 2:5, 2:5] = 1  # edema only: WT non-empty, TC and ET empty
    both_empty = region_metrics(empty, empty, (1, 1, 1))
    for r in REGION_NAMES:
        assert both_empty[r] == {"dice": 1.0, "hd95": 0.0}
    for pred, ref in ((empty, full), (full, empty)):
        m = region_metrics(pred, ref, (1, 1, 1))
        assert m["WT"] == {"dice": 0.0, "hd95": BRATS_HD95_PENALTY}
        assert m["TC"] == {"dice": 1.0, "hd95": 0.0}
        assert m["ET"] == {"dice": 1.0, "hd95": 0.0}
    assert BRATS_HD95_PENALTY == 373.13


def test_region_metrics_input_checks():
    with pytest.raises(EvaluationError, match="shape"):
        region_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
    with pytest.raises(EvaluationError, match="spacing"):
        region_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 1))


def test_label_conventions(tmp_path):
    shape = (12, 12, 12)
    # nnU-Net labels of the reference: ED ring, NCR, ET
    nn = np.zeros(shape, np.uint8)
    nn[2:10, 2:10, 2:10] = 1
    nn[4:8, 4:8, 4:8] = 2
    nn[5:7, 5:7, 5:7] = 3
    b21 = np.select([nn == 1, nn == 2, nn == 3], [2, 1, 4], 0).astype(np.uint8)
    b23 = np.select([nn == 1, nn == 2, nn == 3], [2, 1, 3], 0).astype(np.uint8)
    pred_nn = nn.copy()
    pred_nn[pred_nn == 3] = 2  # prediction misses ET entirely
    pred21 = np.select([pred_nn == 1, pred_nn == 2, pred_nn == 3], [2, 1, 4], 0).astype(np.uint8)
    pred23 = np.select([pred_nn == 1, pred_nn == 2, pred_nn == 3], [2, 1, 3], 0).astype(np.uint8)
    expected = region_metrics(pred_nn, nn, (1.0, 1.0, 1.0))
    assert expected["ET"] == {"dice": 0.0, "hd95": BRATS_HD95_PENALTY}
    assert expected["WT"] == {"dice": 1.0, "hd95": 0.0}
    for labels, ref, pred in (("nnunet", nn, pred_nn), ("brats2021", b21, pred21), ("brats2023", b23, pred23)):
        r = write_nifti(tmp_path / f"ref_{labels}.nii.gz", ref)
        p = write_nifti(tmp_path / f"pred_{labels}.nii.gz", pred)
        assert evaluate_case(p, r, labels=labels) == expected
    # brats2021: label 4 is ET; the nnunet reading of the same file must reject 4
    r21 = str(tmp_path / "ref_brats2021.nii.gz")
    with pytest.raises(EvaluationError, match=r"\[4\]"):
        evaluate_case(r21, r21, labels="nnunet")
    # brats2021 has no label 3
    r23 = str(tmp_path / "ref_brats2023.nii.gz")
    with pytest.raises(EvaluationError, match=r"\[3\]"):
        evaluate_case(r23, r23, labels="brats2021")
    with pytest.raises(EvaluationError, match="unknown label convention"):
        evaluate_case(r23, r23, labels="brats2019")


def test_spacing_axis_order_from_nifti(tmp_path):
    shape = (16, 16, 16)
    a = box(shape, (4, 3, 3), (5, 12, 12)).astype(np.uint8)
    b = box(shape, (6, 3, 3), (7, 12, 12)).astype(np.uint8)
    spacing_zyx = (2.5, 1.0, 0.7)  # SimpleITK gets (0.7, 1.0, 2.5)
    r = write_nifti(tmp_path / "r.nii.gz", a, spacing_zyx)
    p = write_nifti(tmp_path / "p.nii.gz", b, spacing_zyx)
    assert sitk.ReadImage(r).GetSpacing() == pytest.approx((0.7, 1.0, 2.5))
    m = evaluate_case(p, r)
    assert m["WT"]["hd95"] == pytest.approx(2 * 2.5)


# --------------------------------------------------------------------------------------
# independent cross-check on random masks
# --------------------------------------------------------------------------------------
def test_cross_check_random_masks():
    rng = np.random.default_rng(1234)
    shapes = [(20, 24, 16), (12, 30, 18), (25, 15, 20), (16, 16, 16)]
    spacings = [(1.0, 0.7, 2.5), (2.5, 1.0, 0.7), (1.0, 1.0, 1.0), (0.5, 1.2, 3.0)]
    n_nonzero_hd = 0
    n_partial_dice = 0
    for i in range(20):
        shape = shapes[i % len(shapes)]
        spacing = spacings[(i // len(shapes)) % len(spacings)]
        pred = random_labels(rng, shape)
        ref = random_labels(rng, shape)
        if i == 7:
            pred[:] = 0  # force an empty prediction
        m = region_metrics(pred, ref, spacing)
        for name, members in (("WT", (1, 2, 3)), ("TC", (2, 3)), ("ET", (3,))):
            pm, rm = np.isin(pred, members), np.isin(ref, members)
            d, h = ref_dice(pm, rm), ref_hd95(pm, rm, spacing)
            assert np.isclose(m[name]["dice"], d), (i, name, m[name]["dice"], d)
            assert np.isclose(m[name]["hd95"], h), (i, name, m[name]["hd95"], h)
            assert type(m[name]["dice"]) is float and type(m[name]["hd95"]) is float
            n_nonzero_hd += 0 < h < BRATS_HD95_PENALTY
            n_partial_dice += 0 < d < 1
    # the random masks must actually exercise the non-trivial paths
    assert n_nonzero_hd >= 30 and n_partial_dice >= 30


def test_mean_metrics():
    cases = {
        "a": {r: {"dice": 1.0, "hd95": 0.0} for r in REGION_NAMES},
        "b": {r: {"dice": 0.0, "hd95": BRATS_HD95_PENALTY} for r in REGION_NAMES},
    }
    m = mean_metrics(cases)
    assert list(m) == REGION_NAMES
    for r in REGION_NAMES:
        assert m[r] == {"dice": 0.5, "hd95": pytest.approx(BRATS_HD95_PENALTY / 2)}
    with pytest.raises(EvaluationError, match="no cases to average"):
        mean_metrics({})


def test_plot_region_boxplots(tmp_path):
    cases = {f"c{i}": {r: {"dice": i / 5, "hd95": float(i)} for r in REGION_NAMES} for i in range(5)}
    paths = plot_region_boxplots(cases, str(tmp_path / "m"))
    assert paths == [str(tmp_path / f"m_{r}.png") for r in REGION_NAMES]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------
# folders and the command line
# --------------------------------------------------------------------------------------
SPACING = (2.5, 1.0, 0.7)  # array axis order (z, y, x)


def make_folders(tmp_path, n=3, labels="nnunet"):
    rng = np.random.default_rng(7)
    ref_dir, pred_dir = tmp_path / "ref", tmp_path / "pred"
    ref_dir.mkdir()
    pred_dir.mkdir()
    to_release = {
        "nnunet": {0: 0, 1: 1, 2: 2, 3: 3},
        "brats2021": {0: 0, 1: 2, 2: 1, 3: 4},
        "brats2023": {0: 0, 1: 2, 2: 1, 3: 3},
    }[labels]
    expected = {}
    for i in range(n):
        ref = random_labels(rng, (14, 16, 12))
        pred = random_labels(rng, (14, 16, 12)) if i else ref.copy()
        expected[f"BraTS_{i:03d}"] = region_metrics(pred, ref, SPACING)
        lut = np.array([to_release[v] for v in range(4)], dtype=np.uint8)
        write_nifti(ref_dir / f"BraTS_{i:03d}.nii.gz", lut[ref], SPACING)
        write_nifti(pred_dir / f"BraTS_{i:03d}.nii.gz", lut[pred], SPACING)
    (pred_dir / "plans.json").write_text("{}")  # other files are ignored
    (ref_dir / "notes.txt").write_text("x")
    return ref_dir, pred_dir, expected


def test_evaluate_folders_api(tmp_path):
    ref_dir, pred_dir, expected = make_folders(tmp_path, n=3, labels="brats2021")
    out = tmp_path / "out" / "metrics.json"
    res = evaluate_folders(str(ref_dir), str(pred_dir), str(out), labels="brats2021", num_processes=1)
    # NIfTI stores the spacing as float32 (0.7 -> 0.69999999), hence approx
    assert list(res["cases"]) == list(expected)
    for case in expected:
        for r in REGION_NAMES:
            assert res["cases"][case][r] == pytest.approx(expected[case][r], rel=1e-6)
    assert res["mean"] == mean_metrics(res["cases"])
    assert json.loads(out.read_text()) == res
    assert (tmp_path / "out" / "metrics.csv").is_file()
    # no output file: nothing written, same numbers
    res2 = evaluate_folders(str(ref_dir), str(pred_dir), None, labels="brats2021", num_processes=2, progress=False)
    assert res2 == res


def test_cli_end_to_end(tmp_path):
    ref_dir, pred_dir, expected = make_folders(tmp_path, n=4)
    out = tmp_path / "res" / "metrics.json"
    proc = run_cli("-r", ref_dir, "-p", pred_dir, "-o", out, "-np", "2")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert list(data) == ["mean", "cases"]
    assert list(data["mean"]) == REGION_NAMES
    assert sorted(data["cases"]) == sorted(expected)
    for region_dict in [data["mean"], *data["cases"].values()]:
        assert list(region_dict) == REGION_NAMES
        for m in region_dict.values():
            assert list(m) == ["dice", "hd95"]
            assert all(isinstance(v, float) for v in m.values())
    for case, regions in expected.items():
        for r in REGION_NAMES:
            assert np.isclose(data["cases"][case][r]["dice"], regions[r]["dice"])
            assert np.isclose(data["cases"][case][r]["hd95"], regions[r]["hd95"])
    assert data["cases"]["BraTS_000"] == {r: {"dice": 1.0, "hd95": 0.0} for r in REGION_NAMES}
    with open(tmp_path / "res" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["case", "region", "dice", "hd95"]
    assert len(rows) == 4 * 3
    for r in REGION_NAMES:
        png = tmp_path / "res" / f"metrics_{r}.png"
        assert png.is_file() and png.stat().st_size > 0
    leftovers = [f for f in os.listdir(tmp_path / "res") if f.endswith(".tmp")]
    assert not leftovers


def assert_clean_error(proc, *fragments):
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    # the tqdm bar also goes to stderr; the error is its own line
    assert any(line.startswith("error: ") for line in proc.stderr.splitlines()), proc.stderr
    for frag in fragments:
        assert frag in proc.stderr, (frag, proc.stderr)


def test_cli_errors(tmp_path):
    ref_dir, pred_dir, _ = make_folders(tmp_path, n=3)
    out = tmp_path / "m.json"

    # differing case sets: one missing prediction, one extra prediction
    os.rename(pred_dir / "BraTS_001.nii.gz", pred_dir / "BraTS_999.nii.gz")
    proc = run_cli("-r", ref_dir, "-p", pred_dir, "-o", out, "-np", "1")
    assert_clean_error(proc, "BraTS_001", "BraTS_999")
    assert not out.exists()
    os.rename(pred_dir / "BraTS_999.nii.gz", pred_dir / "BraTS_001.nii.gz")

    # shape mismatch
    good = sitk.ReadImage(str(pred_dir / "BraTS_002.nii.gz"))
    write_nifti(pred_dir / "BraTS_002.nii.gz", np.zeros((14, 16, 13), np.uint8), SPACING)
    proc = run_cli("-r", ref_dir, "-p", pred_dir, "-o", out, "-np", "2")
    assert_clean_error(proc, "BraTS_002", "shape", str(pred_dir / "BraTS_002.nii.gz"), str(ref_dir / "BraTS_002.nii.gz"))

    # geometry mismatch: spacing, then origin
    write_nifti(pred_dir / "BraTS_002.nii.gz", sitk.GetArrayFromImage(good), (2.0, 1.0, 0.7))
    proc = run_cli("-r", ref_dir, "-p", pred_dir, "-o", out, "-np", "1")
    assert_clean_error(proc, "BraTS_002", "spacing", str(pred_dir / "BraTS_002.nii.gz"))
    write_nifti(pred_dir / "BraTS_002.nii.gz", sitk.GetArrayFromImage(good), SPACING, origin=(5.0, 0.0, 0.0))
    proc = run_cli("-r", ref_dir, "-p", pred_dir, "-o", out, "-np", "1")
    assert_clean_error(proc, "BraTS_002", "origin", str(ref_dir / "BraTS_002.nii.gz"))
    sitk.WriteImage(good, str(pred_dir / "BraTS_002.nii.gz"))

    # labels outside the convention (4 in nnU-Net labels; 3 in brats2021 labels)
    arr = sitk.GetArrayFromImage(good)
    arr[0, 0, 0] = 4
    write_nifti(pred_dir / "BraTS_002.nii.gz", arr, SPACING)
    proc = run_cli("-r", ref_dir, "-p", pred_dir, "-o", out, "-np", "1")
    assert_clean_error(proc, "BraTS_002.nii.gz", "[4]")
    proc = run_cli("-r", ref_dir, "-p", pred_dir, "-o", out, "--labels", "brats2021", "-np", "1")
    assert_clean_error(proc, "label values", "[3]")
    assert not out.exists()

    # empty and missing folders
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli("-r", ref_dir, "-p", empty, "-o", out)
    assert_clean_error(proc, str(empty), "no .nii.gz")
    proc = run_cli("-r", tmp_path / "nope", "-p", pred_dir, "-o", out)
    assert_clean_error(proc, str(tmp_path / "nope"), "does not exist")


def test_truncated_file_is_a_clean_error(tmp_path):
    """A cut-off prediction is an error naming the file, not a silently zero-filled read."""
    ref_dir, pred_dir, _ = make_folders(tmp_path, n=2)
    path = pred_dir / "BraTS_001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(EvaluationError, match="cannot read"):
        evaluate_case(str(path), str(ref_dir / "BraTS_001.nii.gz"))
    proc = run_cli("-r", ref_dir, "-p", pred_dir, "-o", tmp_path / "m.json", "-np", "1")
    assert_clean_error(proc, str(path))
    assert not (tmp_path / "m.json").exists()


def test_main_in_process_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate_cli.main(["-r", str(tmp_path / "a"), "-p", str(tmp_path / "b"), "-o", str(tmp_path / "m.json")])
    assert exc.value.code == 1
    assert capsys.readouterr().err.startswith("error: ")
