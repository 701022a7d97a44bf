"""nnU-Net trainers of nnunet-kd: one file per method (``nnUNetTrainerMTCMKD.py``, ``nnUNetTrainerMGSD.py``),
its variants beside it (``*_variants.py``), and the budgeted stock trainer.

nnU-Net finds them by class name through ``nnUNet_extTrainer`` pointing at this folder
(``eval "$(nnunet_kd_env)"``). It imports the modules here by their bare file
names, so every module in this folder uses absolute imports only, and a method file never
imports its variants.
"""
