"""MTCM-KD's pretrained teachers from trained nnU-Net models: which fold's checkpoint, and the network
loaded frozen. The model folder's folds and the predictor come from inference/models.py, as for prediction."""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from nnunet_kd.inference.models import folds_with_checkpoint, load_predictor
from nnunet_kd.training.features import unwrap_network


def load_frozen_teacher(model_dir: str, fold_name: str, checkpoint_name: str, device: torch.device,
                        configuration_manager: Any, label_manager: Any) -> nn.Module:
    """The trained network of ``model_dir/fold_<fold_name>/<checkpoint_name>``, in eval mode, without gradients.

    ValueError naming the model when its plan (spacing, pooling) or its outputs differ from the student's.
    """
    predictor = load_predictor(model_dir, (fold_name,), checkpoint_name, device, allow_tqdm=False)
    teacher_config = predictor.configuration_manager
    if (teacher_config.pool_op_kernel_sizes != configuration_manager.pool_op_kernel_sizes
            or not np.allclose(teacher_config.spacing, configuration_manager.spacing)):
        raise ValueError(f"teacher {model_dir} was planned with spacing {teacher_config.spacing} and pooling "
                         f"{teacher_config.pool_op_kernel_sizes}; this plan has spacing "
                         f"{configuration_manager.spacing} and pooling "
                         f"{configuration_manager.pool_op_kernel_sizes}")
    if predictor.label_manager.num_segmentation_heads != label_manager.num_segmentation_heads or \
            predictor.label_manager.has_regions != label_manager.has_regions:
        raise ValueError(f"teacher {model_dir} predicts different labels or regions than this dataset")
    # Under nnUNet_compile the predictor compiles the network (state-dict keys gain '_orig_mod.'); the teacher
    # runs eagerly because its decoder features are read through forward hooks, so take the network inside.
    network = unwrap_network(predictor.network)
    network.load_state_dict(predictor.list_of_parameters[0])
    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return network.to(device)


def initialise_from_teacher(student: nn.Module, teacher: nn.Module, input_channels: Sequence[int]) -> None:
    """Copy a trained teacher's weights into a student of the same architecture that reads only some of the
    teacher's input channels.

    Every tensor of the same shape is copied. A tensor whose input dimension (dim 1) differs is a convolution
    that reads the network's input: it keeps the teacher's weights of ``input_channels`` (indices into the
    teacher's inputs, one per student input channel). Everything after that convolution being equal, the
    student on those channels then computes exactly what the teacher computes with its other inputs at zero.
    Both are plain modules (not DDP- or compile-wrapped); the student's tensors are written in place, so an
    optimiser built over them keeps working. ValueError naming the tensor when the two differ otherwise.
    """
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    if set(student_state) != set(teacher_state):
        differ = sorted(set(student_state) ^ set(teacher_state))
        raise ValueError(f"the student and the teacher are different architectures (tensors only one has: "
                         f"{differ[:4]}{' ...' if len(differ) > 4 else ''}); the warm start needs the same plans")
    selected = torch.as_tensor(list(input_channels), dtype=torch.long)
    with torch.no_grad():
        for name, target in student_state.items():
            source = teacher_state[name]
            if source.shape != target.shape:
                if not (source.ndim > 2 and source.shape[0] == target.shape[0] and source.shape[2:] == target.shape[2:]
                        and target.shape[1] == len(selected) and int(selected.max()) < source.shape[1]):
                    raise ValueError(f"tensor {name}: the teacher's is {tuple(source.shape)}, the student's "
                                     f"{tuple(target.shape)}; only the input convolution may differ, in its input "
                                     f"channels ({len(selected)} of the teacher's {source.shape[1]})")
                source = source.index_select(1, selected.to(source.device))
            target.copy_(source.to(target.device, target.dtype))


def check_teacher_fold(teacher_fold: str, student_fold: Union[int, str], teacher: str) -> Optional[str]:
    """Refuse a teacher trained on another cross-validation fold than the student's; warn for ``fold_all``.

    A teacher of another fold trained on (some of) the student's validation cases: its validation Dice,
    from which the KD weights come, is inflated there, and the student's validation is no longer held
    out from what taught it. ``fold_all`` saw every case, too, but is the model many users have (and
    the natural teacher of a student trained on ``all``), so it is allowed with a warning.

    Returns the warning for the training log (None when the folds match); ValueError naming both folds
    and the fix otherwise.
    """
    teacher_fold, student_fold = str(teacher_fold), str(student_fold)
    if teacher_fold == student_fold:
        return None
    if teacher_fold == "all":
        return (f"WARNING: teacher {teacher} is fold_all: it was trained on every case, including this "
                f"fold's ({student_fold}) validation cases, so its validation Dice (and the KD weights taken "
                f"from it) are optimistic and this fold's validation is not independent of the teacher. "
                f"Use the teacher's fold_{student_fold} for an honest cross-validation.")
    raise ValueError(f"teacher {teacher} is fold_{teacher_fold} but the student trains fold {student_fold}: a "
                     f"teacher of another fold was trained on the student's validation cases. Give the "
                     f"teacher's fold_{student_fold} (train it with nnUNetv2_train ... {student_fold}), or "
                     f"its fold_all (allowed, with a warning)")


def resolve_teacher_checkpoint(path: str, fold: Union[int, str]) -> Tuple[str, str, str]:
    """(model folder, fold folder name without 'fold_', checkpoint file name) for a teacher given as a
    checkpoint file, a fold folder or a model folder. From a model folder the student's fold is taken,
    else ``fold_all``. Raises ValueError naming the path when it is none of these, or when the teacher's
    fold is another cross-validation fold than the student's ``fold`` (:func:`check_teacher_fold`)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(path):
        fold_dir, checkpoint_name = os.path.split(path)
    elif os.path.isfile(os.path.join(path, "checkpoint_final.pth")):
        fold_dir, checkpoint_name = path, "checkpoint_final.pth"
    elif os.path.isfile(os.path.join(path, "plans.json")):
        folds = [f"fold_{f}" for f in folds_with_checkpoint(path)]
        if not folds:
            raise ValueError(f"teacher model folder {path} has no fold_*/checkpoint_final.pth")
        usable = [d for d in (f"fold_{fold}", "fold_all") if d in folds]
        if not usable:
            raise ValueError(f"teacher model folder {path} has {', '.join(folds)} but not fold_{fold}, the "
                             f"student's fold (nor fold_all): a teacher of another fold was trained on the "
                             f"student's validation cases. Train the teacher's fold {fold} first")
        fold_dir, checkpoint_name = os.path.join(path, usable[0]), "checkpoint_final.pth"
    else:
        raise ValueError(f"teacher {path} is not a checkpoint file, a fold folder with checkpoint_final.pth, "
                         f"or an nnU-Net model folder")
    model_dir = os.path.dirname(fold_dir)
    for name in ("plans.json", "dataset.json"):
        if not os.path.isfile(os.path.join(model_dir, name)):
            raise ValueError(f"teacher {path}: {os.path.join(model_dir, name)} is missing")
    fold_name = os.path.basename(fold_dir)
    if not fold_name.startswith("fold_"):
        raise ValueError(f"teacher checkpoint {path} must lie in a fold_X folder of an nnU-Net model folder")
    check_teacher_fold(fold_name[len("fold_"):], fold, path)  # raises for another fold
    return model_dir, fold_name[len("fold_"):], checkpoint_name
