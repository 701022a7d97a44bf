"""nnunet-kd: knowledge-distillation trainers for nnU-Net v2 (MTCM-KD, MGSD)."""
__version__ = "0.1.0"
