"""BraTS conventions shared by the converter, the trainers, the losses, the inference and the evaluation.

One home per convention:

- :mod:`~nnunet_kd.brats.modalities`: modality names and aliases, channels found by name, modality subsets;
- :mod:`~nnunet_kd.brats.labels`: nnU-Net's labels (1 ED, 2 NCR, 3 ET) and each release's label convention;
- :mod:`~nnunet_kd.brats.regions`: the regions WT, TC, ET and their masks;
- :mod:`~nnunet_kd.brats.case_names`: the case names of the BraTS 2023-2025 cohorts;
- :mod:`~nnunet_kd.brats.cohorts`: the BraTS 2023-2025 cohorts (labels, nnU-Net labels, regions).

Every public name is importable from ``nnunet_kd.brats`` itself.
"""
from nnunet_kd.brats.case_names import (ANY_CASE_PATTERN, COHORT_CASE_PATTERNS, COHORT_PREFIXES,
                                        POST_TREATMENT_TIMEPOINT, canonical_prefix, parse_case_id)
from nnunet_kd.brats.cohorts import (COHORT_YEARS, COHORTS, Cohort, cohort_for, cohorts_of_year, label_conventions,
                                     to_nnunet, to_original)
from nnunet_kd.brats.labels import (LABEL_CONVENTION_ALIASES, LABEL_SET_NAMES, NNUNET_LABELS,
                                    RELEASE_LABEL_CONVENTIONS, RELEASE_TO_NNUNET, canonical_label_convention,
                                    map_labels, nnunet_to_release, release_labels)
from nnunet_kd.brats.modalities import (MODALITIES, MODALITY_ALIASES, MODALITY_FILE_TOKENS, all_modality_subsets,
                                        canonical_modality, channel_index, channel_indices, channel_names_of,
                                        dataset_modalities, display_name, modalities_text, modality_combinations,
                                        modality_label, modality_order)
from nnunet_kd.brats.regions import REGION_NAMES, REGIONS, region_masks

__all__ = [
    # modalities
    "MODALITIES", "MODALITY_ALIASES", "MODALITY_FILE_TOKENS", "all_modality_subsets", "canonical_modality",
    "channel_index", "channel_indices", "channel_names_of", "dataset_modalities", "display_name", "modalities_text",
    "modality_combinations", "modality_label", "modality_order",
    # labels
    "LABEL_CONVENTION_ALIASES", "LABEL_SET_NAMES", "NNUNET_LABELS", "RELEASE_LABEL_CONVENTIONS", "RELEASE_TO_NNUNET",
    "canonical_label_convention", "map_labels", "nnunet_to_release", "release_labels",
    # regions
    "REGION_NAMES", "REGIONS", "region_masks",
    # 2023+ case names and cohorts
    "ANY_CASE_PATTERN", "COHORT_CASE_PATTERNS", "COHORT_PREFIXES", "POST_TREATMENT_TIMEPOINT", "canonical_prefix",
    "parse_case_id", "COHORT_YEARS", "COHORTS", "Cohort", "cohort_for", "cohorts_of_year", "label_conventions",
    "to_nnunet", "to_original",
]
