"""Case names of the BraTS 2023-2025 cohorts (the BraTS 2023+ challenges' naming, one scheme for every cohort).

Case folders are named ``BraTS-<PREFIX>-<subject>-<timepoint>`` and hold ``<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``
(MEN-RT: ``<case>_t1c`` / ``<case>_gtv``). Most cohorts have a 5-digit subject and a 3-digit timepoint;
MEN-RT a 4-digit subject and a 1-digit timepoint; GoAT a 5-digit subject without timepoint.
"""
from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

#: Case-folder pattern of each cohort prefix (GLI, MEN, MEN-RT, MET, PED, SSA, GoAT).
COHORT_CASE_PATTERNS: Dict[str, "re.Pattern[str]"] = {
    prefix: re.compile(rf"^BraTS-{prefix}-(?P<subject>\d+)-(?P<timepoint>\d+)$", re.IGNORECASE)
    for prefix in ("GLI", "MEN", "MET", "PED", "SSA")
}
COHORT_CASE_PATTERNS["MEN-RT"] = re.compile(r"^BraTS-MEN-RT-(?P<subject>\d+)-(?P<timepoint>\d+)$", re.IGNORECASE)
COHORT_CASE_PATTERNS["GoAT"] = re.compile(r"^BraTS-GoAT-(?P<subject>\d+)$", re.IGNORECASE)
#: A case folder of any 2023+ cohort (the converter's release detection).
ANY_CASE_PATTERN = re.compile(r"^BraTS-(GLI|MEN-RT|MEN|MET|PED|SSA)-\d+-\d+$|^BraTS-GoAT-\d+$", re.IGNORECASE)
#: Case-name prefixes of the 2023+ scheme, longest first (MEN-RT before MEN).
COHORT_PREFIXES: Tuple[str, ...] = tuple(sorted(COHORT_CASE_PATTERNS, key=len, reverse=True))

#: First timepoint of a post-treatment adult-glioma case: 2024+ post-treatment case ids carry timepoints
#: 100 and above (e.g. BraTS-GLI-02073-100), pre-treatment ones 000-099.
POST_TREATMENT_TIMEPOINT = 100


def canonical_prefix(prefix: str) -> str:
    """The cohort prefix as spelled in COHORT_CASE_PATTERNS (matched case-insensitively); ValueError naming the
    known ones."""
    for known in COHORT_CASE_PATTERNS:
        if known.lower() == str(prefix).strip().lower():
            return known
    raise ValueError(f"unknown BraTS cohort {prefix!r}; known: {', '.join(sorted(COHORT_CASE_PATTERNS))}")


def parse_case_id(name: str) -> Optional[Tuple[str, str, Optional[int]]]:
    """``(prefix, subject, timepoint)`` of a 2023+ case folder name, or None if it is not one.

    ``timepoint`` is None for GoAT (its ids have none).
    """
    for prefix in COHORT_PREFIXES:
        m = COHORT_CASE_PATTERNS[prefix].match(name)
        if m:
            tp = m.groupdict().get("timepoint")
            return prefix, m.group("subject"), None if tp is None else int(tp)
    return None
