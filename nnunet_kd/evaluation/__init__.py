"""BraTS evaluation of segmentations.

- :mod:`~nnunet_kd.evaluation.metrics`: Dice, HD95, WT/TC/ET metrics and their means (BraTS 2018-2021
  conventions), the ``--labels`` conventions (the label values themselves are :mod:`nnunet_kd.brats`'s);
- :mod:`~nnunet_kd.evaluation.evaluate`: scoring a folder of predictions against references;
  :mod:`~nnunet_kd.evaluation.evaluate_cli`: the ``nnunet_kd_evaluate`` command;
- :mod:`~nnunet_kd.evaluation.tables` and :mod:`~nnunet_kd.evaluation.plots`: the CSV tables and figures;
- :mod:`~nnunet_kd.evaluation.lesionwise`: the official BraTS 2023+ lesion-wise metrics (optional extra
  ``brats-eval``); :mod:`~nnunet_kd.evaluation.modes`: ``--metrics legacy|lesionwise|both`` and
  ``evaluate_with_metrics``, the entry point for commands and the study;
- :mod:`~nnunet_kd.evaluation.missing_modalities`: the evaluation under every combination of missing
  modalities (``nnunet_kd_evaluate_missing``), built on :mod:`nnunet_kd.inference`.
"""
