"""Which BraTS 2023-2025 cohort a folder of cases holds, for the converter: from ``--year``, from a year
named by the release folders, or from the case names (the cohort table is :mod:`nnunet_kd.brats.cohorts`)."""
from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence

from nnunet_kd.brats import (COHORT_YEARS, COHORTS, POST_TREATMENT_TIMEPOINT, Cohort, canonical_prefix, cohort_for,
                             parse_case_id)


def year_hint(names: Iterable[str]) -> Optional[int]:
    """The single BraTS year named by release folders such as ``ASNR-MICCAI-BraTS2023-GLI-Challenge-
    TrainingData`` or ``MICCAI2024-BraTS-GoAT-TrainingData`` (None if no name, or several years, appear).

    Only folder names that mention BraTS and are not case folders count.
    """
    years = set()
    for name in names:
        name = str(name)
        if "brats" not in name.lower() or parse_case_id(name) is not None:
            continue
        years.update(int(y) for y in re.findall(r"(?<!\d)(20\d\d)(?!\d)", name))
    years &= set(COHORT_YEARS)
    return years.pop() if len(years) == 1 else None


def detect_cohort(prefix: str, case_ids: Sequence[str], year: Optional[int] = None,
                  hint: Optional[int] = None) -> Cohort:
    """The cohort for cases of ``prefix``: from ``year`` if given (ValueError if that year has no such
    cohort), else from a release-folder year ``hint`` (ignored if it has none), else from the case ids.

    Without a year: GLI is post-treatment (2024+ labels with RC) when any case has a timepoint of 100
    or more, else 2023; PED is refused because the 2023 and 2024+ label values mean different
    tissues; every other prefix uses its earliest cohort.
    """
    prefix = canonical_prefix(prefix)
    if year is not None:
        return cohort_for(prefix, year)
    if hint is not None and any(c.prefix == prefix and hint in c.years for c in COHORTS.values()):
        return cohort_for(prefix, hint)
    if prefix == "GLI":
        post = any((p := parse_case_id(c)) is not None and p[2] is not None and p[2] >= POST_TREATMENT_TIMEPOINT
                   for c in case_ids)
        return COHORTS["GLI-2024" if post else "GLI-2023"]
    if prefix == "PED":
        raise ValueError("BraTS-PED label values changed in 2024 (2023: 1 NCR, 2 ED, 3 ET; 2024+: 1 ET, 2 NET, "
                         "3 CC, 4 ED) and the case names do not tell the year; pass --year 2023 or --year 2024")
    return min((c for c in COHORTS.values() if c.prefix == prefix), key=lambda c: c.years[0])


def cohort_of_cases(case_ids: Sequence[str], year: Optional[int] = None, hint: Optional[int] = None) -> Cohort:
    """The one cohort of 2023+ case folders (ValueError when they mix prefixes); see detect_cohort."""
    prefixes = sorted({p[0] for p in map(parse_case_id, case_ids) if p is not None})
    if len(prefixes) != 1:
        raise ValueError(f"the case folders mix BraTS cohorts {', '.join(prefixes) or '(none)'}; "
                         "convert one cohort at a time")
    return detect_cohort(prefixes[0], case_ids, year, hint)
