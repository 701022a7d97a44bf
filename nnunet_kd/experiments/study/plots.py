"""The study's figures: paired differences to the baseline (forest plot), model means, the distillation
trainers' gradient shares, MTCM-KD's KD weights and the learning curves."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from nnunet_kd.atomic import atomic_save_figure
from nnunet_kd.brats import REGIONS
from nnunet_kd.evaluation.plots import new_figure


def plot_paired_differences(differences: Mapping[str, Mapping], baseline: str, path: str) -> str:
    """Forest plot: per model (rows) and region, the mean paired difference to ``baseline`` with its interval.

    ``differences``: ``{model: {region: {metric: {"mean", "low", "high", "n"}}}}`` as
    :func:`nnunet_kd.experiments.study.paired.paired_difference` returns; Dice in points (x 100), HD95 in mm.
    """
    models = list(differences)
    fig = new_figure((10, 0.45 * len(models) * len(REGIONS) + 1.8))
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
    return atomic_save_figure(fig, path, dpi=110)


def plot_model_means(models: Mapping[str, Mapping], path: str) -> str:
    """Bar chart of each model's (legend) mean Dice per region with its standard deviation.

    ``models``: ``{model: {"mean": {region: {"dice": x}}, "sd": {region: {"dice": x}}}}``.
    """
    fig = new_figure((9, 5))
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
    return atomic_save_figure(fig, path, dpi=120)


def plot_gradient_shares(shares: Mapping[str, Mapping], path: str) -> str:
    """Per distillation model (one panel each), every loss term's share of the gradient over the epochs:
    the mean over splits as a line, lowest to highest as a band.

    ``shares``: ``{model: {"measured_at": str, "splits": n, "terms": {term: {"mean", "low", "high": [epoch]}}}}``
    as :func:`nnunet_kd.experiments.study.report.mean_gradient_shares` returns.
    """
    models = list(shares)
    fig = new_figure((4.2 * max(1, len(models)), 3.8))
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
    return atomic_save_figure(fig, path, dpi=110)


def plot_kd_weights(weights: Mapping[str, Mapping], path: str) -> str:
    """Per MTCM-KD model (one panel each), the weight of every KD source (one colour each) on every region (one
    line style each) over the epochs, mean over splits.

    ``weights``: ``{model: {"regions": [region], "splits": n, "sources": {source: {region: {"mean": [epoch]}}}}}``
    as :func:`nnunet_kd.experiments.study.report.mean_kd_weights` returns.
    """
    models = list(weights)
    fig = new_figure((4.6 * max(1, len(models)), 3.8))
    axes = np.atleast_1d(fig.subplots(1, max(1, len(models)), sharey=True))
    styles = ("-", "--", ":", "-.")
    for ax, model in zip(axes, models):
        entry = weights[model]
        for i, (source, per_region) in enumerate(entry["sources"].items()):
            for j, (region, v) in enumerate(per_region.items()):
                ax.plot(np.arange(len(v["mean"])), v["mean"], color=f"C{i}", linestyle=styles[j % len(styles)],
                        label=f"{source}, {region}")
        ax.set_title(f"{model}\n({entry['splits']} splits)", fontsize=8)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("KD weight (ramp included)")
    fig.tight_layout()
    return atomic_save_figure(fig, path, dpi=110)


def plot_learning_curves(curves: Mapping[str, Mapping], path: str) -> str:
    """Validation pseudo-Dice over the epochs: the EMA of the mean over regions (first panel, what the
    flattening rule reads), then each region's pseudo-Dice; one colour per model, one line style per split.

    ``curves``: ``{model: {"splits": {split: {"ema_fg_dice": [epoch], "dice_per_region": {region: [epoch]}}}}}``
    as :func:`nnunet_kd.experiments.study.report.summarise_learning_curves` returns.
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
    fig = new_figure((3.6 * len(panels), 3.6 + legend_h))
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
    return atomic_save_figure(fig, path, dpi=110)
