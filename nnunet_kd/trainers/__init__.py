"""nnU-Net trainers of nnunet-kd.

nnU-Net finds them through ``nnUNet_extTrainer`` pointing at this folder
(``eval "$(nnunet_kd_env)"``). It imports the modules here by their bare file
names, so every module in this folder uses absolute imports only.
"""
