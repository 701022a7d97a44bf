"""Training machinery shared by the trainers, and what weights, schedules and feeds the losses.

Feature access, channel subsets, pretrained teachers, checkpoints, budgets, precision, compilation, optimiser
steps, DDP helpers, the distillation log and gradient shares; performance-aware KD weights, ramps, modality
masks and the EMA teacher. The losses themselves are in :mod:`nnunet_kd.losses`; nothing here imports them.

Kept outside ``nnunet_kd/trainers/`` (the folder nnU-Net scans for trainer classes).
"""
