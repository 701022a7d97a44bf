"""Experiment tools built on nnU-Net's commands: the demo, synthetic data, the distillation study
(:mod:`~nnunet_kd.experiments.study`) and the cost benchmark (:mod:`~nnunet_kd.experiments.benchmark`), with
the command runner and dataset steps they share."""
