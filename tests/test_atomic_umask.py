"""Everything the plugin writes atomically gets the permissions of the user's umask, like stock nnU-Net
(0644 files and 0755 folders under umask 022), never mkstemp's 0600 or mkdtemp's 0700."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from nnunet_kd.atomic import (atomic_save_figure, atomic_torch_save, atomic_write_json, atomic_write_text,
                              make_temp_dir)
from nnunet_kd.evaluation.plots import new_figure


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_follow_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        folder = make_temp_dir(str(tmp_path), "work-")
        atomic_write_text(os.path.join(folder, "a.txt"), "text")
        atomic_write_json({"a": 1}, os.path.join(folder, "sub", "b.json"))
        atomic_torch_save({"w": torch.zeros(2)}, os.path.join(folder, "c.pth"))
        atomic_save_figure(new_figure((2, 2)), os.path.join(folder, "plots", "d.png"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(os.stat(os.path.join(folder, "sub")).st_mode) == 0o777 & ~umask
    for name in ("a.txt", os.path.join("sub", "b.json"), "c.pth", os.path.join("plots", "d.png")):
        assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o666 & ~umask, name
    assert sorted(os.listdir(folder)) == ["a.txt", "c.pth", "plots", "sub"]  # no temporary files left
    assert os.listdir(os.path.join(folder, "plots")) == ["d.png"]
    assert torch.equal(torch.load(os.path.join(folder, "c.pth"))["w"], torch.zeros(2))


def test_a_figure_that_fails_to_render_leaves_the_earlier_file_whole(tmp_path):
    path = str(tmp_path / "plot.png")
    atomic_save_figure(new_figure((2, 2)), path)
    before = open(path, "rb").read()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"
    broken = new_figure((2, 2))
    broken.subplots().text(0.5, 0.5, "$\\frac{$")  # mathtext that cannot be parsed: savefig raises
    with pytest.raises(ValueError):
        atomic_save_figure(broken, path)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["plot.png"]
