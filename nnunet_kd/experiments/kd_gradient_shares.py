"""Share of the MTCM-KD student's gradient at its logits that each loss term gives, per KD setting.

The student loss is built exactly as the trainer builds it (nnunet_kd.losses.mtcmkd_student with nnU-Net's
deep-supervised Dice + BCE over the BraTS regions, deep-supervision weights 1/2^i with the lowest level 0).
The logits are a model of an early student: the student's logits are N(0, 1) per voxel and region, every
teacher's (and the CDSFL output's) differ from them by +-``gap`` (random sign), and the target is a sphere of
three nested regions filling about a third of the patch. Shares are computed as the trainer logs them:
norm of the term's gradient at all deep-supervision logits / sum of the terms' norms (averaged over seeds).

    python -m nnunet_kd.experiments.kd_gradient_shares --patch 40 40 40 --gap 3
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_kd.cli import command
from nnunet_kd.losses.mtcmkd_student import STUDENT_TERMS, ResponseKD, student_loss_terms
from nnunet_kd.training.gradient_shares import gradient_norms

#: name -> (temperature, temperature power, reduction, total KD weight); the trainer class that uses it.
SETTINGS = {
    "new default (mean, T^2, T=2, 0.5)": (2.0, 2, "mean", 0.5),
    "_VoxelMeanT1, old default (mean, T^1, T=20, 0.15)": (20.0, 1, "mean", 0.15),
    "_Reference (batchmean, T^1, T=20, 0.15)": (20.0, 1, "batchmean", 0.15),
    "_StrongKD (mean, T^2, T=20, 0.15)": (20.0, 2, "mean", 0.15),
    "mean, T^2, T=1, 0.5": (1.0, 2, "mean", 0.5),
    "mean, T^2, T=4, 0.5": (4.0, 2, "mean", 0.5),
}
#: The trainer's fixed student weights (docs/methods.md).
STUDENT_WEIGHTS = dict(seg_weight=0.75, ds_weight=0.10, ds_seg_fraction=0.7, ds_kd_fraction=0.3)


def nnunet_region_loss(num_levels: int) -> torch.nn.Module:
    """nnU-Net 2.8.1's region loss (Dice + BCE) in its deep-supervision wrapper, weights as when it compiles."""
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_BCE_loss({}, {"batch_dice": False, "do_bg": True, "smooth": 1e-5, "ddp": False},
                           use_ignore_label=False, dice_class=MemoryEfficientSoftDiceLoss)
    weights = np.array([1 / 2 ** i for i in range(num_levels)])
    weights[-1] = 0
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def logits_model(patch: Sequence[int], gap: float, num_teachers: int, num_levels: int, seed: int) -> dict:
    """Student, teacher and CDSFL logits and region targets per deep-supervision level, (1, 3, *patch/2^l)."""
    gen = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-1, 1, p) for p in patch], indexing="ij"))
    radius = grid.pow(2).sum(0).sqrt()[None, None]  # (1, 1, *patch)
    regions = torch.cat([(radius < r).float() for r in (0.85, 0.55, 0.35)], 1)  # WT, TC, ET: nested spheres
    out: dict = {"student": [], "teachers": [[] for _ in range(num_teachers)], "fused": [], "target": []}
    for level in range(num_levels):
        shape = [max(1, p // 2 ** level) for p in patch]
        student = torch.randn([1, 3] + shape, generator=gen)

        def other() -> torch.Tensor:
            sign = torch.randint(0, 2, student.shape, generator=gen).float() * 2 - 1
            return student + gap * sign

        out["student"].append(student.requires_grad_())
        for t in out["teachers"]:
            t.append(other())
        out["fused"].append(other())
        out["target"].append(F.interpolate(regions, size=shape, mode="nearest"))
    return out


def measure(patch: Sequence[int], gap: float, seeds: int = 3, num_teachers: int = 3, num_levels: int = 4,
            levels: Sequence[int] = (1,), settings: Optional[Dict[str, tuple]] = None) -> Dict[str, dict]:
    """Per setting: mean gradient norm of each student term at the logits and its share (shares sum to 1)."""
    settings = settings or SETTINGS
    seg_loss = nnunet_region_loss(num_levels)
    norms: Dict[str, List[Dict[str, float]]] = {name: [] for name in settings}
    for seed in range(seeds):
        x = logits_model(patch, gap, num_teachers, num_levels, seed)
        for name, (temperature, power, reduction, total) in settings.items():
            terms = student_loss_terms(
                x["student"], x["teachers"], {lvl: x["fused"][lvl] for lvl in levels}, x["target"],
                seg_loss=seg_loss, kd=ResponseKD(temperature, power, reduction, use_regions=True),
                kd_weights=[total / num_teachers] * num_teachers, levels=levels, kd_active=True,
                **STUDENT_WEIGHTS)
            norms[name].append(gradient_norms(terms, x["student"]))
    result = {}
    for name, runs in norms.items():
        mean = {t: float(np.mean([r[t] for r in runs])) for t in STUDENT_TERMS}
        total = sum(mean.values())
        result[name] = {"share": {t: mean[t] / total for t in STUDENT_TERMS}, "norm": mean}
    return result


@command(ValueError)
def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--patch", type=int, nargs=3, default=[40, 40, 40], help="patch size (default 40 40 40)")
    parser.add_argument("--gap", type=float, default=3.0, help="|teacher - student| logit gap (default 3)")
    parser.add_argument("--seeds", type=int, default=3, help="random logit draws averaged (default 3)")
    parser.add_argument("-o", "--output", help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if min(args.patch) < 8 or args.gap < 0 or args.seeds < 1:
        raise ValueError("--patch needs sizes >= 8, --gap >= 0 and --seeds >= 1")
    result = measure(args.patch, args.gap, args.seeds)
    print(f"patch {args.patch}, logit gap {args.gap}: share of the student's gradient at its logits")
    for name, r in result.items():
        print(f"  {name:52s} " + "  ".join(f"{t} {r['share'][t]:.4f}" for t in STUDENT_TERMS))
    if args.output:
        from nnunet_kd.atomic import atomic_write_json
        atomic_write_json({"patch": args.patch, "gap": args.gap, "settings": SETTINGS, "result": result},
                          args.output)


if __name__ == "__main__":
    raise SystemExit(main())
