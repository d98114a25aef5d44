"""YOLOv5's detection loss, re-expressed: anchor matching, CIoU box loss, IoU-target objectness, BCE classes.

For every ground-truth box and every output level the loss

1. keeps the (box, anchor) pairs whose width and height are both within a factor ``anchor_t`` of the anchor
   (``max(r, 1/r) < anchor_t`` with ``r = box_wh / anchor_wh``, in grid units);
2. assigns each kept pair to the cell that holds the box centre and to the two neighbouring cells closest to
   the centre (left or right, and up or down, chosen by which half of the cell the centre lies in; YOLOv5's
   ``g = 0.5`` rule), which triples the positives and lets the ``2 * sigmoid - 0.5`` xy decoding reach them;
3. scores those predictions with ``1 - CIoU`` (box), uses their detached, clamped IoU as the objectness
   target of the cell (highest IoU wins when several targets land on one cell and anchor), and BCE on one-hot
   class targets (only when there is more than one class).

Optional per-target weights (e.g. pseudo-labels at a lower weight, :mod:`detector.engine.pseudo`) turn each mean
into a weighted mean: the box term over the target's assignments, the class BCE over its rows, and the objectness
BCE of the cells it is assigned to (the highest weight of the targets sharing a cell; every other cell weighs 1).
A target of weight 0 thus counts as absent from the box and class terms and leaves its cells out of the objectness
term (neither object nor background). Weights all 1 give exactly the unweighted loss.

Level losses are weighted by a per-level balance (more weight on the fine, many-cell P3 level), multiplied by
the ``box``/``obj``/``cls`` gains of :class:`~detector.config.Hyperparameters` (scale them once with
:func:`scale_loss_gains`) and returned as named terms. The trainer minimises their sum multiplied by the batch
size, as YOLOv5 does, so learning rates and hyperparameter files carry over unchanged.

A loss for the trainer is any callable ``(raw_maps, targets) -> dict[str, Tensor]`` of scalar terms; a new term
(distillation, sparsity) is one more key, and the progress bar, results.csv, TensorBoard and results.png show it
as ``<key>_loss`` with no other change.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from detector.config import Hyperparameters
from detector.models.yolo import detect_head
from detector.ops.boxes import bbox_ciou

# What the trainer and the validator call a loss: (raw maps, targets (N, 6)) -> named scalar terms.
LossFunction = Callable[[list[Tensor], Tensor], Mapping[str, Tensor]]

# Objectness weight of each level, fine to coarse: P3 has 16x the cells of P5, and gets more weight so small
# objects are not drowned out (YOLOv5 issue #2026). Four-level (P6) models use the first four of the long list.
LEVEL_BALANCE_P5 = (4.0, 1.0, 0.4)
LEVEL_BALANCE_P6 = (4.0, 1.0, 0.25, 0.06, 0.02)

# The five candidate cells of a target, as offsets in grid units subtracted from its centre: its own cell, then
# left, up, right and down neighbours. 0.5 is YOLOv5's ``g``: a neighbour qualifies when the centre lies in
# the half of the cell facing it.
NEIGHBOUR_OFFSET = 0.5
_CANDIDATE_OFFSETS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))

# Class prior of RetinaNet (Lin et al., 2017): with focal loss, class logits start at sigmoid^-1(0.01) so the
# many easy negatives do not dominate the first iterations.
FOCAL_CLASS_PRIOR = 0.01


def scale_loss_gains(hyp: Hyperparameters, nl: int, nc: int, imgsz: int) -> Hyperparameters:
    """The gains YOLOv5's train.py feeds its loss: box, obj and cls scaled by 3 / nl (number of levels),
    obj also by (imgsz / 640)^2 (objectness is summed per pixel) and cls by nc / 80 (per class).

    Call once in the trainer and pass the result to :class:`DetectionLoss` (and save it in the checkpoint).
    """
    level_scale = 3.0 / nl
    return dataclasses.replace(
        hyp,
        box=hyp.box * level_scale,
        obj=hyp.obj * (imgsz / 640) ** 2 * level_scale,
        cls=hyp.cls * nc / 80 * level_scale,
    )


def level_balance(nl: int) -> tuple[float, ...]:
    """Objectness weight of each of ``nl`` output levels (fine to coarse)."""
    return LEVEL_BALANCE_P5 if nl == 3 else LEVEL_BALANCE_P6[:nl]


def smooth_bce_targets(epsilon: float) -> tuple[float, float]:
    """(positive, negative) BCE class targets with label smoothing: (1 - eps/2, eps/2)."""
    return 1.0 - 0.5 * epsilon, 0.5 * epsilon


class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017) around a ``BCEWithLogitsLoss``: each element's BCE is multiplied by
    ``alpha_t * (1 - p_t)^gamma`` so confident, correct predictions contribute little.

    The wrapped loss keeps its ``pos_weight``/``weight``; its reduction is applied after the focal factor.
    Without weights this equals ``torchvision.ops.sigmoid_focal_loss`` (tested).
    """

    def __init__(self, bce: nn.BCEWithLogitsLoss, gamma: float = 1.5, alpha: float = 0.25) -> None:
        super().__init__()
        self.bce = bce
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = bce.reduction
        self.bce.reduction = "none"  # the focal factor is applied per element, then reduced here

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        loss = self.bce(logits, targets)
        probability = logits.sigmoid()
        p_t = targets * probability + (1 - targets) * (1 - probability)
        alpha_t = targets * self.alpha + (1 - targets) * (1 - self.alpha)
        loss = loss * alpha_t * (1.0 - p_t) ** self.gamma
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


