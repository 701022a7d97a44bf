"""nnunet_kd_study takes over or deletes a --workdir only if it is the study's own (its study_settings.json
is there), with and without --resume; no training runs in these tests."""
from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

from nnunet_kd.experiments.study import cli, run


@pytest.fixture
def stop_after_workdir(stop_at):
    """Stop the study at its first step after preparing the work folder."""
    return stop_at(run, "prepare_split")


def _argv(work: Path, *extra: str) -> List[str]:
    return ["--toy", "--seeds", "0", "--device", "cpu", "--workdir", str(work), *extra]


def _refused(work: Path, capsys, *extra: str) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(work, *extra))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(work) in err


@pytest.mark.parametrize("order", [("plain", "resume"), ("resume", "plain")])
def test_user_folder_survives_plain_and_resume_runs(tmp_path, capsys, stop_after_workdir, order):
    work = tmp_path / "thesis"
    work.mkdir()
    (work / "notes.txt").write_text("months of work")
    for run in order:
        _refused(work, capsys, *(["--resume"] if run == "resume" else []))
        assert sorted(p.name for p in work.iterdir()) == ["notes.txt"]
        assert (work / "notes.txt").read_text() == "months of work"


def test_study_folder_is_kept_with_resume_and_replaced_without(tmp_path, stop_after_workdir):
    work = tmp_path / "study"
    with pytest.raises(stop_after_workdir):
        cli.main(_argv(work))
    assert sorted(p.name for p in work.iterdir()) == [run.WORKDIR_MARKER]
    (work / "seed0").mkdir()
    (work / "seed0" / "scores.json").write_text("{}")  # what the earlier run finished
    with pytest.raises(stop_after_workdir):
        cli.main(_argv(work, "--resume"))
    assert (work / "seed0" / "scores.json").read_text() == "{}"
    with pytest.raises(stop_after_workdir):
        cli.main(_argv(work))
    assert sorted(p.name for p in work.iterdir()) == [run.WORKDIR_MARKER]


@pytest.mark.parametrize("resume", [False, True])
def test_new_or_empty_folder_is_taken_over_and_a_file_refused(tmp_path, capsys, stop_after_workdir, resume):
    extra = ["--resume"] if resume else []
    for work in (tmp_path / "new", tmp_path / "empty"):
        if work.name == "empty":
            work.mkdir()
        with pytest.raises(stop_after_workdir):
            cli.main(_argv(work, *extra))
        assert (work / run.WORKDIR_MARKER).is_file()
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(path, *extra))
    assert exc.value.code == 1 and "not a folder" in capsys.readouterr().err
    assert path.read_text() == "x"
