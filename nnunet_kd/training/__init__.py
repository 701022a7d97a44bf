"""Training machinery shared by the trainers: feature access, checkpoints, budgets, optimiser steps, logging.

Kept outside ``nnunet_kd/trainers/`` (the folder nnU-Net scans for trainer classes).
"""
