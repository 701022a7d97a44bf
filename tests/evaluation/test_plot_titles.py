"""Box plots name the model they show (several models' plots side by side cannot be mixed up)."""
from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")
from matplotlib.figure import Figure  # noqa: E402

from nnunet_kd.evaluation.plots import plot_region_boxplots  # noqa: E402


def test_box_plot_titles_name_the_model(tmp_path, monkeypatch):
    titles = []
    save = Figure.savefig

    def record_title(fig, *args, **kwargs):
        titles.append(fig._suptitle.get_text() if fig._suptitle is not None else None)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record_title)
    cases = {f"c{i}": {r: {"dice": i / 4, "hd95": float(i)} for r in ("WT", "TC", "ET")} for i in range(4)}
    plot_region_boxplots(cases, str(tmp_path / "m"), model="MGSD, T1ce + FLAIR")
    assert titles == ["MGSD, T1ce + FLAIR: WT", "MGSD, T1ce + FLAIR: TC", "MGSD, T1ce + FLAIR: ET"]