class LevelTargets(NamedTuple):
    """Predictions that one output level must match, one row per (target, anchor, cell) assignment (n rows).

    ``image``, ``anchor``, ``grid_y``, ``grid_x``: int64 (n,) index into the level's (B, na, H, W) map.
    ``boxes``: float (n, 4) target box as (x, y) offset from the cell's top-left corner and (w, h), grid units.
    ``anchors``: float (n, 2) anchor (w, h) in grid units. ``classes``: int64 (n,).
    ``target``: int64 (n,) the row of ``targets`` each assignment comes from (to look up per-target weights).
    """

    image: Tensor
    anchor: Tensor
    grid_y: Tensor
    grid_x: Tensor
    boxes: Tensor
    anchors: Tensor
    classes: Tensor
    target: Tensor


def assign_targets(
    targets: Tensor, anchors: Tensor, grid_shape: tuple[int, int], anchor_t: float = 4.0
) -> LevelTargets:
    """Match ground truth to the anchors and cells of one output level (vectorised, no loop over targets).

    targets: float (N, 6) ``[image_index, class, x, y, w, h]`` with xywh normalised to 0-1.
    anchors: float (na, 2) anchor (w, h) of this level in grid units (pixels / stride).
    grid_shape: (H, W) of the level's feature map.
    A (target, anchor) pair is kept when ``max(r, 1/r) < anchor_t`` for both sides, ``r = box_wh / anchor_wh``;
    it is assigned to the centre's cell plus the nearer horizontal and vertical neighbours (not across the
    image border: a centre within one cell of the border gets no neighbour on that side).
    """
    height, width = grid_shape
    device = targets.device
    scale = torch.tensor((width, height), device=device, dtype=targets.dtype)
    centres = targets[:, 2:4] * scale
    sizes = targets[:, 4:6] * scale

    ratio = sizes[:, None, :] / anchors[None]  # (N, na, 2)
    fits = torch.max(ratio, 1.0 / ratio).amax(dim=2) < anchor_t
    target_index, anchor_index = fits.nonzero(as_tuple=True)
    centres, sizes = centres[target_index], sizes[target_index]

    # Distance to the far border, so "right"/"down" use the same test as "left"/"up".
    mirrored = scale - centres
    near_low = (centres % 1 < NEIGHBOUR_OFFSET) & (centres > 1)  # columns: left, up
    near_high = (mirrored % 1 < NEIGHBOUR_OFFSET) & (mirrored > 1)  # columns: right, down
    candidates = torch.cat((torch.ones_like(near_low[:, :1]), near_low, near_high), dim=1)  # (M, 5)
    pair, candidate = candidates.nonzero(as_tuple=True)
    offsets = torch.tensor(_CANDIDATE_OFFSETS, device=device, dtype=targets.dtype) * NEIGHBOUR_OFFSET

    centres, sizes = centres[pair], sizes[pair]
    cells = (centres - offsets[candidate]).long()
    grid_x = cells[:, 0].clamp(0, width - 1)
    grid_y = cells[:, 1].clamp(0, height - 1)
    matched = target_index[pair]
    return LevelTargets(
        image=targets[matched, 0].long(),
        anchor=anchor_index[pair],
        grid_y=grid_y,
        grid_x=grid_x,
        boxes=torch.cat((centres - cells, sizes), dim=1),
        anchors=anchors[anchor_index[pair]],
        classes=targets[matched, 1].long(),
        target=matched,
    )


