"""Share of the MTCM-KD student's gradient at its logits that each loss term gives, per KD setting.

Every setting is a trainer class of :mod:`nnunet_kd.trainers` (the default ``nnUNetTrainerMTCMKD`` and its KD
variants), read from its class attributes: KD temperature, power, reduction and total weight, the student's
supervision weights, the teachers and the CDSFL levels, so the numbers follow the trainers. The student loss is
built as the trainer builds it (nnunet_kd.losses.mtcmkd_student with nnU-Net's deep-supervised Dice + BCE over
the BraTS regions, deep-supervision weights 1/2^i with the lowest level 0), with KD at full strength: the ramp
at 1 and every teacher at its full weight (``kd_region_weight``, else ``kd_total_weight`` shared equally).
The logits are a model of an early student: the student's logits are N(0, 1) per voxel and region, every
teacher's (and the CDSFL output's) differ from them by +-``gap`` (random sign), and the target is a sphere of
three nested regions filling about a third of the patch. Shares are computed as the trainer logs them:
norm of the term's gradient at all deep-supervision logits / sum of the terms' norms (averaged over seeds).

    python -m nnunet_kd.experiments.kd_gradient_shares --patch 40 40 40 --gap 3
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from nnunet_kd.cli import command
from nnunet_kd.losses import STUDENT_TERMS, ResponseKD, student_loss_terms
from nnunet_kd.training.gradient_shares import gradient_norms

#: The default trainer; its teachers and CDSFL levels shape the logits model.
DEFAULT_TRAINER = "nnUNetTrainerMTCMKD"
#: Setting name -> (trainer class, attributes changed from that class's).
SETTINGS: Dict[str, Tuple[str, Dict[str, float]]] = {
    "default": (DEFAULT_TRAINER, {}),
    "_VoxelMeanT1, earlier default": ("nnUNetTrainerMTCMKD_VoxelMeanT1", {}),
    "_Reference": ("nnUNetTrainerMTCMKD_Reference", {}),
    "_StrongKD": ("nnUNetTrainerMTCMKD_StrongKD", {}),
    "default at T=1": (DEFAULT_TRAINER, {"kd_temperature": 1.0}),
    "default at T=4": (DEFAULT_TRAINER, {"kd_temperature": 4.0}),
}


def trainer_class(name: str) -> type:
    """A trainer class of :mod:`nnunet_kd.trainers` by name, in whichever of its modules it is defined (the
    MTCM-KD modules first, so that looking up an MTCM-KD class imports only those)."""
    import nnunet_kd.trainers as package

    modules = sorted((m.name for m in pkgutil.iter_modules(package.__path__)), key=lambda m: "MTCMKD" not in m)
    for module in modules:
        found = getattr(importlib.import_module(f"{package.__name__}.{module}"), name, None)
        if isinstance(found, type):
            return found
    raise ValueError(f"no trainer class {name} in nnunet_kd.trainers")


@dataclass(frozen=True)
class KDSetting:
    """The student loss's KD and supervision weights of one trainer (its attributes of the same names)."""

    kd_temperature: float
    kd_temperature_power: int
    kd_reduction: str
    kd_total_weight: float
    #: Each teacher's weight at full strength; None: kd_total_weight shared equally.
    kd_region_weight: Optional[float]
    student_seg_weight: float
    student_ds_weight: float
    student_ds_seg_fraction: float
    student_ds_kd_fraction: float

    @classmethod
    def of(cls, trainer: Union[str, type], **overrides: float) -> KDSetting:
        """The setting of a trainer class (or its name), with ``overrides`` of its attributes."""
        trainer = trainer_class(trainer) if isinstance(trainer, str) else trainer
        values = {f.name: getattr(trainer, f.name) for f in dataclasses.fields(cls)}
        return cls(**{**values, **overrides})

    def label(self) -> str:
        """The KD part in short: reduction, power, temperature, total weight."""
        return (f"{self.kd_reduction}, T^{self.kd_temperature_power}, T={self.kd_temperature:g}, "
                f"{self.kd_total_weight:g}")

    def teacher_weight(self, num_teachers: int) -> float:
        return self.kd_region_weight if self.kd_region_weight is not None else self.kd_total_weight / num_teachers


