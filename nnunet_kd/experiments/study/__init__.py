"""The distillation-effect study (``nnunet_kd_study``, ``python -m nnunet_kd.experiments.study``).

- :mod:`~nnunet_kd.experiments.study.design`: the models, settings and data splits it compares;
- :mod:`~nnunet_kd.experiments.study.cli` and :mod:`~nnunet_kd.experiments.study.run`: the command and its
  steps (prepare each split, train and score every model);
- :mod:`~nnunet_kd.experiments.study.collect`: what the split folders hold, read back;
- :mod:`~nnunet_kd.experiments.study.paired`: paired per-case differences with interval and test;
- :mod:`~nnunet_kd.experiments.study.report`, :mod:`~nnunet_kd.experiments.study.tables` and
  :mod:`~nnunet_kd.experiments.study.plots`: the report (study.json, study.md and the figures).
"""