def weighted_mean(losses: Tensor, weights: Tensor | None = None) -> Tensor:
    """``losses.mean()``, or with ``weights`` (broadcastable to ``losses``) the weighted mean
    ``sum(weights * losses) / sum(weights)`` over all elements (0 when every weight is 0).

    With weights all 1 this is bit for bit the plain mean: ``mean`` is the same sum divided by the element count.
    """
    if weights is None:
        return losses.mean()
    weights = weights.expand_as(losses)
    return (losses * weights).sum() / weights.sum().clamp(min=torch.finfo(losses.dtype).tiny)


def cell_index(assigned: LevelTargets, map_shape: torch.Size) -> Tensor:
    """int64 (n,) flat index of each assignment's (image, anchor, grid_y, grid_x) in a (B, na, H, W) map."""
    _, num_anchors, height, width = map_shape[:4]
    return ((assigned.image * num_anchors + assigned.anchor) * height + assigned.grid_y) * width + assigned.grid_x


def gather_objectness_and_rows(raw: Tensor, cells: Tensor) -> tuple[Tensor, Tensor]:
    """(objectness logits (B, na, H, W), rows (n, 5 + nc) at ``cells``) of a raw map, in float32.

    Both come from one indexing op: its backward pass writes a single gradient buffer the size of ``raw``.
    Slicing the objectness and indexing the rows separately would zero-fill two such buffers and add them, which
    doubles the loss's cost on CPU (the maps are large: 137 MB for batch 16 at 640 with 80 classes).
    """
    outputs = raw.shape[-1]
    num_cells = raw.numel() // outputs
    objectness_index = torch.arange(num_cells, device=raw.device) * outputs + 4
    row_index = (cells[:, None] * outputs + torch.arange(outputs, device=raw.device)).view(-1)
    values = raw.reshape(-1)[torch.cat((objectness_index, row_index))].float()
    return values[:num_cells].view(raw.shape[:4]), values[num_cells:].view(-1, outputs)