def kd_settings() -> Dict[str, KDSetting]:
    """:data:`SETTINGS` read from the trainer classes, named with their KD part."""
    out = {}
    for name, (trainer, overrides) in SETTINGS.items():
        setting = KDSetting.of(trainer, **overrides)
        out[f"{name} ({setting.label()})"] = setting
    return out


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


def _as_setting(setting: Union[KDSetting, Sequence]) -> KDSetting:
    """A :class:`KDSetting`, or ``(temperature, power, reduction, total weight)``: the default trainer's
    setting with that KD."""
    if isinstance(setting, KDSetting):
        return setting
    temperature, power, reduction, total = setting
    return KDSetting.of(DEFAULT_TRAINER, kd_temperature=temperature, kd_temperature_power=power,
                        kd_reduction=reduction, kd_total_weight=total)


def measure(patch: Sequence[int], gap: float, seeds: int = 3, num_teachers: Optional[int] = None,
            num_levels: int = 4, levels: Optional[Sequence[int]] = None,
            settings: Optional[Mapping[str, Union[KDSetting, Sequence]]] = None) -> Dict[str, dict]:
    """Per setting: mean gradient norm of each student term at the logits and its share (shares sum to 1).

    ``settings``: default :func:`kd_settings`; a tuple ``(temperature, power, reduction, total weight)`` is
    the default trainer with that KD. ``num_teachers``, ``levels`` (the CDSFL levels): default the default
    trainer's.
    """
    default = trainer_class(DEFAULT_TRAINER)
    num_teachers = len(default.teacher_modalities) if num_teachers is None else num_teachers
    levels = tuple(default.cdsfl_levels) if levels is None else tuple(levels)
    chosen = {name: _as_setting(s) for name, s in (settings or kd_settings()).items()}
    seg_loss = nnunet_region_loss(num_levels)
    norms: Dict[str, List[Dict[str, float]]] = {name: [] for name in chosen}
    for seed in range(seeds):
        x = logits_model(patch, gap, num_teachers, num_levels, seed)
        for name, s in chosen.items():
            terms = student_loss_terms(
                x["student"], x["teachers"], {lvl: x["fused"][lvl] for lvl in levels}, x["target"],
                seg_loss=seg_loss, kd=ResponseKD(s.kd_temperature, s.kd_temperature_power, s.kd_reduction,
                                                 use_regions=True),
                kd_weights=[s.teacher_weight(num_teachers)] * num_teachers, levels=levels, kd_active=True,
                seg_weight=s.student_seg_weight, ds_weight=s.student_ds_weight,
                ds_seg_fraction=s.student_ds_seg_fraction, ds_kd_fraction=s.student_ds_kd_fraction)
            norms[name].append(gradient_norms(terms, x["student"]))
    result = {}
    for name, runs in norms.items():
        mean = {t: float(np.mean([r[t] for r in runs])) for t in STUDENT_TERMS}
        total = sum(mean.values())
        result[name] = {"share": {t: mean[t] / total for t in STUDENT_TERMS}, "norm": mean}
    return result


@command(ValueError)
def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python -m nnunet_kd.experiments.kd_gradient_shares``: print (and optionally write) the shares."""
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
    settings = kd_settings()
    result = measure(args.patch, args.gap, args.seeds, settings=settings)
    print(f"patch {args.patch}, logit gap {args.gap}: share of the student's gradient at its logits")
    width = max(len(name) for name in result)
    for name, r in result.items():
        print(f"  {name:{width}s} " + "  ".join(f"{t} {r['share'][t]:.4f}" for t in STUDENT_TERMS))
    if args.output:
        from nnunet_kd.atomic import atomic_write_json
        atomic_write_json({"patch": args.patch, "gap": args.gap,
                           "settings": {k: dataclasses.asdict(v) for k, v in settings.items()}, "result": result},
                          args.output)


if __name__ == "__main__":
    raise SystemExit(main())
