"""The converter under faults: a killed parent stops its workers, the next run removes the partial folder
it left, and what the converter writes gets the permissions of the user's umask."""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from nnunet_kd.conversion import convert_brats
from nnunet_kd.experiments.synthetic import generate_dataset


def _children(pid: int) -> List[int]:
    """Live processes whose parent is ``pid`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table from /proc")
def test_killed_parent_stops_workers_and_next_run_cleans_up(tmp_path):
    src, raw = tmp_path / "src", tmp_path / "raw"
    generate_dataset(str(src), 16, shape=(64, 64, 64), seed=3)
    env = {**os.environ, "nnUNet_raw": str(raw), "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "nnunet_kd.conversion.cli", "-i", str(src), "-d", "77", "-np", "2"]
    parent = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: List[int] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and parent.poll() is None:
        workers = _children(parent.pid)
        partial = list(raw.glob(".Dataset077_*.partial-*/imagesTr/*")) if raw.is_dir() else []
        if len(workers) >= 2 and partial:
            break
        time.sleep(0.05)
    assert parent.poll() is None and len(workers) >= 2, "the converter finished before it could be killed"
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:  # do not leave them behind whatever the outcome
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} kept running after their parent was killed"
    assert list(raw.glob(".Dataset077_*.partial-*")), "the killed run should have left its partial folder"

    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=600)
    assert sorted(p.name for p in raw.iterdir()) == ["Dataset077_BraTS2021"]


def test_partial_folder_of_a_live_run_is_kept(tmp_path, monkeypatch):
    """Only folders of dead runs are removed: a conversion of the same id still running keeps its folder."""
    src, raw = tmp_path / "src", tmp_path / "raw"
    generate_dataset(str(src), 1, shape=(24, 24, 24))
    raw.mkdir()
    live = raw / f".Dataset078_BraTS2021.partial-{os.getppid()}@{os.uname().nodename}-0123456789ab"
    other_id = raw / f".Dataset079_BraTS2021.partial-999999999@{os.uname().nodename}-0123456789ab"
    dead = raw / f".Dataset078_BraTS2021.partial-999999999@{os.uname().nodename}-0123456789ab"
    for folder in (live, other_id, dead):
        (folder / "imagesTr").mkdir(parents=True)
    convert_brats(str(src), 78, output_root=str(raw), num_processes=1)
    assert sorted(p.name for p in raw.iterdir()) == sorted(["Dataset078_BraTS2021", live.name, other_id.name])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_dataset_permissions_follow_umask(tmp_path, umask):
    src, raw = tmp_path / "src", tmp_path / "raw"
    generate_dataset(str(src), 2, shape=(24, 24, 24))
    old = os.umask(umask)
    try:
        out = Path(convert_brats(str(src), 80, output_root=str(raw), num_processes=1))
        convert_brats(str(src), 80, output_root=str(raw), num_processes=1, overwrite=True)
    finally:
        os.umask(old)
    dirs = [out, *(p for p in out.rglob("*") if p.is_dir())]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and len(dirs) >= 3
    for d in dirs:
        assert stat.S_IMODE(d.stat().st_mode) == 0o777 & ~umask, d
    for f in files:
        assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask, f
