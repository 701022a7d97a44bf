"""The study report's Markdown tables: model means, paired differences, per-split means, gradient shares, KD
weights, learning curves and the 15-combination tables."""
from __future__ import annotations

from typing import Mapping, Sequence

from nnunet_kd.brats import REGIONS
from nnunet_kd.experiments.study.paired import verdict


def models_table(summary: dict) -> str:
    """Each model's pooled cases with mean ± sd of Dice (%) and HD95 (mm) per region."""
    lines = ["| model | cases | WT Dice | TC Dice | ET Dice | WT HD95 | TC HD95 | ET HD95 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in summary["models"].items():
        mean, sd = entry["mean"], entry["sd"]
        dice = [f"{100 * mean[r]['dice']:.1f} ± {100 * sd[r]['dice']:.1f}" for r in REGIONS]
        hd = [f"{mean[r]['hd95']:.1f} ± {sd[r]['hd95']:.1f}" for r in REGIONS]
        lines.append(f"| {name} | {entry['n']} | " + " | ".join(dice + hd) + " |")
    return "\n".join(lines)


def paired_table(paired: Mapping[str, Mapping], first_column: str = "model") -> str:
    """Rows of paired differences ``{row name: {region: {metric: entry}}}`` as paired_difference returns."""
    lines = [f"| {first_column} | region | Δ Dice (points) [95% CI] | p | better | Δ HD95 (mm) [95% CI] | p | "
             "verdict (Dice, HD95) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, regions in paired.items():
        for r in REGIONS:
            d, h = regions[r]["dice"], regions[r]["hd95"]
            lines.append(
                f"| {name} | {r} | {100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] | "
                f"{d['p']:.3g} | {d['better']}/{d['n']} | {h['mean']:+.1f} [{h['low']:+.1f}, {h['high']:+.1f}] | "
                f"{h['p']:.3g} | {verdict(d, 'dice')}, {verdict(h, 'hd95')} |")
    return "\n".join(lines)


def dice_differences_table(paired: Mapping[str, Mapping]) -> str:
    """One row per entry of ``{name: paired_difference(...)}``: each region's Dice difference, interval and p."""
    lines = ["| available modalities | " + " | ".join(f"{r} Δ Dice" for r in REGIONS) + " |",
             "| --- |" + " --- |" * len(REGIONS)]
    for name, regions in paired.items():
        cells = [f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] (p {d['p']:.2g})"
                 for d in (regions[r]["dice"] for r in REGIONS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_split_table(per_split: Mapping[str, Mapping[str, Mapping]]) -> str:
    """Each model's mean Dice per split (WT / TC / ET, %)."""
    splits = list(next(iter(per_split.values()))) if per_split else []
    lines = ["| model | " + " | ".join(splits) + " |", "| --- |" + " --- |" * len(splits)]
    for name, means in per_split.items():
        lines.append(f"| {name} | " + " | ".join(
            " / ".join(f"{100 * means[s][r]['dice']:.1f}" for r in REGIONS) for s in splits) + " |")
    return "\n".join(lines)


def gradient_shares_table(shares: Mapping[str, Mapping]) -> str:
    """Each distillation model's term shares of the gradient per epoch (mean over splits)."""
    epochs = max((len(t["mean"]) for entry in shares.values() for t in entry["terms"].values()), default=0)
    lines = ["| model (measured at) | term | " + " | ".join(f"epoch {e}" for e in range(epochs)) + " |",
             "| --- | --- |" + " --- |" * epochs]
    for name, entry in shares.items():
        for term, v in entry["terms"].items():
            cells = [f"{x:.2f}" for x in v["mean"]] + [""] * (epochs - len(v["mean"]))
            lines.append(f"| {name} ({entry['measured_at']}) | {term} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def shown_epochs(epochs: int) -> list:
    """The epochs a compact per-epoch table shows: 0, 1, 2, 5, 10 and every fifth of the run, up to the last."""
    picks = {0, 1, 2, 5, 10} | {round(k * (epochs - 1) / 5) for k in range(1, 6)}
    return sorted(e for e in picks if 0 <= e < epochs)


def kd_weights_table(weights: Mapping[str, Mapping]) -> str:
    """Each MTCM-KD model's weight of every KD source on every region (mean over splits) at :func:`shown_epochs`."""
    epochs = max((len(v["mean"]) for entry in weights.values() for source in entry["sources"].values()
                  for v in source.values()), default=0)
    shown = shown_epochs(epochs)
    lines = ["| model | source | region | " + " | ".join(f"epoch {e}" for e in shown) + " |",
             "| --- | --- | --- |" + " --- |" * len(shown)]
    for name, entry in weights.items():
        for source, per_region in entry["sources"].items():
            for region, v in per_region.items():
                cells = [f"{v['mean'][e]:.3g}" if e < len(v["mean"]) else "" for e in shown]
                lines.append(f"| {name} | {source} | {region} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def learning_curves_table(curves: Mapping[str, Mapping], splits: Sequence[str]) -> str:
    """Per model and split: the last epoch's EMA pseudo-Dice (%), its gain over the last 20 % of the epochs
    (points) and whether it flattened; the epochs so far of an unfinished training."""
    lines = ["| model | " + " | ".join(splits) + " | flattened in every split |",
             "| --- |" + " --- |" * (len(splits) + 1)]
    for name, entry in curves.items():
        cells = []
        for s in splits:
            c = entry["splits"].get(s)
            if c is None:
                cells.append("")
                continue
            state = "flattened" if c["flattened"] else "not flattened"
            if c["from_epoch"] == c["epochs"] - 1:
                state += ": under 5 epochs, no gain to measure"
            if not c["finished"]:
                state += f"; unfinished, {c['epochs']} epochs"
            cells.append(f"{100 * c['last_ema']:.1f} ({100 * c['gain']:+.1f}, {state})")
        every = entry["flattened_in_every_split"]
        every_cell = (f"- ({len(entry['splits'])} of {len(splits)} splits)" if every is None
                      else "yes" if every else "no")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {every_cell} |")
    return "\n".join(lines)


def combinations_table(means: Mapping[str, Mapping]) -> str:
    """One model's mean Dice (%) and HD95 (mm) per region in each available-modality combination."""
    lines = ["| available modalities | WT Dice | TC Dice | ET Dice | WT HD95 | TC HD95 | ET HD95 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for combo, m in means.items():
        lines.append(f"| {combo} | " + " | ".join([f"{100 * m[r]['dice']:.1f}" for r in REGIONS]
                                               + [f"{m[r]['hd95']:.1f}" for r in REGIONS]) + " |")
    return "\n".join(lines)