class DetectionLoss:
    """YOLOv5's training loss for a model with a Detect head.

    model: DetectionModel (or DDP-wrapped, or the Detect head itself); anchors are read from its head on every
        call, so anchors changed by AutoAnchor after construction are used.
    hyp: gains already scaled with :func:`scale_loss_gains`; uses box, obj, cls, cls_pw, obj_pw, anchor_t,
        fl_gamma (> 0 wraps both BCEs in :class:`FocalLoss`).
    label_smoothing: epsilon; class targets become 1 - eps/2 and eps/2.
    class_weights: optional float (nc,) per-class weights (e.g. inverse class frequency), applied to each class
        column of the class BCE; renormalised to mean 1 so the loss scale stays comparable.
    objectness_iou_ratio: YOLOv5's ``gr``: the objectness target is ``(1 - gr) + gr * IoU``.

    ``class_loss`` and ``object_loss`` are element-wise criteria (reduction "none"); the loss takes their (weighted)
    means itself, which with no weights is exactly what a "mean" criterion returns.
    """

    def __init__(
        self,
        model: nn.Module,
        hyp: Hyperparameters,
        label_smoothing: float = 0.0,
        class_weights: Tensor | None = None,
        *,
        objectness_iou_ratio: float = 1.0,
    ) -> None:
        self.head = detect_head(model)
        self.nl, self.na, self.nc = int(self.head.nl), int(self.head.na), int(self.head.nc)
        self.hyp = hyp
        self.objectness_iou_ratio = objectness_iou_ratio
        self.balance = level_balance(self.nl)
        self.positive_target, self.negative_target = smooth_bce_targets(label_smoothing)
        device = self.head.anchors.device

        weight = None
        if class_weights is not None:
            weight = torch.as_tensor(class_weights, dtype=torch.float32, device=device).flatten()
            if weight.numel() != self.nc or not torch.isfinite(weight).all() or (weight < 0).any():
                raise ValueError(f"class_weights: expected {self.nc} finite non-negative values, got {weight}")
            weight = weight * (self.nc / weight.sum().clamp(min=1e-12))
        self.class_loss: nn.Module = nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor([hyp.cls_pw], device=device), weight=weight, reduction="none"
        )
        self.object_loss: nn.Module = nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor([hyp.obj_pw], device=device), reduction="none"
        )
        if hyp.fl_gamma > 0:
            self.class_loss = FocalLoss(self.class_loss, hyp.fl_gamma)
            self.object_loss = FocalLoss(self.object_loss, hyp.fl_gamma)

    def __call__(self, raw_maps: list[Tensor], targets: Tensor, weights: Tensor | None = None) -> dict[str, Tensor]:
        """raw_maps: nl tensors (B, na, H_i, W_i, 5 + nc) of raw logits; targets: (N, 6) [image, class, xywhn];
        weights: optional float (N,) >= 0, each target's weight (see the module docstring; None = all 1).

        Returns the named terms ``{"box", "obj", "cls"}``, scalar tensors with gradients (gains applied). The
        trainer minimises their sum times the batch size (YOLOv5's scale, see the module docstring); logs and
        results.csv show the terms themselves, as ``box_loss``, ``obj_loss`` and ``cls_loss``.
        """
        self._check_inputs(raw_maps, targets, weights)
        device = raw_maps[0].device
        targets = targets.to(device=device, dtype=torch.float32)
        if weights is not None:
            weights = weights.to(device=device, dtype=torch.float32)
        anchors = self.head.anchors.to(device=device, dtype=torch.float32)
        box_loss = torch.zeros((), device=device)
        object_loss = torch.zeros((), device=device)
        class_loss = torch.zeros((), device=device)
        for level, raw in enumerate(raw_maps):
            assigned = assign_targets(targets, anchors[level], (raw.shape[2], raw.shape[3]), self.hyp.anchor_t)
            cells = cell_index(assigned, raw.shape)
            objectness, predictions = gather_objectness_and_rows(raw, cells)
            object_target = torch.zeros_like(objectness)
            object_weights = None
            if len(cells):
                assigned_weights = weights[assigned.target] if weights is not None else None
                level_box, level_class = self._positive_losses(
                    predictions, assigned, cells, object_target, assigned_weights
                )
                box_loss = box_loss + level_box
                class_loss = class_loss + level_class
                if assigned_weights is not None:  # a cell of several targets takes the highest weight
                    object_weights = torch.ones_like(objectness)
                    object_weights.view(-1).scatter_reduce_(
                        0, cells, assigned_weights, reduce="amax", include_self=False
                    )
            level_object = weighted_mean(self.object_loss(objectness, object_target), object_weights)
            object_loss = object_loss + level_object * self.balance[level]

        return {"box": box_loss * self.hyp.box, "obj": object_loss * self.hyp.obj, "cls": class_loss * self.hyp.cls}

    def _positive_losses(
        self,
        predictions: Tensor,
        assigned: LevelTargets,
        cells: Tensor,
        object_target: Tensor,
        weights: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Box and class loss of the (n, 5 + nc) assigned predictions (weighted means with ``weights`` (n,));
        writes their IoU into ``object_target``."""
        xy = predictions[:, 0:2].sigmoid() * 2 - 0.5
        wh = (predictions[:, 2:4].sigmoid() * 2) ** 2 * assigned.anchors
        ciou = bbox_ciou(torch.cat((xy, wh), dim=1), assigned.boxes)
        box_loss = weighted_mean(1.0 - ciou, weights)

        iou = ciou.detach().clamp(min=0)
        iou = (1.0 - self.objectness_iou_ratio) + self.objectness_iou_ratio * iou
        # Several targets can land on one (image, anchor, cell); take the highest IoU, independent of the
        # order of writes (a plain index_put keeps an arbitrary one on CUDA).
        object_target.view(-1).scatter_reduce_(0, cells, iou, reduce="amax")

        if self.nc == 1:
            return box_loss, torch.zeros((), device=predictions.device)
        class_logits = predictions[:, 5:]
        class_target = torch.full_like(class_logits, self.negative_target)
        rows = torch.arange(len(class_logits), device=predictions.device)
        class_target[rows, assigned.classes] = self.positive_target
        row_weights = weights[:, None] if weights is not None else None
        return box_loss, weighted_mean(self.class_loss(class_logits, class_target), row_weights)

    def _check_inputs(self, raw_maps: list[Tensor], targets: Tensor, weights: Tensor | None = None) -> None:
        if len(raw_maps) != self.nl:
            raise ValueError(f"DetectionLoss: expected {self.nl} raw output maps, got {len(raw_maps)}")
        expected = (self.na, 5 + self.nc)
        for level, raw in enumerate(raw_maps):
            if raw.ndim != 5 or (raw.shape[1], raw.shape[4]) != expected:
                raise ValueError(
                    f"DetectionLoss: raw map {level} has shape {tuple(raw.shape)}, "
                    f"expected (B, {self.na}, H, W, {5 + self.nc})"
                )
        if targets.ndim != 2 or targets.shape[1] != 6:
            raise ValueError(
                f"DetectionLoss: targets must be (N, 6) [image, class, x, y, w, h], got {tuple(targets.shape)}"
            )
        if weights is not None and tuple(weights.shape) != (len(targets),):
            raise ValueError(
                f"DetectionLoss: weights must be ({len(targets)},), one per target, got {tuple(weights.shape)}"
            )


def initialize_focal_biases(model: nn.Module, prior: float = FOCAL_CLASS_PRIOR) -> int:
    """Set the class-logit biases of the Detect head's output convolutions to ``log(prior / (1 - prior))``.

    With focal loss (``fl_gamma > 0``) RetinaNet starts every class at a small prior probability; YOLOv5's
    default class prior ``0.6 / (nc - 0.99)`` is large for few classes (0.59 for nc = 2) and makes the first
    focal-loss steps noisy. Objectness biases keep the head's YOLOv5 prior (about 8 objects per 640 image, already
    small). Call only when training from scratch; fine-tuning must keep the pretrained biases.
    Returns the number of convolutions changed.
    """
    head = detect_head(model)
    outputs = int(head.na) * (5 + int(head.nc))
    convs = [m for m in getattr(head, "m", ()) if isinstance(m, nn.Conv2d) and m.out_channels == outputs]
    if len(convs) != int(head.nl) or any(conv.bias is None for conv in convs):
        raise TypeError(f"expected {head.nl} output convolutions with {outputs} channels and biases in head.m")
    with torch.no_grad():
        for conv in convs:
            conv.bias.view(int(head.na), -1)[:, 5:] = math.log(prior / (1.0 - prior))
    return len(convs)
