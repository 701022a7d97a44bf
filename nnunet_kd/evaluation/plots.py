"""The evaluation's figures: per-region box plots of a folder's scores and the heat map of the
missing-modality table (combinations x regions). The study's figures are in
:mod:`nnunet_kd.experiments.study.plots`."""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Mapping, Tuple

import numpy as np

from nnunet_kd.atomic import atomic_save_figure
from nnunet_kd.brats import REGIONS
from nnunet_kd.evaluation.metrics import CaseMetrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def new_figure(figsize: Tuple[float, float]) -> Figure:
    """A matplotlib figure with its own Agg canvas: no pyplot, so no global state and no display needed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def plot_region_boxplots(cases: Mapping[str, CaseMetrics], out_prefix: str, model: str = "") -> List[str]:
    """One PNG per region (``{out_prefix}_WT.png`` ...), Dice and HD95 box plots side by side.

    ``model`` (e.g. the predictions folder or the trainer) is the figure's title, so that plots of several
    models cannot be mixed up.
    """
    paths = []
    for region in REGIONS:
        dice = [float(c[region]["dice"]) for c in cases.values()]
        hd = [float(c[region]["hd95"]) for c in cases.values()]
        fig = new_figure((8, 4.5))
        ax_dice, ax_hd = fig.subplots(1, 2)
        for ax, values, title, ylabel in (
            (ax_dice, dice, "Dice", "Dice"),
            (ax_hd, hd, "HD95", "HD95 (mm)"),
        ):
            ax.boxplot(values, widths=0.5, showmeans=True, showfliers=False)  # points drawn below
            jitter = np.random.default_rng(0).uniform(-0.08, 0.08, size=len(values))
            ax.scatter(1 + jitter, values, s=10, alpha=0.6, color="tab:blue", zorder=3)
            ax.set_xticks([1])
            ax.set_xticklabels([region])
            ax.set_title(f"{region} {title} (n={len(values)}, mean={np.mean(values):.3f})" if values else title)
            ax.set_ylabel(ylabel)
            ax.grid(axis="y", alpha=0.3)
        ax_dice.set_ylim(-0.02, 1.02)
        if model:
            fig.suptitle(f"{model}: {region}")
        fig.tight_layout()
        paths.append(atomic_save_figure(fig, f"{out_prefix}_{region}.png", dpi=100))
    return paths


def plot_heatmap(results: Mapping, metric: str, path: str) -> str:
    """Heat map of ``metric`` for every combination (rows) and region (columns) plus the mean row."""
    rows = list(results["combinations"])
    table = [[float(results["combinations"][r]["mean"][reg][metric]) for reg in REGIONS] for r in rows]
    table.append([float(results["mean_over_combinations"][reg][metric]) for reg in REGIONS])
    labels = rows + ["mean over combinations"]
    values = np.asarray(table, dtype=float)
    if metric == "dice":
        cmap, vmin, vmax, title = "viridis", 0.0, 1.0, "Dice"
    else:
        finite = values[np.isfinite(values)]
        cmap, vmin, vmax, title = "viridis_r", 0.0, max(float(finite.max()) if finite.size else 1.0, 1e-6), "HD95 (mm)"
    fig = new_figure((5.5, 0.42 * len(labels) + 1.6))
    ax = fig.subplots()
    im = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(REGIONS)))
    ax.set_xticklabels(list(REGIONS))
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels)
    ax.axhline(len(rows) - 0.5, color="white", linewidth=3)
    norm = im.norm
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            text = f"{v:.3f}" if metric == "dice" else f"{v:.1f}"
            shade = im.cmap(norm(v)) if np.isfinite(v) else (1, 1, 1, 1)
            luminance = 0.299 * shade[0] + 0.587 * shade[1] + 0.114 * shade[2]
            ax.text(j, i, text, ha="center", va="center", fontsize=8,
                    color="black" if luminance > 0.5 else "white",
                    fontweight="bold" if i == len(rows) else "normal")
    ax.set_title(f"{title} per available-modality combination")
    fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03)
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=100)
