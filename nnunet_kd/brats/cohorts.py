"""The BraTS 2023-2025 cohorts: their label sets, their nnU-Net labels and the evaluated regions.

Since 2023 BraTS runs several cohorts with one naming scheme (:mod:`nnunet_kd.brats.case_names`). The
label values are small integers whose meaning depends on the cohort and the year (e.g. label 1 is the
enhancing tumour in 2024+ paediatric data but the non-enhancing core everywhere else), so every
cohort/year has its own entry.

nnU-Net side (one convention for every cohort, so that trainers and the evaluation need no special
cases): label 1 is the outermost tumour compartment (ED / SNFH), 2 the non-enhancing core (NCR /
NETC / NET), 3 the enhancing tumour, and extra compartments start at 4 (RC, CC). The regions are
trained in the order listed (``regions_class_order`` = 1, 2, ...), the first one is always the whole
tumour (the region with the most labels), and a voxel of label ``k`` lies in region ``k`` and in no
later region, so nnU-Net's region-to-label conversion restores every label (checked on construction).

Sources (one per cohort below; facts only):
* 2023 regions WT = {1, 2, 3}, TC = {1, 3}, ET = {3} for every 2023 cohort: the official BraTS 2023
  lesion-wise metrics, https://github.com/rachitsaluja/BraTS-2023-Metrics
* 2024+ regions: the official evaluation package's bundled panoptica configs (BraTS-evaluation 0.0.10),
  https://github.com/BraTS/BraTS_evaluation/tree/main/brats_evaluation/configs
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np

from nnunet_kd.brats.case_names import COHORT_CASE_PATTERNS, canonical_prefix
from nnunet_kd.brats.labels import RELEASE_TO_NNUNET, map_labels
from nnunet_kd.brats.modalities import MODALITIES
from nnunet_kd.brats.regions import REGION_NAMES, REGIONS


@dataclass(frozen=True)
class Cohort:
    """One cohort of one or more BraTS years with the same labels.

    ``labels``: original label value -> (abbreviation, meaning). ``to_nnunet``: original -> nnU-Net
    label (0 -> 0 included). ``regions``: region -> nnU-Net labels, in training order.
    ``eval_config``: the official package's bundled config; ``eval_regions``: its groups reported for
    this cohort -> our region name.
    """

    key: str
    prefix: str
    years: Tuple[int, ...]
    title: str
    labels: Mapping[int, Tuple[str, str]]
    to_nnunet: Mapping[int, int]
    regions: Mapping[str, Tuple[int, ...]]
    eval_config: str
    eval_regions: Mapping[str, str]
    source: str
    modalities: Tuple[str, ...] = MODALITIES
    separator: str = "-"  # between case id and modality token in file names
    seg_token: str = "seg"
    case_pattern: "re.Pattern[str]" = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.case_pattern is None:
            object.__setattr__(self, "case_pattern", COHORT_CASE_PATTERNS[self.prefix])
        values = sorted(self.to_nnunet.values())
        if values != list(range(len(values))) or set(self.to_nnunet) != {0, *self.labels}:
            raise ValueError(f"{self.key}: to_nnunet must map 0 and every label onto 0..N, got {self.to_nnunet}")
        members = list(self.regions.values())
        for label in range(1, len(values)):
            last = max((i for i, m in enumerate(members, start=1) if label in m), default=None)
            if last != label:
                raise ValueError(f"{self.key}: nnU-Net label {label} must lie in region {label} and in no later "
                                 f"region, regions are {dict(self.regions)}")

    @property
    def allowed_labels(self) -> Tuple[int, ...]:
        """Label values allowed in this cohort's segmentations (background included)."""
        return tuple(sorted(self.to_nnunet))

    @property
    def from_nnunet(self) -> Dict[int, int]:
        """nnU-Net label -> original label (for ``--to-brats``)."""
        return {v: k for k, v in self.to_nnunet.items()}

    @property
    def uses_regions(self) -> bool:
        """True if nnU-Net trains regions (sigmoid); a single-label cohort (MEN-RT) trains plain labels."""
        return len(self.regions) > 1

    @property
    def regions_class_order(self) -> Optional[Tuple[int, ...]]:
        """nnU-Net label written for each region, in region order (1, 2, ...); None without regions."""
        return tuple(range(1, len(self.regions) + 1)) if self.uses_regions else None

    def nnunet_label_names(self) -> Dict[int, str]:
        """nnU-Net label -> 'ABBR: meaning' of the original label it stands for (background excluded)."""
        names = {self.to_nnunet[v]: f"{abbr}: {meaning}" for v, (abbr, meaning) in self.labels.items()}
        return dict(sorted(names.items()))

    def dataset_json_labels(self) -> Dict[str, object]:
        """nnU-Net ``labels`` entry: background plus one region per entry of ``regions`` (or the plain
        label values when the cohort has a single region)."""
        out: Dict[str, object] = {"background": 0}
        for name, members in self.regions.items():
            out[REGION_NAMES[name]] = list(members) if self.uses_regions else members[0]
        return out

    def original_regions(self) -> Dict[str, Tuple[int, ...]]:
        """Regions in the cohort's original label values (as the BraTS 2023-2025 challenges define them)."""
        inverse = self.from_nnunet
        return {name: tuple(sorted(inverse[m] for m in members)) for name, members in self.regions.items()}


