"""The converted dataset's dataset.json: nnU-Net's entries (channels, the regions as labels,
``regions_class_order``) plus the original labels of the release or 2023+ cohort, which ``--to-brats``
and the lesion-wise evaluation read back (``brats_cohort``)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from nnunet_kd.brats import COHORTS, REGION_NAMES, REGIONS, RELEASE_TO_NNUNET, Cohort
from nnunet_kd.conversion.releases import OUT_ENDING


def gli_differences(cohort: Cohort) -> List[str]:
    """Where the cohort's label values mean something else than in BraTS 2023 GLI (1 NCR, 2 ED, 3 ET):
    one sentence per differing or extra label value (empty for GLI 2023 and cohorts with its labels)."""
    gli = COHORTS["GLI-2023"]
    out = []
    for value, (abbr, meaning) in sorted(cohort.labels.items()):
        if value not in gli.labels:
            out.append(f"label {value} is {abbr} ({meaning}), a label GLI 2023 does not have")
        elif cohort.to_nnunet[value] != gli.to_nnunet[value]:
            out.append(f"label {value} is {abbr} ({meaning}), where GLI 2023 has {gli.labels[value][0]}")
    for value in sorted(set(gli.labels) - set(cohort.labels)):
        out.append(f"label {value} ({gli.labels[value][0]} in GLI 2023) is not used")
    return out


def dataset_json_fields(cohort: Cohort) -> Dict[str, object]:
    """Extra dataset.json entries describing the cohort's original labels (read back by ``--to-brats``)."""
    return {
        "brats_cohort": cohort.key,
        "original_labels": {str(v): f"{abbr}: {meaning}" for v, (abbr, meaning) in sorted(cohort.labels.items())},
        "original_to_nnunet_labels": {str(k): v for k, v in sorted(cohort.to_nnunet.items())},
        "nnunet_label_meaning": {str(k): v for k, v in cohort.nnunet_label_names().items()},
        "original_regions": {name: list(m) for name, m in cohort.original_regions().items()},
        "label_meaning_differs_from_GLI": gli_differences(cohort),
        "label_source": cohort.source,
    }


def write_dataset_json(folder: str, chosen: Tuple[str, ...], num_training: int, num_test: int, name: str,
                       release: str, convention: str, cohort: Optional[Cohort] = None) -> None:
    """Write ``folder/dataset.json`` with nnU-Net's generate_dataset_json: channels ``chosen``, the WT/TC/ET
    regions (or the 2023+ cohort's own labels and regions) and the original label convention."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if cohort is not None:  # 2023+ cohort: its own labels and regions (brats/cohorts.py)
        generate_dataset_json(
            folder, channel_names={str(i): m for i, m in enumerate(chosen)}, labels=cohort.dataset_json_labels(),
            num_training_cases=num_training, file_ending=OUT_ENDING, regions_class_order=cohort.regions_class_order,
            dataset_name=name, release=release, license="see the license of the original release",
            description=f"BraTS {cohort.key} ({cohort.title}) converted by nnunet_kd_convert_brats; nnU-Net labels: "
                        + "; ".join(f"{k} {v}" for k, v in cohort.nnunet_label_names().items()),
            converted_by="nnunet_kd_convert_brats", original_label_convention=convention, numTest=num_test,
            **dataset_json_fields(cohort))
        return
    generate_dataset_json(
        folder,
        channel_names={str(i): m for i, m in enumerate(chosen)},
        labels={"background": 0, **{REGION_NAMES[region]: list(members) for region, members in REGIONS.items()}},
        num_training_cases=num_training,
        file_ending=OUT_ENDING,
        regions_class_order=(1, 2, 3),
        dataset_name=name,
        release=release,
        description=f"{release} converted by nnunet_kd_convert_brats; labels 1 edema, 2 necrosis/non-enhancing "
                    f"core, 3 enhancing tumour (trained as regions)",
        license="see the license of the original release",
        converted_by="nnunet_kd_convert_brats",
        original_label_convention=convention,
        original_to_nnunet_labels={str(k): v for k, v in RELEASE_TO_NNUNET[convention].items()},
        numTest=num_test,
    )
