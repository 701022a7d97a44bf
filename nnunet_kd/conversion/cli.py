"""The ``nnunet_kd_convert_brats`` command: a release folder to an nnU-Net raw dataset, or with
``--to-brats`` predictions back to a release's labels.

Bad input: ``error: ...`` on stderr and exit status 1, never a traceback; usage errors: argparse's exit 2.
"""
from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

from nnunet_kd.brats import COHORT_PREFIXES
from nnunet_kd.cli import command
from nnunet_kd.conversion.back import choose_prediction_cohort, convert_to_brats
from nnunet_kd.conversion.convert import convert_brats
from nnunet_kd.conversion.releases import YEAR_CHOICES, ConversionError


_DESCRIPTION = ("Convert a BraTS release (2018-2025, every 2023+ cohort: GLI, MEN, MEN-RT, MET, PED, SSA, GoAT) "
                "or the Decathlon Task01_BrainTumour to an nnU-Net v2 "
                "raw dataset (channels T1, T1ce, T2, FLAIR; labels 1 ED, 2 NCR, 3 ET as regions), or with "
                "--to-brats convert nnU-Net predictions back to a release's labels.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nnunet_kd_convert_brats", description=_DESCRIPTION)
    p.add_argument("-i", "--input", required=True,
                   help="release folder (case folders, HGG/LGG, or Task01_BrainTumour or its parent); "
                        "with --to-brats: the folder of nnU-Net predictions")
    p.add_argument("-d", "--dataset-id", type=int, help="nnU-Net dataset id (1-999)")
    p.add_argument("-n", "--name", help="dataset name (default from the release, e.g. BraTS2021 or BraTS2021_T1ce)")
    p.add_argument("--year", choices=YEAR_CHOICES, help="release (default: detected from the layout)")
    p.add_argument("--modalities", nargs="+", metavar="MOD",
                   help="write only these modalities (T1 T1ce T2 FLAIR; aliases such as t1c, t2f work)")
    p.add_argument("-o", "--output-root",
                   help="folder to write DatasetXXX_NAME into (default $nnUNet_raw); "
                        "with --to-brats: the output folder")
    p.add_argument("-np", "--num-processes", type=int, default=min(4, os.cpu_count() or 1),
                   help="worker processes (default min(4, CPUs))")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the same id")
    p.add_argument("--skip-incomplete", action="store_true",
                   help="skip incomplete or invalid cases with a warning instead of failing")
    p.add_argument("--to-brats", action="store_true",
                   help="convert nnU-Net predictions in -i to the labels of --year, written to -o")
    p.add_argument("--cohort", choices=sorted(COHORT_PREFIXES),
                   help="with --to-brats and a 2023+ --year: the cohort whose labels to write (default: the "
                        "brats_cohort of the dataset.json beside the predictions, else the cohort the file names "
                        "BraTS-<COHORT>-... name; needed when neither tells and the year's cohorts label differently)")
    return p


@command(ConversionError, OSError)  # OSError: permissions, full disk, ...
def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point; bad input exits with ``error: ...`` on stderr and status 1, never a traceback."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.to_brats:
        if not args.output_root or not args.year:
            parser.error("--to-brats needs -o OUT_DIR and --year")
        written = convert_to_brats(args.input, args.output_root, args.year, args.cohort)
        chosen, how = choose_prediction_cohort(os.path.abspath(args.input), args.year, args.cohort)
        labels = f"{args.year} labels" if chosen is None else f"{args.year} labels of cohort {chosen.key} ({how})"
        print(f"Wrote {len(written)} segmentations in {labels} to {os.path.abspath(args.output_root)}")
        return 0
    if args.cohort:
        parser.error("--cohort applies to --to-brats; converting detects the cohort from the case names")
    if args.dataset_id is None:
        parser.error("-d/--dataset-id is required")
    if args.num_processes < 1:
        parser.error("-np must be >= 1")
    convert_brats(args.input, args.dataset_id, name=args.name, year=args.year, modalities=args.modalities,
                  num_processes=args.num_processes, overwrite=args.overwrite,
                  skip_incomplete=args.skip_incomplete, output_root=args.output_root, progress=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
