"""The evaluation's CSV tables: one row per (case or combination, region) with its Dice and HD95."""
from __future__ import annotations

import csv
import io
from typing import Iterable, Tuple

from nnunet_kd.atomic import atomic_write_text
from nnunet_kd.brats import REGIONS
from nnunet_kd.evaluation.metrics import CaseMetrics


def write_region_table(path: str, first_column: str, rows: Iterable[Tuple[str, CaseMetrics]]) -> str:
    """CSV with columns ``first_column``, region, dice, hd95: for each ``(name, region metrics)`` of ``rows``
    one line per region (values as ``repr`` of the float), written atomically; returns ``path``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([first_column, "region", "dice", "hd95"])
    for name, metrics in rows:
        for region in REGIONS:
            m = metrics[region]
            writer.writerow([name, region, repr(float(m["dice"])), repr(float(m["hd95"]))])
    atomic_write_text(path, buf.getvalue())
    return path
