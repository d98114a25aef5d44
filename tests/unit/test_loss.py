"""DetectionLoss, CIoU, target assignment and loss variants against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn

from detector.config import Hyperparameters
from detector.models.loss import (
    FOCAL_CLASS_PRIOR,
    DetectionLoss,
    FocalLoss,
    assign_targets,
    initialize_focal_biases,
    scale_loss_gains,
    smooth_bce_targets,
)
from detector.ops.boxes import bbox_ciou, xywh2xyxy

P5_ANCHORS_PX = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))


class StandInHead(nn.Module):
    """The attributes of the Detect head that the loss reads (see docs/architecture.md)."""

    def __init__(self, nc: int = 3, anchors_px=P5_ANCHORS_PX, strides=(8, 16, 32)) -> None:
        super().__init__()
        self.nl, self.na, self.nc, self.no = len(strides), len(anchors_px[0]) // 2, nc, 5 + nc
        stride = torch.tensor(strides, dtype=torch.float32)
        self.register_buffer("stride", stride)
        self.register_buffer(
            "anchors", torch.tensor(anchors_px, dtype=torch.float32).view(self.nl, -1, 2) / stride.view(-1, 1, 1)
        )
        self.m = nn.ModuleList(nn.Conv2d(4, self.na * self.no, 1) for _ in strides)


def raw_maps(head: StandInHead, batch: int, imgsz: int, fill: float = 0.0) -> list[torch.Tensor]:
    return [
        torch.full((batch, head.na, imgsz // int(s), imgsz // int(s), head.no), fill, requires_grad=True)
        for s in head.stride
    ]


def logit(p: float) -> float:
    return math.log(p / (1 - p))


# --------------------------------------------------------------------------------------------------------------
# CIoU


def test_ciou_identical_boxes_is_one():
    boxes = torch.tensor([[5.0, 5.0, 2.0, 4.0], [1.0, 2.0, 3.0, 0.5]])
    assert torch.allclose(bbox_ciou(boxes, boxes), torch.ones(2), atol=1e-6)


def test_ciou_disjoint_boxes_is_minus_distance_term():
    # (0,0)-(2,2) and (4,0)-(6,2): IoU 0, centre distance^2 = 16, enclosing box 6x2 -> diagonal^2 = 40, same aspect.
    box1, box2 = torch.tensor([[1.0, 1.0, 2.0, 2.0]]), torch.tensor([[5.0, 1.0, 2.0, 2.0]])
    assert bbox_ciou(box1, box2).item() == pytest.approx(-16 / 40, abs=1e-6)


def test_ciou_same_centre_other_aspect_is_iou_minus_v_term():
    # 2x2 and 4x1 around one centre: intersection 2x1 = 2, union 4 + 4 - 2 = 6.
    box1, box2 = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[0.0, 0.0, 4.0, 1.0]])
    iou = 2 / 6
    v = 4 / math.pi**2 * (math.atan(4 / 1) - math.atan(2 / 2)) ** 2
    alpha = v / (v - iou + 1)
    assert bbox_ciou(box1, box2).item() == pytest.approx(iou - alpha * v, abs=1e-6)


def test_ciou_agrees_with_torchvision():
    generator = torch.Generator().manual_seed(0)
    boxes1 = torch.rand(200, 4, generator=generator) * 10 + 0.1
    boxes2 = torch.rand(200, 4, generator=generator) * 10 + 0.1
    ours = bbox_ciou(boxes1, boxes2)
    theirs = 1 - torchvision.ops.complete_box_iou_loss(xywh2xyxy(boxes1), xywh2xyxy(boxes2), reduction="none")
    assert torch.allclose(ours, theirs, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Target assignment


def test_assignment_of_one_target_to_anchors_and_neighbour_cells():
    anchors = torch.tensor([[1.0, 1.0], [2.0, 2.0], [4.0, 8.0]])  # grid units
    # Centre at grid (x 3.3, y 4.7) on an 8x8 grid, 1.5 x 1.5 cells: anchors 0 (ratio 1.5) and 1 (1.33) fit,
    # anchor 2 does not (h ratio 8 / 1.5 = 5.3 > 4). Neighbours: left (x fraction 0.3 < 0.5) and down
    # (y fraction 0.7 > 0.5); not right nor up.
    targets = torch.tensor([[1.0, 2.0, 3.3 / 8, 4.7 / 8, 1.5 / 8, 1.5 / 8]])
    level = assign_targets(targets, anchors, (8, 8), anchor_t=4.0)
    got = sorted(
        zip(level.image.tolist(), level.anchor.tolist(), level.grid_y.tolist(), level.grid_x.tolist(), strict=True)
    )
    expected = sorted((1, a, gj, gi) for a in (0, 1) for gj, gi in ((4, 3), (4, 2), (5, 3)))
    assert got == expected
    assert level.classes.tolist() == [2] * 6
    for row in range(6):
        gj, gi = level.grid_y[row].item(), level.grid_x[row].item()
        expected_box = torch.tensor([3.3 - gi, 4.7 - gj, 1.5, 1.5])
        assert torch.allclose(level.boxes[row], expected_box, atol=1e-5)
        assert torch.equal(level.anchors[row], anchors[level.anchor[row]])


def test_assignment_rejects_anchor_outside_anchor_t_and_skips_border_neighbours():
    anchors = torch.tensor([[1.0, 1.0], [3.0, 3.0]])
    # 2.5 x 2.5 cells: ratio 2.5 to anchor 0; anchor_t 2.0 rejects it, 4.0 keeps it. Anchor 1 ratio 1.2.
    # Centre at (0.3, 0.3): in the first cell, so no left/up neighbour; fractions < 0.5, so no right/down.
    targets = torch.tensor([[0.0, 0.0, 0.3 / 8, 0.3 / 8, 2.5 / 8, 2.5 / 8]])
    strict = assign_targets(targets, anchors, (8, 8), anchor_t=2.0)
    assert strict.anchor.tolist() == [1]
    assert (strict.grid_x.tolist(), strict.grid_y.tolist()) == ([0], [0])
    loose = assign_targets(targets, anchors, (8, 8), anchor_t=4.0)
    assert sorted(loose.anchor.tolist()) == [0, 1]


def test_assignment_right_and_up_neighbours_on_non_square_grid():
    anchors = torch.tensor([[1.0, 1.0]])
    # Grid H=4, W=6; centre (x 2.8, y 2.2): right neighbour (3, 2) and up neighbour (2, 1).
    targets = torch.tensor([[0.0, 0.0, 2.8 / 6, 2.2 / 4, 1 / 6, 1 / 4]])
    level = assign_targets(targets, anchors, (4, 6))
    assert sorted(zip(level.grid_y.tolist(), level.grid_x.tolist(), strict=True)) == [(1, 2), (2, 2), (2, 3)]


def test_assignment_of_no_targets_is_empty():
    level = assign_targets(torch.zeros(0, 6), torch.ones(3, 2), (8, 8))
    assert all(t.shape[0] == 0 for t in level)


# --------------------------------------------------------------------------------------------------------------
# The loss


def exact_predictions(head: StandInHead, maps: list[torch.Tensor], targets: torch.Tensor, class_logit: float = 10.0):
    """Raw maps whose assigned cells decode exactly to the targets' boxes and classes."""
    with torch.no_grad():
        for level, raw in enumerate(maps):
            assigned = assign_targets(targets, head.anchors[level], raw.shape[2:4], 4.0)
            xy_probability = (assigned.boxes[:, :2] + 0.5) / 2
            wh_probability = (assigned.boxes[:, 2:] / assigned.anchors).sqrt() / 2
            values = torch.full((len(assigned.image), head.no), -class_logit)
            values[:, 0:2] = torch.logit(xy_probability)
            values[:, 2:4] = torch.logit(wh_probability)
            values[:, 4] = class_logit
            values[torch.arange(len(values)), 5 + assigned.classes] = class_logit
            raw[assigned.image, assigned.anchor, assigned.grid_y, assigned.grid_x] = values
    return maps


