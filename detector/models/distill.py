"""Knowledge distillation (``--teacher WEIGHTS --distill GAIN``): a trained teacher's outputs as extra targets.

The teacher and the student predict on the same grid: the same strides and the same number of anchors per cell
(any depth, width or backbone; anchor sizes may differ). On every training batch the teacher sees the same
augmented images as the student, in eval mode, without gradients and under the same autocast, and for each level,
anchor and cell the student is pulled towards it, objectness-scaled as in Mehta & Ozturk, "Object detection at 200
frames per second" (2018):

- **objectness**: the binary KL divergence from the teacher's objectness probability to the student's, both
  logits divided by the temperature ``T`` (``hyp.distill_t``); mean over all cells, levels weighted like the
  objectness loss (:func:`~detector.models.loss.level_balance`);
- **classes**: the same binary KL per class (YOLO's classes are independent sigmoids), mean over the classes,
  then the mean over the cells weighted by the teacher's objectness probability: the teacher's class opinion
  counts where it sees an object (none with one class: objectness says it all, as in the detection loss);
- **boxes**: the L1 distance between the decoded boxes, ``(2 sigmoid(xy) - 0.5)`` offsets in the cell and
  ``log(wh)`` with ``wh = (2 sigmoid)^2 * anchor`` in grid units, each model with its own anchors (so AutoAnchor may
  give the student other anchors than the teacher's); weighted by the teacher's objectness like the classes.

KL rather than BCE against the soft targets: BCE's minimum is the teacher's entropy, not 0, so the term would
never vanish; the KL is BCE minus that entropy, and is exactly 0 when the student's outputs equal the teacher's.
Both KLs are multiplied by ``T^2`` (Hinton et al. 2015) so their gradients keep their size as ``T`` changes.

:class:`DistillationLoss` wraps the trainer's loss and adds the three parts as one named term, ``distill``:
``hyp.distill * (box * boxes + obj * objectness + cls * classes)`` with the detection loss's own scaled gains, so
at ``--distill 1`` matching the teacher weighs what matching the labels weighs. The trainer passes it the batch's
images (``images=``); without them (validation) it returns the wrapped loss's terms alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detector.errors import ConfigError
from detector.models.loading import load_model
from detector.models.loss import LossFunction, level_balance, weighted_mean
from detector.models.yolo import detect_head

LOGGER = logging.getLogger(__name__)

DISTILL_TERM = "distill"  # the loss term's name: results.csv's train/distill_loss column


class DistillationParts(NamedTuple):
    """The three parts of the distillation term (scalar float32 tensors, no gains applied)."""

    objectness: Tensor
    classes: Tensor
    boxes: Tensor


def binary_kl_with_logits(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """Element-wise ``T^2 * KL(Bernoulli(sigmoid(teacher / T)) || Bernoulli(sigmoid(student / T)))`` of logits.

    Computed as BCE(student, p) - BCE(teacher, p) with ``p = sigmoid(teacher / T)``, both from logits (stable for
    any logit); exactly 0 where ``student == teacher``.
    """
    target = torch.sigmoid(teacher / temperature)
    cross = F.binary_cross_entropy_with_logits(student / temperature, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher / temperature, target, reduction="none")
    return (cross - entropy) * temperature**2


def decoded_box_params(raw: Tensor, anchors: Tensor) -> Tensor:
    """(B, na, H, W, 4) ``[x, y, log w, log h]`` of a raw map (B, na, H, W, 5 + nc) with its (na, 2) anchors in grid
    units: xy the ``2 sigmoid - 0.5`` offset in the cell, wh = ``(2 sigmoid)^2 * anchor`` (the head's decoding)."""
    xy = raw[..., 0:2].sigmoid() * 2 - 0.5
    log_wh = 2 * (F.logsigmoid(raw[..., 2:4]) + math.log(2.0)) + anchors.log().view(1, -1, 1, 1, 2)
    return torch.cat((xy, log_wh), dim=-1)


def distillation_parts(
    student_maps: Sequence[Tensor],
    teacher_maps: Sequence[Tensor],
    student_anchors: Tensor,
    teacher_anchors: Tensor,
    *,
    temperature: float = 1.0,
    balance: Sequence[float] | None = None,
) -> DistillationParts:
    """The objectness, class and box parts (module docstring) of raw maps (B, na, H_i, W_i, 5 + nc), one per level,
    of the student and the teacher; anchors (nl, na, 2) in grid units, each model's own. ``balance``: the
    objectness weight of each level (default :func:`~detector.models.loss.level_balance`)."""
    if len(student_maps) != len(teacher_maps):
        raise ValueError(
            f"distillation: the student has {len(student_maps)} output levels, the teacher {len(teacher_maps)}"
        )
    balance = level_balance(len(student_maps)) if balance is None else balance
    device = student_maps[0].device
    objectness = torch.zeros((), device=device)
    classes = torch.zeros((), device=device)
    boxes = torch.zeros((), device=device)
    for level, (student, teacher) in enumerate(zip(student_maps, teacher_maps, strict=True)):
        if student.shape != teacher.shape:
            raise ValueError(
                f"distillation: level {level} maps differ, student {tuple(student.shape)} and teacher "
                f"{tuple(teacher.shape)}; both must be (B, na, H, W, 5 + nc) on the same grid"
            )
        student, teacher = student.float(), teacher.float().detach()
        object_kl = binary_kl_with_logits(student[..., 4], teacher[..., 4], temperature)
        objectness = objectness + balance[level] * object_kl.mean()
        weights = teacher[..., 4].sigmoid()  # where the teacher sees an object, at temperature 1
        if student.shape[-1] > 6:  # more than one class
            class_kl = binary_kl_with_logits(student[..., 5:], teacher[..., 5:], temperature).mean(dim=-1)
            classes = classes + weighted_mean(class_kl, weights)
        student_boxes = decoded_box_params(student, student_anchors[level].float())
        teacher_boxes = decoded_box_params(teacher, teacher_anchors[level].float())
        boxes = boxes + weighted_mean((student_boxes - teacher_boxes).abs().sum(dim=-1), weights)
    return DistillationParts(objectness, classes, boxes)


def check_teacher(teacher: nn.Module, student: nn.Module, source: str = "--teacher") -> None:
    """One-line ConfigError unless ``teacher`` predicts ``student``'s classes on its grid (same strides and anchors
    per cell; anchor sizes may differ)."""
    teacher_head, student_head = detect_head(teacher), detect_head(student)
    if int(teacher_head.nc) != int(student_head.nc):
        raise ConfigError(
            f"{source}: predicts {int(teacher_head.nc)} classes, the model being trained {int(student_head.nc)}; "
            "distillation needs a teacher trained on the same classes"
        )
    teacher_grid = ([round(s) for s in teacher_head.stride.tolist()], int(teacher_head.na))
    student_grid = ([round(s) for s in student_head.stride.tolist()], int(student_head.na))
    if teacher_grid != student_grid:
        raise ConfigError(
            f"{source}: predicts on strides {teacher_grid[0]} with {teacher_grid[1]} anchors per cell, the model "
            f"being trained on strides {student_grid[0]} with {student_grid[1]}; distillation compares them per cell"
        )


def load_teacher(weights: str | Path, student: nn.Module, device: str | torch.device = "cpu") -> nn.Module:
    """The ``--teacher`` model for distillation: any ``.pt`` :func:`~detector.models.loading.load_model` reads
    (ours, YOLOv5's), checked against ``student`` (:func:`check_teacher`), BatchNorm fused, in eval mode on
    ``device`` with ``requires_grad`` off."""
    teacher = load_model(weights, device=device, fuse=True).requires_grad_(False)
    check_teacher(teacher, student, f"--teacher {weights}")
    LOGGER.info(
        "Distillation: teacher %s (%.2f M parameters) on %s",
        weights,
        sum(p.numel() for p in teacher.parameters()) / 1e6,
        device,
    )
    return teacher


class DistillationLoss:
    """``base_loss``'s terms plus ``distill``, the teacher's outputs as targets (module docstring).

    base_loss: the trainer's loss, ``(raw_maps, targets[, weights]) -> {name: term}``; per-target ``weights``
        (pseudo-labels) pass through to it.
    teacher: a DetectionModel (``forward_raw``) on the training device; kept in eval mode with ``requires_grad``
        off. It is not the trained model's submodule, so it is in no optimizer, EMA, DDP wrapper or checkpoint.
    student: the model being trained (or its DDP wrapper): its anchors are read on every call, so anchors changed by
        AutoAnchor after construction are used.
    gain: ``hyp.distill``; temperature: ``hyp.distill_t``; box_gain, obj_gain, cls_gain: the detection loss's
        gains (scaled with :func:`~detector.models.loss.scale_loss_gains`) for the box, objectness and class parts.
    """

    def __init__(
        self,
        base_loss: LossFunction,
        teacher: nn.Module,
        student: nn.Module,
        *,
        gain: float = 1.0,
        temperature: float = 1.0,
        box_gain: float = 1.0,
        obj_gain: float = 1.0,
        cls_gain: float = 1.0,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be positive, got {temperature}")
        check_teacher(teacher, student)
        self.base_loss = base_loss
        self.teacher = teacher.eval().requires_grad_(False)
        self.student_head = detect_head(student)
        self.teacher_head = detect_head(teacher)
        self.gain, self.temperature = gain, temperature
        self.box_gain, self.obj_gain, self.cls_gain = box_gain, obj_gain, cls_gain
        self._cached: tuple[Tensor, list[Tensor]] | None = None  # (images, the teacher's maps of them)

    def __call__(
        self, raw_maps: list[Tensor], targets: Tensor, weights: Tensor | None = None, *, images: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The base loss's terms and, given the batch's ``images`` (B, 3, H, W) float 0-1 that made ``raw_maps``,
        ``distill`` (gains applied); call it under the autocast the student's forward ran under."""
        terms = dict(
            self.base_loss(raw_maps, targets) if weights is None else self.base_loss(raw_maps, targets, weights)
        )
        if images is None:
            return terms
        parts = distillation_parts(
            raw_maps,
            self.teacher_maps(images),
            self.student_head.anchors,
            self.teacher_head.anchors,
            temperature=self.temperature,
        )
        weighted = self.box_gain * parts.boxes + self.obj_gain * parts.objectness + self.cls_gain * parts.classes
        terms[DISTILL_TERM] = self.gain * weighted
        return terms

    @torch.no_grad()
    def teacher_maps(self, images: Tensor) -> list[Tensor]:
        """The teacher's raw maps of ``images``, in eval mode and without gradients. The latest batch's are kept:
        a second call with the same tensor (``--sam``'s second pass) reuses them instead of running the teacher."""
        if self._cached is not None and self._cached[0] is images:
            return self._cached[1]
        if self.teacher.training:  # a caller's model.train() over every module must not reach the teacher
            self.teacher.eval()
        maps = self.teacher.forward_raw(images)
        self._cached = (images, maps)
        return maps
