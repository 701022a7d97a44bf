"""The ``nnunet_kd_evaluate`` command: BraTS evaluation of a folder of predictions against references.

Command line::

    nnunet_kd_evaluate -r REF_DIR -p PRED_DIR -o metrics.json [--labels nnunet|brats2021|brats2023] [-np N]
        [--metrics legacy|lesionwise|both] [--cohort GLI-2024]

(also ``python -m nnunet_kd.evaluation.evaluate_cli`` and ``python -m nnunet_kd.evaluation.evaluate``).

``--labels brats2018``, ``brats2019`` and ``brats2020`` are read as ``brats2021`` (the same label values).

``--metrics``: legacy (default; Dice and HD95 of WT, TC, ET, :mod:`nnunet_kd.evaluation.evaluate`), the
official BraTS 2023+ lesion-wise metrics or both (:mod:`nnunet_kd.evaluation.modes`; lesion-wise needs the
``brats-eval`` extra). Outputs: ``metrics.json``, ``metrics.csv`` and the box plots
(:func:`nnunet_kd.evaluation.evaluate.write_results`), plus ``metrics_lesionwise.csv`` with lesion-wise metrics.
Bad input: ``error: ...`` on stderr and exit status 1; usage errors: argparse's exit 2.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from nnunet_kd.cli import command
from nnunet_kd.evaluation.evaluate import default_num_processes
from nnunet_kd.evaluation.metrics import EvaluationError, add_labels_argument, add_metrics_arguments
from nnunet_kd.evaluation.modes import evaluate_with_metrics


def build_parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    p = argparse.ArgumentParser(
        prog="nnunet_kd_evaluate",
        description="BraTS evaluation (Dice, HD95 in mm) of WT, TC, ET for a folder of .nii.gz predictions.",
    )
    p.add_argument("-r", "--ref", required=True, help="folder with reference segmentations (.nii.gz)")
    p.add_argument("-p", "--pred", required=True, help="folder with predicted segmentations (same file names)")
    p.add_argument("-o", "--output", required=True, help="output JSON; CSV and PNG box plots are written beside it")
    add_labels_argument(p, "label convention of both folders")
    p.add_argument("-np", "--num-processes", type=int, default=default_num_processes(),
                   help="worker processes (default: min(4, CPUs))")
    p.add_argument("--no-plots", action="store_true", help="skip the box plots")
    add_metrics_arguments(p)
    return p


@command(EvaluationError)
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``nnunet_kd_evaluate``: score, write the outputs, print the means."""
    args = build_parser().parse_args(argv)
    if args.num_processes < 1:
        raise EvaluationError(f"-np must be at least 1, got {args.num_processes}")
    results = evaluate_with_metrics(args.ref, args.pred, args.output, metrics=args.metrics, labels=args.labels,
                                    cohort=args.cohort, num_processes=args.num_processes, plots=not args.no_plots)
    for region, m in results.get("mean", {}).items():
        print(f"{region}: Dice {m['dice']:.4f}  HD95 {m['hd95']:.2f} mm")
    lesion = results.get("lesionwise", {"mean": {}, "cases": {}})
    for region, m in lesion["mean"].items():
        print(f"{region}: lesion-wise Dice {m['lesion_dice']:.4f}  HD95 {m['lesion_hd95']:.2f}  "
              f"(global Dice {m['global_dice']:.4f}; official {lesion['config']} config)")
    print(f"{len(results.get('cases', lesion['cases']))} cases; written {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
