"""BraTS evaluation of segmentations.

- :mod:`~nnunet_kd.evaluation.metrics`: Dice, HD95, WT/TC/ET metrics and their means (BraTS conventions),
  label conventions;
- :mod:`~nnunet_kd.evaluation.evaluate`: scoring a folder of predictions against references, and the
  ``nnunet_kd_evaluate`` command;
- :mod:`~nnunet_kd.evaluation.tables` and :mod:`~nnunet_kd.evaluation.plots`: the CSV tables and figures;
- :mod:`~nnunet_kd.evaluation.missing_modalities`: the evaluation under every combination of missing
  modalities (``nnunet_kd_evaluate_missing``), built on :mod:`nnunet_kd.inference`.
"""
