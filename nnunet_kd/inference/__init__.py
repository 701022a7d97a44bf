"""Inference when some MRI modalities are missing.

- :mod:`~nnunet_kd.inference.inputs`: the input files of each case, modality names -> channels;
- :mod:`~nnunet_kd.inference.preprocessing`: nnU-Net's preprocessing with zero-filled missing channels;
- :mod:`~nnunet_kd.inference.models`: the model folder, its folds, the device, the loaded predictor;
- :mod:`~nnunet_kd.inference.predict`: the prediction and the ``nnunet_kd_predict`` command.

Nothing here imports :mod:`nnunet_kd.evaluation` (which builds on this package).
"""
