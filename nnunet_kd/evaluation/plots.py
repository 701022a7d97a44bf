"""The figures: per-region box plots of a folder's scores, the heat map of the missing-modality table
(combinations x regions), and the study's paired differences, model means, gradient shares and learning
curves."""
from __future__ import annotations

import os
from typing import List, Mapping

import numpy as np

from nnunet_kd.brats import REGIONS
from nnunet_kd.evaluation.metrics import CaseMetrics


def _new_figure(figsize):
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
    folder = os.path.dirname(os.path.abspath(out_prefix))
    os.makedirs(folder, exist_ok=True)
    paths = []
    for region in REGIONS:
        dice = [float(c[region]["dice"]) for c in cases.values()]
        hd = [float(c[region]["hd95"]) for c in cases.values()]
        fig = _new_figure((8, 4.5))
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
        path = f"{out_prefix}_{region}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
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
    fig = _new_figure((5.5, 0.42 * len(labels) + 1.6))
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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def plot_paired_differences(differences: Mapping[str, Mapping], baseline: str, path: str) -> str:
    """Forest plot: per model (rows) and region, the mean paired difference to ``baseline`` with its interval.

    ``differences``: ``{model: {region: {metric: {"mean", "low", "high", "n"}}}}`` as
    :func:`nnunet_kd.evaluation.paired.paired_difference` returns; Dice in points (x 100), HD95 in mm.
    """
    models = list(differences)
    fig = _new_figure((10, 0.45 * len(models) * len(REGIONS) + 1.8))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, metric, scale, unit in ((axes[0], "dice", 100.0, "Dice points"), (axes[1], "hd95", 1.0, "HD95 mm")):
        ticks, labels = [], []
        for r_index, region in enumerate(REGIONS):
            for m_index, model in enumerate(models):
                y = r_index * (len(models) + 1) + m_index
                e = differences[model][region][metric]
                mean, low, high = (scale * e[k] for k in ("mean", "low", "high"))
                ax.errorbar([mean], [y], xerr=[[mean - low], [high - mean]] if np.isfinite(low) else None,
                            fmt="o", color=f"C{m_index}", capsize=3)
                ticks.append(y)
                labels.append(f"{region}: {model}")
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_yticks(ticks)
        ax.set_yticklabels(labels, fontsize=7)
        ax.set_xlabel(f"Δ {unit} (mean, 95% bootstrap CI)")
        ax.grid(axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # the axes share y: invert once
    n = differences[models[0]][next(iter(REGIONS))]["dice"]["n"] if models else 0
    fig.suptitle(f"Paired per-case differences, model - {baseline} (n = {n} cases)", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_model_means(models: Mapping[str, Mapping], path: str) -> str:
    """Bar chart of each model's (legend) mean Dice per region with its standard deviation.

    ``models``: ``{model: {"mean": {region: {"dice": x}}, "sd": {region: {"dice": x}}}}``.
    """
    fig = _new_figure((9, 5))
    ax = fig.add_subplot(1, 1, 1)
    names = list(models)
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        means = [100 * models[name]["mean"][r]["dice"] for r in REGIONS]
        sds = [100 * models[name]["sd"][r]["dice"] for r in REGIONS]
        ax.bar(np.arange(len(REGIONS)) + i * width, means, width, yerr=sds, capsize=2, label=name)
    ax.set_xticks(np.arange(len(REGIONS)) + width * (len(names) - 1) / 2)
    ax.set_xticklabels(list(REGIONS))
    ax.set_ylabel("Dice (%) on held-out cases, mean ± sd over cases")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_gradient_shares(shares: Mapping[str, Mapping], path: str) -> str:
    """Per distillation model (one panel each), every loss term's share of the gradient over the epochs:
    the mean over splits as a line, lowest to highest as a band.

    ``shares``: ``{model: {"measured_at": str, "splits": n, "terms": {term: {"mean", "low", "high": [epoch]}}}}``
    as :func:`nnunet_kd.experiments.study_report.mean_gradient_shares` returns.
    """
    models = list(shares)
    fig = _new_figure((4.2 * max(1, len(models)), 3.8))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(models)), sharey=True))
    for ax, model in zip(axes, models):
        entry = shares[model]
        for i, (term, v) in enumerate(entry["terms"].items()):
            epochs = np.arange(len(v["mean"]))
            ax.plot(epochs, v["mean"], marker="o", markersize=3, color=f"C{i}", label=term)
            ax.fill_between(epochs, v["low"], v["high"], color=f"C{i}", alpha=0.2)
        ax.set_title(f"{model}\n(at the {entry['measured_at']}, {entry['splits']} splits)", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("share of the gradient norm")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_learning_curves(curves: Mapping[str, Mapping], path: str) -> str:
    """Validation pseudo-Dice over the epochs: the EMA of the mean over regions (first panel, what the
    flattening rule reads), then each region's pseudo-Dice; one colour per model, one line style per split.

    ``curves``: ``{model: {"splits": {split: {"ema_fg_dice": [epoch], "dice_per_region": {region: [epoch]}}}}}``
    as :func:`nnunet_kd.experiments.study_report.summarise_learning_curves` returns.
    """
    from matplotlib.lines import Line2D

    models = list(curves)
    splits = list(dict.fromkeys(s for entry in curves.values() for s in entry["splits"]))
    regions = list(dict.fromkeys(r for entry in curves.values() for c in entry["splits"].values()
                                 for r in c["dice_per_region"]))
    styles = ("-", "--", ":", "-.")
    panels = [("EMA pseudo-Dice (mean over regions)", None)] + [(f"{r} pseudo-Dice", r) for r in regions]
    handles = ([Line2D([], [], color=f"C{i % 10}", label=m) for i, m in enumerate(models)]
               + [Line2D([], [], color="grey", ls=styles[i % len(styles)], label=s) for i, s in enumerate(splits)])
    legend_rows = -(-len(handles) // 2)
    legend_h = 0.2 * legend_rows + 0.3  # inches below the panels
    fig = _new_figure((3.6 * len(panels), 3.6 + legend_h))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharey=True))
    for ax, (title, region) in zip(axes, panels):
        for m_index, model in enumerate(models):
            for split, c in curves[model]["splits"].items():
                values = c["ema_fg_dice"] if region is None else c["dice_per_region"].get(region, [])
                # markers: a one-epoch curve is a point
                ax.plot(np.arange(len(values)), values, color=f"C{m_index % 10}", marker="o", markersize=2,
                        ls=styles[splits.index(split) % len(styles)], linewidth=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation pseudo-Dice")
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0.0, legend_h / (3.6 + legend_h), 1.0, 1.0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