_NCR = ("NCR", "necrotic tumour core")
_NETC = ("NETC", "non-enhancing tumour core")
_ED = ("ED", "peritumoral edema")
_SNFH = ("SNFH", "surrounding non-enhancing FLAIR hyperintensity")
_ET = ("ET", "enhancing tumour")
_RC = ("RC", "resection cavity")

# Label values 1/2/3 of every 2023 cohort and of the 2024+ cohorts that kept them.
# They are the BraTS 2023 GLI label convention and the WT/TC/ET regions; RC (4) adds a label and region.
_THREE_LABELS = RELEASE_TO_NNUNET["brats2023"]
_THREE_EVAL = {"wt": "WT", "tc": "TC", "et": "ET"}
_WITH_RC = {**_THREE_LABELS, 4: 4}
_RC_REGIONS = {**REGIONS, "RC": (4,)}

_COHORT_LIST: List[Cohort] = [
    # BraTS 2023 adult glioma (pre-treatment): https://www.synapse.org/#!Synapse:syn51156910/wiki/622341 ;
    # regions of the official 2023 metrics (WT 1+2+3, TC 1+3, ET 3).
    Cohort("GLI-2023", "GLI", (2023,), "adult glioma, pre-treatment",
           {1: _NCR, 2: _ED, 3: _ET}, _THREE_LABELS, REGIONS, "gli", _THREE_EVAL,
           source="https://github.com/rachitsaluja/BraTS-2023-Metrics"),
    # BraTS 2024/2025 adult glioma, post-treatment (2025 mixes pre-treatment cases, timepoint 000):
    # https://arxiv.org/abs/2405.18368 ; label values and evaluated regions: config_gli.yaml of
    # BraTS-evaluation (netc [1], snfh [2], et [3], rc [4], tc [1, 3], wt [1, 2, 3]).
    Cohort("GLI-2024", "GLI", (2024, 2025), "adult glioma, post-treatment (RC label)",
           {1: _NETC, 2: _SNFH, 3: _ET, 4: _RC}, _WITH_RC, _RC_REGIONS, "gli",
           {"wt": "WT", "tc": "TC", "et": "ET", "netc": "NETC", "snfh": "SNFH", "rc": "RC"},
           source="https://arxiv.org/abs/2405.18368"),
    # BraTS 2023 (and 2025) meningioma, pre-operative: https://arxiv.org/abs/2305.07642 ;
    # evaluated with config_MenPre.yaml (et [3], tc [1, 3], wt [1, 2, 3]).
    Cohort("MEN-2023", "MEN", (2023, 2025), "meningioma, pre-operative",
           {1: _NETC, 2: _SNFH, 3: _ET}, _THREE_LABELS, REGIONS, "MenPre", _THREE_EVAL,
           source="https://arxiv.org/abs/2305.07642"),
    # BraTS 2024 meningioma radiotherapy: T1c only, one label (GTV), files <case>_t1c / _gtv:
    # https://arxiv.org/abs/2405.18383 ; config_MenRT.yaml (gtv [1]).
    Cohort("MEN-RT-2024", "MEN-RT", (2024,), "meningioma, radiotherapy planning (T1c only)",
           {1: ("GTV", "gross tumour volume")}, {0: 0, 1: 1}, {"GTV": (1,)}, "MenRT", {"gtv": "GTV"},
           source="https://arxiv.org/abs/2405.18383", modalities=("T1ce",), separator="_", seg_token="gtv"),
    # BraTS 2023 metastases: https://arxiv.org/abs/2306.00838 ; regions of the 2023 metrics.
    Cohort("MET-2023", "MET", (2023,), "brain metastases, pre-treatment",
           {1: _NETC, 2: _SNFH, 3: _ET}, _THREE_LABELS, REGIONS, "mets", _THREE_EVAL,
           source="https://arxiv.org/abs/2306.00838"),
    # BraTS 2025 (Lighthouse) metastases, pre- and post-treatment, adds RC = 4:
    # https://arxiv.org/abs/2504.12527 ; config_mets.yaml (et [3], rc [4], tc [1, 3], wt [1, 2, 3]).
    Cohort("MET-2025", "MET", (2025,), "brain metastases, pre- and post-treatment (RC label)",
           {1: _NETC, 2: _SNFH, 3: _ET, 4: _RC}, _WITH_RC, _RC_REGIONS, "mets",
           {"wt": "WT", "tc": "TC", "et": "ET", "rc": "RC"}, source="https://arxiv.org/abs/2504.12527"),
    # BraTS 2023 paediatric: the adult 2023 label values and regions (https://arxiv.org/abs/2305.17033;
    # regions per the 2023 metrics), so it is scored with the gli config's wt/tc/et groups.
    Cohort("PED-2023", "PED", (2023,), "paediatric tumours (2023 labels)",
           {1: _NCR, 2: _ED, 3: _ET}, _THREE_LABELS, REGIONS, "gli", _THREE_EVAL,
           source="https://arxiv.org/abs/2305.17033"),
    # BraTS 2024/2025 paediatric: 1 ET, 2 NET, 3 CC, 4 ED; TC = 1+2+3, WT = 1+2+3+4:
    # https://arxiv.org/abs/2404.15009 ; config_ped.yaml (et [1], netc [2], cc [3], ed [4], tc, wt).
    # nnU-Net: 1 ED, 2 NET, 3 ET, 4 CC; regions WT, TC, ET, CC rebuild all four labels.
    Cohort("PED-2024", "PED", (2024, 2025), "paediatric tumours (2024+ labels: ET, NET, CC, ED)",
           {1: _ET, 2: ("NET", "non-enhancing tumour"), 3: ("CC", "cystic component"), 4: _ED},
           {0: 0, 1: 3, 2: 2, 3: 4, 4: 1},
           {"WT": (1, 2, 3, 4), "TC": (2, 3, 4), "ET": (3,), "CC": (4,)}, "ped",
           {"wt": "WT", "tc": "TC", "et": "ET", "netc": "NET", "cc": "CC", "ed": "ED"},
           source="https://arxiv.org/abs/2404.15009"),
    # BraTS 2023-2025 sub-Saharan Africa glioma: the 2023 adult labels, https://arxiv.org/abs/2305.19369
    Cohort("SSA-2023", "SSA", (2023, 2024, 2025), "adult glioma, sub-Saharan Africa",
           {1: _NCR, 2: _ED, 3: _ET}, _THREE_LABELS, REGIONS, "gli", _THREE_EVAL,
           source="https://arxiv.org/abs/2305.19369"),
    # BraTS 2024/2025 generalizability across tumours; labels of config_GoAT.yaml (et [3], tc [1, 3],
    # wt [1, 2, 3]); cases are named BraTS-GoAT-<subject> without timepoint.
    Cohort("GoAT-2024", "GoAT", (2024, 2025), "generalizability across tumours",
           {1: _NETC, 2: _SNFH, 3: _ET}, _THREE_LABELS, REGIONS, "GoAT", _THREE_EVAL,
           source="https://github.com/BraTS/BraTS_evaluation/blob/main/brats_evaluation/configs/config_GoAT.yaml"),
]

