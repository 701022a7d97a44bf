"""Training-step, memory and inference cost of the KD trainers relative to stock nnU-Net.

All trainers of a setting run in ONE process on one device, one after the other, with the real plans of a
preprocessed nnU-Net dataset (planned patch and batch size):

* compute alone: median ``train_step`` time on one FIXED batch, taken once from the trainer's own
  dataloader after ``on_train_start`` (so data and deep-supervision targets are exactly what nnU-Net
  produces) and kept on the device; ``--warmup`` untimed steps first;
* with data loading: median time of ``next(trainer.dataloader_train)`` + ``train_step``, after the
  batches the augmenter had prefetched during the compute-alone phase were drained;
* peak GPU memory (``torch.cuda.max_memory_allocated``) over the training steps; on CPU the peak
  increase of the resident set size (sampled from /proc) instead;
* inference: ``nnUNetPredictor.predict_sliding_window_return_logits`` on one preprocessed case,
  the one-channel T1ce student vs. a stock four-channel network of the same plans (initial
  weights, the default mirroring and tile step), median of ``--inference-repeats``.

Ratios to ``nnUNetTrainer`` are computed within the run and checked against the targets
(:data:`nnunet_kd.experiments.benchmark.report.TARGETS`).

Examples::

    python -m nnunet_kd.experiments.benchmark --toy --device cpu --steps 2 --warmup 1 --data-loading-steps 1
    python -m nnunet_kd.experiments.benchmark --real-brats /data/BraTS2021_TrainingData -o bench.json
    python -m nnunet_kd.experiments.benchmark --dataset-id 137 -o bench.json     # an already preprocessed dataset

Progress and nnU-Net's own output go to stderr; stdout gets only the result table. The exit code is
1 when a trainer or the inference failed (the error is recorded in the JSON, the others still run).

Notes:

* Each setting is measured in a process of its own (:mod:`~nnunet_kd.experiments.benchmark.worker`), started
  with the setting's environment; the command's own environment is never changed. In it
  ``nnUNet_results`` always points into the temporary work folder (trainer logs land there), so a
  real results folder is never touched; ``--toy`` / ``--real-brats`` also put nnUNet_raw and
  nnUNet_preprocessed there. ``--work-dir`` keeps everything in a folder of your choice.
* Two settings: every trainer eagerly (``nnUNet_compile=0``; ``trainers``/``ratios``, eager against
  eager), and every trainer at nnU-Net's defaults (``nnUNet_compile`` unset: compiled exactly where
  ``nnUNetTrainer._do_i_compile`` compiles, i.e. on CUDA; the KD trainers compile all their U-Nets
  then). The ratios at the defaults (``defaults``) are the slowdown a user sees against stock
  nnU-Net, and the targets are checked on them. Where nnU-Net does not compile (CPU) the defaults
  are the eager run and are not measured twice. ``--eager-only`` skips the second setting.
* The frozen-teacher trainer gets three unimodal teacher model folders (T1, T2, FLAIR) written on the
  fly with the stock architecture of these plans and initial weights (``--frozen-teachers
  multimodal``: one four-channel teacher; ``--teacher-models``: real trained models).
* The KD trainers are timed with ``current_epoch = kd_start_epoch`` so all distillation terms run.
* ``--autocast bf16`` times every trainer in bfloat16 autocast on the CPU (``nnUNet_kd_autocast=bf16``); the
  stock row is then nnUNetTrainerBudget (stock nnU-Net with the same autocast), so the ratios stay bf16 against
  bf16. On CUDA it changes nothing (nnU-Net's fp16 autocast).

The modules: :mod:`~nnunet_kd.experiments.benchmark.cli` (the command),
:mod:`~nnunet_kd.experiments.benchmark.run` (data, environment, the settings' processes),
:mod:`~nnunet_kd.experiments.benchmark.worker` (one setting's process),
:mod:`~nnunet_kd.experiments.benchmark.measure` (the measurements), :mod:`~nnunet_kd.experiments.benchmark.report`
(ratios, targets, the table).
"""
