"""nnunet_kd_demo deletes a --workdir only if an earlier demo made it (its marker file is there)."""
from __future__ import annotations

import pytest

import nnunet_kd.experiments.synthetic as synthetic
from nnunet_kd.experiments import demo


@pytest.fixture
def stop_after_workdir(stop_at):
    """Stop the demo at its first step after preparing the work folder (no training in these tests)."""
    return stop_at(synthetic, "generate_dataset")


def test_user_folder_is_refused_and_kept(tmp_path, capsys, stop_after_workdir):
    work = tmp_path / "thesis"
    work.mkdir()
    (work / "chapter1.tex").write_text("months of work")
    with pytest.raises(SystemExit) as exc:
        demo.main(["--workdir", str(work), "--device", "cpu"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(work) in err and "not made by nnunet_kd_demo" in err
    assert sorted(p.name for p in work.iterdir()) == ["chapter1.tex"]
    assert (work / "chapter1.tex").read_text() == "months of work"


def test_demo_folder_is_replaced_and_new_or_empty_folders_are_marked(tmp_path, stop_after_workdir):
    for work in (tmp_path / "new", tmp_path / "empty"):
        if work.name == "empty":
            work.mkdir()
        with pytest.raises(stop_after_workdir):
            demo.run_demo(str(work), device="cpu")
        assert (work / demo.MARKER).is_file() and (work / "logs").is_dir()
        (work / "old_result.json").write_text("{}")  # what an earlier demo left
        with pytest.raises(stop_after_workdir):
            demo.run_demo(str(work), device="cpu")
        assert sorted(p.name for p in work.iterdir()) == [demo.MARKER, "logs"]


def test_file_as_workdir_is_refused(tmp_path, stop_after_workdir):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(demo.DemoError, match="not a folder"):
        demo.run_demo(str(path), device="cpu")
    assert path.read_text() == "x"