#: Cohort key -> cohort.
COHORTS: Dict[str, Cohort] = {c.key: c for c in _COHORT_LIST}
#: Years with a 2023+ cohort.
COHORT_YEARS: Tuple[int, ...] = tuple(sorted({y for c in _COHORT_LIST for y in c.years}))


def cohort_for(prefix: str, year: int) -> Cohort:
    """The cohort of ``prefix`` (GLI, MEN, MEN-RT, MET, PED, SSA, GoAT) in ``year``.

    Raises ValueError naming the years that exist for the prefix.
    """
    canonical = canonical_prefix(prefix)
    matches = [c for c in _COHORT_LIST if c.prefix == canonical and int(year) in c.years]
    if not matches:
        known = sorted({y for c in _COHORT_LIST if c.prefix == canonical for y in c.years})
        raise ValueError(f"BraTS {year} has no {canonical} cohort; {canonical} exists for {known}")
    return matches[0]


def cohorts_of_year(year: int) -> List[Cohort]:
    """The cohorts of BraTS ``year`` (empty before 2023)."""
    return [c for c in _COHORT_LIST if int(year) in c.years]


def label_conventions(year: int) -> int:
    """How many different label mappings the cohorts of ``year`` use (1 for 2023, more from 2024)."""
    return len({tuple(sorted(c.to_nnunet.items())) for c in cohorts_of_year(year)})


def to_nnunet(seg: np.ndarray, cohort: Cohort) -> np.ndarray:
    """Original labels of ``cohort`` -> nnU-Net labels (ValueError for labels outside the cohort's set)."""
    return map_labels(seg, cohort.to_nnunet)


def to_original(seg: np.ndarray, cohort: Cohort) -> np.ndarray:
    """nnU-Net labels -> the original labels of ``cohort`` (for ``--to-brats`` and the official metrics)."""
    return map_labels(seg, cohort.from_nnunet)
