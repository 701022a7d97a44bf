"""gpu/run_on_gpu.sh and the device call in gpu/README.md, checked without a GPU: the plan it prints (DRY=1),
its hard time limits (a stand-in python that never ends: every part is cut at its limit, its whole process group
killed, and the results still packed) and the call's limits (2000 characters, 8 carried paths, 600 s)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "gpu" / "run_on_gpu.sh"


def _run(env: dict, out: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out)], env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.mark.parametrize("script", ["run_on_gpu.sh", "prepare_carry.sh"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", str(REPO / "gpu" / script)], check=True)


def test_dry_plan(tmp_path):
    proc = _run({"DRY": "1", "WORK": str(tmp_path / "work")}, tmp_path / "out", 60)
    assert proc.returncode == 0, proc.stderr
    log = (tmp_path / "out" / "run_log.txt").read_text()
    parts = re.findall(r"part (\S+): start \(limit (\d+) s\): (.*)", log)
    names = [p[0] for p in parts]
    assert names[:2] == ["install", "imports"] and names[-2:] == ["report", "benchmark"]
    assert sorted(names[2:5]) == ["study_fold0", "study_fold1", "study_fold2"]
    for name, _, cmd in parts:
        if name.startswith("study_fold"):
            fold = name[-1]
            assert "nnUNet_compile=0" in cmd and f"--seeds {fold}" in cmd and "--folds 3" in cmd
            assert "--epochs 5 --iterations 16" in cmd and "--parallel 5" in cmd and "--device cuda" in cmd
            assert "--target-spacing" not in cmd
            for model in ("nnUNetTrainerBudget_full", "nnUNetTrainerModalityDropout_full", "nnUNetTrainerMGSD_full",
                          "nnUNetTrainerMTCMKD_full"):
                assert model in cmd
    bench = dict((n, c) for n, _, c in parts)["benchmark"]
    assert "--device cuda" in bench and "-o" in bench and "--eager-only" not in bench


@pytest.mark.slow  # about 30 s: the parts' limits run out in real time
def test_hard_limits_kill_and_pack(tmp_path):
    """Every part that overruns is cut at its limit with its children, and the script still packs and ends."""
    fake = tmp_path / "python"
    pids = tmp_path / "pids"
    fake.write_text(f"""#!/usr/bin/env bash
case "$1 $2 $*" in
  "-m nnunet_kd.experiments.study "*--collect*) mkdir -p "$WORK/report"; echo pooled > "$WORK/report/study.md";;
  "-m nnunet_kd.experiments."*) sleep 300 & echo $! >> {pids}; wait;;
  *) exit 0;;
esac
""")
    fake.chmod(0o755)
    work = tmp_path / "work"
    env = {"PY": str(fake), "WHL": str(tmp_path), "WORK": str(work), "T_TOTAL": "40", "T_STUDY": "6",
           "T_REPORT": "5", "T_BENCH_MIN": "5", "T_PACK": "10", "PYTHONPATH": ""}
    (tmp_path / "x.whl").write_text("")
    start = time.time()
    proc = _run(env, tmp_path / "out", 120)
    took = time.time() - start
    log = (tmp_path / "out" / "run_log.txt").read_text()
    assert proc.returncode == 0, proc.stderr + log
    assert took < 40 + 15, log
    assert log.count("(OUT OF TIME)") == 4, log  # three study folds and the benchmark
    assert "part report: end" in log and "exit 0" in log
    assert (tmp_path / "out" / "study.md").read_text().strip() == "pooled"
    assert (tmp_path / "out" / "results.tar.gz").is_file()
    for pid in pids.read_text().split():  # the sleeping grandchildren were killed with their group
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_device_call_in_readme():
    text = (REPO / "gpu" / "README.md").read_text()
    block = re.search(r"```json\n(\{.*?\})\n```", text, re.S)
    assert block, "gpu/README.md needs the device call as a ```json block"
    call = json.loads(block.group(1))
    assert set(call) == {"command", "carry", "timeout_s"}
    assert len(call["command"]) <= 2000 and "gpu/run_on_gpu.sh" in call["command"]
    assert len(call["carry"]) <= 8 and set(call["carry"]) == {".whl", ".gpu_data"}
    assert 540 <= call["timeout_s"] <= 600


def test_the_scripts_delete_only_folders_they_made(tmp_path):
    def fresh_dir(folder: Path) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", f'. "{REPO}/gpu/fresh_dir.sh"; fresh_dir "{folder}"'],
                              capture_output=True, text=True, timeout=30)

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.whl").write_text("a user's file")
    refused = fresh_dir(theirs)
    assert refused.returncode != 0 and str(theirs) in refused.stderr
    assert (theirs / "keep.whl").read_text() == "a user's file"

    ours = tmp_path / "ours"
    assert fresh_dir(ours).returncode == 0
    (ours / "old.whl").write_text("made by an earlier run")
    assert fresh_dir(ours).returncode == 0
    assert [p.name for p in ours.iterdir()] == [".made_by_nnunet_kd_gpu"]