TARGETS = torch.tensor([[0.0, 1.0, 0.40, 0.55, 0.20, 0.30], [1.0, 2.0, 0.70, 0.30, 0.10, 0.08]])


def yolov5_loss(loss_fn, maps, targets):
    """(total, items) as YOLOv5's ComputeLoss returns them: the terms' sum times the batch size (what the trainer
    minimises), and the detached [box, obj, cls] terms."""
    terms = loss_fn(maps, targets)
    assert list(terms) == ["box", "obj", "cls"]  # the named terms, in YOLOv5's column order
    return sum(terms.values()) * maps[0].shape[0], torch.stack([terms[k] for k in ("box", "obj", "cls")]).detach()


def levels_with_targets(head: StandInHead, targets: torch.Tensor, imgsz: int) -> int:
    return sum(
        bool(len(assign_targets(targets, a, (imgsz // int(s),) * 2).image))
        for a, s in zip(head.anchors, head.stride, strict=True)
    )


def test_exact_predictions_have_no_box_loss_and_total_is_sum_times_batch():
    head = StandInHead(nc=3)
    loss_fn = DetectionLoss(head, Hyperparameters())
    maps = exact_predictions(head, raw_maps(head, 2, 64, fill=-10.0), TARGETS)
    loss, items = yolov5_loss(loss_fn, maps, TARGETS)
    assert items[0].item() == pytest.approx(0.0, abs=1e-5)
    assert items[2].item() < 1e-3
    assert loss.item() == pytest.approx(items.sum().item() * 2, rel=1e-6)


def test_loss_decreases_as_predictions_move_toward_targets():
    head = StandInHead(nc=3)
    loss_fn = DetectionLoss(head, Hyperparameters())
    start = raw_maps(head, 2, 64)
    exact = exact_predictions(head, raw_maps(head, 2, 64, fill=-10.0), TARGETS)
    losses = []
    for step in (0.0, 0.5, 1.0):
        maps = [(1 - step) * a.detach() + step * b.detach() for a, b in zip(start, exact, strict=True)]
        losses.append(yolov5_loss(loss_fn, maps, TARGETS)[1])
    for component in range(3):
        assert losses[0][component] > losses[1][component] > losses[2][component]


def test_gradient_steps_reduce_the_loss():
    head = StandInHead(nc=3)
    loss_fn = DetectionLoss(head, Hyperparameters())
    maps = raw_maps(head, 2, 64)
    optimizer = torch.optim.Adam(maps, lr=0.1)
    first = None
    for _ in range(20):
        optimizer.zero_grad()
        loss, _ = yolov5_loss(loss_fn, maps, TARGETS)
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first


def test_empty_targets_give_zero_box_and_class_loss_and_finite_objectness():
    head = StandInHead(nc=3)
    maps = raw_maps(head, 2, 64)
    loss, items = yolov5_loss(DetectionLoss(head, Hyperparameters()), maps, torch.zeros(0, 6))
    assert items[0].item() == 0.0 and items[2].item() == 0.0
    # All cells predict logit 0 against target 0: BCE log(2) per cell, times the level balance sum and gain.
    assert items[1].item() == pytest.approx(math.log(2) * (4.0 + 1.0 + 0.4), rel=1e-5)
    loss.backward()
    assert all(torch.isfinite(m.grad).all() for m in maps)


def test_single_class_model_has_no_class_loss():
    head = StandInHead(nc=1)
    _, items = yolov5_loss(
        DetectionLoss(head, Hyperparameters()),
        raw_maps(head, 2, 64),
        TARGETS[:, :].clone().index_fill_(1, torch.tensor([1]), 0.0),
    )
    assert items[2].item() == 0.0 and items[0].item() > 0


def test_duplicate_targets_on_one_cell_keep_the_highest_iou():
    head = StandInHead(nc=3)
    loss_fn = DetectionLoss(head, Hyperparameters())
    good = torch.tensor([[0.0, 1.0, 0.40, 0.55, 0.20, 0.30]])
    worse = torch.tensor([[0.0, 1.0, 0.40, 0.55, 0.26, 0.36]])  # same centre and cells, lower IoU
    maps = exact_predictions(head, raw_maps(head, 1, 64, fill=-10.0), good)
    only_good = yolov5_loss(loss_fn, maps, good)[1][1]
    for both in (torch.cat((good, worse)), torch.cat((worse, good))):
        assert yolov5_loss(loss_fn, maps, both)[1][1].item() == pytest.approx(only_good.item(), rel=1e-6)


def test_focal_loss_matches_torchvision_and_lowers_the_loss():
    logits, targets = torch.randn(50, 4), (torch.rand(50, 4) > 0.7).float()
    ours = FocalLoss(nn.BCEWithLogitsLoss(reduction="sum"), gamma=2.0, alpha=0.25)(logits, targets)
    theirs = torchvision.ops.sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0, reduction="sum")
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)

    head = StandInHead(nc=3)
    maps = raw_maps(head, 2, 64)
    _, plain = yolov5_loss(DetectionLoss(head, Hyperparameters()), maps, TARGETS)
    _, focal = yolov5_loss(DetectionLoss(head, Hyperparameters(fl_gamma=1.5)), maps, TARGETS)
    assert focal[0] == plain[0]  # the box loss is not a BCE
    assert focal[1] < plain[1] and focal[2] < plain[2]


def test_label_smoothing_raises_the_loss_of_confident_correct_classes():
    assert smooth_bce_targets(0.1) == (0.95, 0.05)
    head = StandInHead(nc=3)
    maps = exact_predictions(head, raw_maps(head, 2, 64, fill=-10.0), TARGETS)
    _, plain = yolov5_loss(DetectionLoss(head, Hyperparameters()), maps, TARGETS)
    _, smoothed = yolov5_loss(DetectionLoss(head, Hyperparameters(), label_smoothing=0.1), maps, TARGETS)
    # Each class logit is +-10: BCE against 0.95/0.05 is 0.05 * 10 + softplus(-10) per element, summed over levels.
    per_element = 0.05 * 10 + math.log1p(math.exp(-10))
    assert smoothed[2].item() == pytest.approx(0.5 * per_element * levels_with_targets(head, TARGETS, 64), rel=1e-4)
    assert smoothed[2] > plain[2]


def test_class_weights_scale_each_class_column():
    head = StandInHead(nc=3)
    targets = torch.tensor([[0.0, 2.0, 0.5, 0.5, 0.25, 0.25]])
    maps = raw_maps(head, 1, 64, fill=-3.0)  # every class logit -3: wrong for class 2, right for 0 and 1
    hyp = Hyperparameters()
    _, plain = yolov5_loss(DetectionLoss(head, hyp), maps, targets)
    _, weighted = yolov5_loss(DetectionLoss(head, hyp, class_weights=torch.tensor([1.0, 1.0, 10.0])), maps, targets)
    positive, negative = math.log1p(math.exp(3)), math.log1p(math.exp(-3))  # BCE of logit -3 vs 1 and vs 0
    num_levels_with_targets = levels_with_targets(head, targets, 64)
    assert num_levels_with_targets == 2  # a 16 px box fits anchors of P3 and P4, not P5 (116 / 16 > 4)
    assert plain[2].item() == pytest.approx(hyp.cls * num_levels_with_targets * (positive + 2 * negative) / 3, rel=1e-4)
    # Weights renormalised to mean 1: [0.25, 0.25, 2.5].
    expected = hyp.cls * num_levels_with_targets * (2.5 * positive + 0.5 * negative) / 3
    assert weighted[2].item() == pytest.approx(expected, rel=1e-4)
    assert weighted[2] > plain[2]
    with pytest.raises(ValueError, match="class_weights"):
        DetectionLoss(head, hyp, class_weights=torch.ones(4))


def test_positive_weights_raise_positive_terms():
    head = StandInHead(nc=3)
    maps = raw_maps(head, 2, 64)
    _, plain = yolov5_loss(DetectionLoss(head, Hyperparameters()), maps, TARGETS)
    _, weighted = yolov5_loss(DetectionLoss(head, Hyperparameters(cls_pw=2.0, obj_pw=2.0)), maps, TARGETS)
    assert weighted[1] > plain[1] and weighted[2] > plain[2]


def test_scale_loss_gains_follow_yolov5_train_scaling():
    hyp = Hyperparameters(box=0.05, obj=1.0, cls=0.5)
    scaled = scale_loss_gains(hyp, nl=4, nc=20, imgsz=320)
    assert scaled.box == pytest.approx(0.05 * 3 / 4)
    assert scaled.obj == pytest.approx(1.0 * 0.25 * 3 / 4)
    assert scaled.cls == pytest.approx(0.5 * 20 / 80 * 3 / 4)
    assert scaled.lr0 == hyp.lr0


def test_bad_inputs_raise_one_line_errors():
    head = StandInHead(nc=3)
    loss_fn = DetectionLoss(head, Hyperparameters())
    with pytest.raises(ValueError, match="expected 3 raw output maps"):
        loss_fn(raw_maps(head, 1, 64)[:2], TARGETS)
    with pytest.raises(ValueError, match=r"targets must be \(N, 6\)"):
        loss_fn(raw_maps(head, 1, 64), TARGETS[:, :5])


def test_initialize_focal_biases_sets_class_prior_only():
    head = StandInHead(nc=3)
    nn.init.zeros_(head.m[0].bias)
    assert initialize_focal_biases(head, prior=0.01) == 3
    bias = head.m[0].bias.view(head.na, head.no)
    assert torch.allclose(bias[:, 5:], torch.full((3, 3), logit(0.01)))
    assert torch.equal(bias[:, :5], torch.zeros(3, 5))


def test_real_model_trains_one_step_and_takes_focal_priors():
    from detector.models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov5n.yaml", nc=3).train()
    images = torch.rand(2, 3, 64, 64)
    hyp = scale_loss_gains(Hyperparameters(), model.detect.nl, 3, 64)
    loss_fn = DetectionLoss(model, hyp)
    loss, items = yolov5_loss(loss_fn, model(images), TARGETS)
    assert loss.ndim == 0 and torch.isfinite(loss) and (items > 0).all()
    loss.backward()
    head_grad = model.detect.m[0].weight.grad
    assert head_grad is not None and torch.isfinite(head_grad).all() and head_grad.abs().sum() > 0

    assert initialize_focal_biases(model) == 3
    class_bias = model.detect.m[2].bias.view(model.detect.na, -1)[:, 5:]
    assert torch.allclose(class_bias, torch.full_like(class_bias, logit(FOCAL_CLASS_PRIOR)))
