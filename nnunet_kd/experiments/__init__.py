"""Experiment tools built on nnU-Net's commands: the demo, the distillation study and the benchmark."""
