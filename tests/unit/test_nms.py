"""non_max_suppression: hand-built cases, a brute-force oracle, and torchvision's batched_nms."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision

from detector.ops import nms
from detector.ops.nms import non_max_suppression


def _pred(rows: list[list[float]], nc: int) -> torch.Tensor:
    """(1, N, 5 + nc) from rows [xc, yc, w, h, obj, cls scores...]."""
    tensor = torch.tensor(rows, dtype=torch.float32)
    assert tensor.shape[1] == 5 + nc
    return tensor[None]


def _brute_force(pred: torch.Tensor, conf_thres: float, iou_thres: float, multi_label: bool, agnostic: bool):
    """Plain-Python NMS: candidates from the definition, then greedy suppression, one image at a time."""
    results = []
    for image in pred.tolist():
        candidates = []
        for xc, yc, w, h, obj, *scores in image:
            if obj <= conf_thres:
                continue
            box = (xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2)
            confs = [(obj * s, c) for c, s in enumerate(scores)]
            chosen = [x for x in confs if x[0] > conf_thres] if multi_label else [max(confs)]
            candidates += [(conf, c, box) for conf, c in chosen if conf > conf_thres]
        candidates.sort(key=lambda x: -x[0])
        kept = []
        for conf, cls, box in candidates:
            rivals = [k for k in kept if agnostic or k[1] == cls]
            if all(_iou(box, k[2]) <= iou_thres for k in rivals):
                kept.append((conf, cls, box))
        results.append(kept)
    return results


def _iou(a, b) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _random_pred(seed: int, batch: int = 3, anchors: int = 150, nc: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    pred = torch.rand(batch, anchors, 5 + nc, generator=generator, dtype=torch.float64)
    # Clustered boxes so that plenty of pairs overlap around the IoU threshold.
    centres = torch.rand(batch, 8, 2, generator=generator, dtype=torch.float64) * 200
    pick = torch.randint(0, 8, (batch, anchors), generator=generator)
    pred[..., :2] = torch.gather(centres, 1, pick[..., None].expand(-1, -1, 2)) + pred[..., :2] * 20
    pred[..., 2:4] = 10 + pred[..., 2:4] * 40
    return pred


def test_conf_is_objectness_times_class_score_and_boxes_become_xyxy() -> None:
    pred = _pred([[50, 40, 20, 10, 0.5, 0.2, 0.8]], nc=2)
    (out,) = non_max_suppression(pred, conf_thres=0.1, iou_thres=0.5)
    assert out.shape == (1, 6)
    torch.testing.assert_close(out[0], torch.tensor([40.0, 35.0, 60.0, 45.0, 0.4, 1.0]))


def test_overlapping_boxes_same_class_suppressed_other_class_kept_unless_agnostic() -> None:
    rows = [
        [50, 50, 20, 20, 0.9, 1.0, 0.0],  # class 0, conf 0.9
        [51, 50, 20, 20, 0.8, 1.0, 0.0],  # class 0, IoU 0.905 with the first -> suppressed
        [50, 51, 20, 20, 0.7, 0.0, 1.0],  # class 1, same place -> kept per class
    ]
    (out,) = non_max_suppression(_pred(rows, 2), conf_thres=0.25, iou_thres=0.45)
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.7])
    assert out[:, 5].tolist() == [0.0, 1.0]
    (agnostic,) = non_max_suppression(_pred(rows, 2), conf_thres=0.25, iou_thres=0.45, agnostic=True)
    assert agnostic[:, 4].tolist() == pytest.approx([0.9])


def test_iou_exactly_at_threshold_is_kept() -> None:
    # Boxes [0,0,10,10] and [5,0,15,10]: IoU = 50 / 150 = 1/3; NMS suppresses only IoU > threshold.
    rows = [[5, 5, 10, 10, 0.9, 1.0], [10, 5, 10, 10, 0.8, 1.0]]
    (out,) = non_max_suppression(_pred(rows, 1), conf_thres=0.1, iou_thres=0.34)
    assert len(out) == 2
    (out,) = non_max_suppression(_pred(rows, 1), conf_thres=0.1, iou_thres=0.33)
    assert len(out) == 1


def test_multi_label_keeps_a_row_per_class_above_threshold() -> None:
    rows = [[50, 50, 20, 20, 0.9, 0.6, 0.5, 0.1]]  # confs 0.54, 0.45, 0.09
    (single,) = non_max_suppression(_pred(rows, 3), conf_thres=0.3, iou_thres=0.5)
    (multi,) = non_max_suppression(_pred(rows, 3), conf_thres=0.3, iou_thres=0.5, multi_label=True)
    assert single[:, 5].tolist() == [0.0]
    assert multi[:, 5].tolist() == [0.0, 1.0]
    assert multi[:, 4].tolist() == pytest.approx([0.54, 0.45])


def test_objectness_below_threshold_drops_the_anchor() -> None:
    rows = [[50, 50, 20, 20, 0.2, 1.0], [150, 50, 20, 20, 0.31, 1.0]]
    (out,) = non_max_suppression(_pred(rows, 1), conf_thres=0.3, iou_thres=0.5)
    assert out[:, 4].tolist() == pytest.approx([0.31])


def test_class_filter_max_det_and_max_nms() -> None:
    rows = [[20 + 40 * i, 50, 20, 20, 0.9 - 0.1 * i, float(i % 2), float((i + 1) % 2)] for i in range(6)]
    pred = _pred(rows, 2)
    (only_one,) = non_max_suppression(pred, conf_thres=0.1, iou_thres=0.5, classes=[1])
    assert only_one[:, 5].tolist() == [1.0, 1.0, 1.0]
    (top2,) = non_max_suppression(pred, conf_thres=0.1, iou_thres=0.5, max_det=2)
    assert top2[:, 4].tolist() == pytest.approx([0.9, 0.8])
    # max_nms caps the candidates before NMS: the best one suppresses its overlapping rival, and the third,
    # which would have survived, never enters.
    overlapping = _pred([[50, 50, 20, 20, 0.9, 1.0], [52, 50, 20, 20, 0.8, 1.0], [150, 50, 20, 20, 0.7, 1.0]], 1)
    (capped,) = non_max_suppression(overlapping, conf_thres=0.1, iou_thres=0.5, max_nms=2)
    assert capped[:, 4].tolist() == pytest.approx([0.9])
    # The cap is per image: a second image keeps its own top candidates.
    apart = _pred([[50, 50, 20, 20, 0.9, 1.0], [150, 50, 20, 20, 0.8, 1.0], [52, 50, 20, 20, 0.7, 1.0]], 1)
    first, second = non_max_suppression(torch.cat([overlapping, apart]), conf_thres=0.1, iou_thres=0.5, max_nms=2)
    assert first[:, 4].tolist() == pytest.approx([0.9]) and second[:, 4].tolist() == pytest.approx([0.9, 0.8])


def test_empty_and_all_below_threshold() -> None:
    out = non_max_suppression(torch.zeros(2, 0, 7), conf_thres=0.1, iou_thres=0.5)
    assert [o.shape for o in out] == [(0, 6), (0, 6)]
    out = non_max_suppression(torch.full((2, 5, 7), 0.01), conf_thres=0.1, iou_thres=0.5)
    assert [o.shape for o in out] == [(0, 6), (0, 6)]


@pytest.mark.parametrize("conf_thres, iou_thres", [(-0.1, 0.5), (1.1, 0.5), (0.25, -0.01), (0.25, 1.5)])
def test_thresholds_outside_unit_interval_raise(conf_thres: float, iou_thres: float) -> None:
    with pytest.raises(ValueError, match="must be between 0 and 1"):
        non_max_suppression(torch.rand(1, 4, 7), conf_thres=conf_thres, iou_thres=iou_thres)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("multi_label, agnostic", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("call_rows", [5, 256])  # 5: many NMS calls, groups packed across classes and images
def test_matches_brute_force_oracle(
    seed: int, multi_label: bool, agnostic: bool, call_rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(nms, "NMS_CALL_ROWS", call_rows)
    pred = _random_pred(seed)
    out = non_max_suppression(pred, 0.2, 0.5, multi_label=multi_label, agnostic=agnostic, max_det=10_000)
    expected = _brute_force(pred, 0.2, 0.5, multi_label, agnostic)
    for ours, theirs in zip(out, expected, strict=True):
        assert len(ours) == len(theirs) > 0
        theirs_rows = torch.tensor([[*box, conf, cls] for conf, cls, box in theirs], dtype=ours.dtype)
        torch.testing.assert_close(ours, theirs_rows)


@pytest.mark.parametrize("max_det", [1, 3, 7, 40])
@pytest.mark.parametrize("multi_label, agnostic", [(True, False), (False, True)])
def test_max_det_equals_the_oracles_first_detections_whatever_rows_it_needs(
    max_det: int, multi_label: bool, agnostic: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NMS runs on each image's 4 x max_det most confident rows first, then on more rows (with those kept) for an
    image that has not kept max_det yet: the result must be the full NMS's first max_det rows."""
    passes = []
    grouped_nms = nms._grouped_nms
    monkeypatch.setattr(nms, "_grouped_nms", lambda *args: passes.append(len(args[0])) or grouped_nms(*args))
    pred = _random_pred(11, batch=4, anchors=300, nc=3)
    # 10 tight clusters an image: most rows suppress each other, so 4 x max_det rows may keep fewer than max_det
    generator = torch.Generator().manual_seed(12)
    centres = torch.rand(4, 10, 2, generator=generator, dtype=torch.float64) * 400
    cluster = torch.randint(0, 10, (4, 300), generator=generator)
    jitter = torch.rand(4, 300, 4, generator=generator, dtype=torch.float64) * 4
    pred[..., :2] = torch.gather(centres, 1, cluster[..., None].expand(-1, -1, 2)) + jitter[..., :2]
    pred[..., 2:4] = 30 + jitter[..., 2:]
    out = non_max_suppression(pred, 0.05, 0.4, multi_label=multi_label, agnostic=agnostic, max_det=max_det)
    expected = _brute_force(pred, 0.05, 0.4, multi_label, agnostic)
    for ours, theirs in zip(out, expected, strict=True):
        theirs_rows = torch.tensor([[*box, conf, cls] for conf, cls, box in theirs[:max_det]], dtype=ours.dtype)
        torch.testing.assert_close(ours, theirs_rows)
    if max_det == 40:  # at most 30 detections an image (10 clusters x 3 classes): more than 160 rows needed
        assert len(passes) > 1


def test_matches_torchvision_batched_nms_per_image() -> None:
    pred = _random_pred(7, batch=2, anchors=500, nc=6)
    out = non_max_suppression(pred, 0.1, 0.6, multi_label=True, max_det=100_000)
    for image, ours in zip(pred, out, strict=True):
        scores = image[:, 5:] * image[:, 4:5]
        keep_anchor = image[:, 4] > 0.1
        anchor, cls = ((scores > 0.1) & keep_anchor[:, None]).nonzero(as_tuple=True)
        boxes = torchvision.ops.box_convert(image[anchor, :4], "cxcywh", "xyxy")
        keep = torchvision.ops.batched_nms(boxes, scores[anchor, cls], cls, 0.6)
        assert len(keep) == len(ours)
        torch.testing.assert_close(ours[:, :4], boxes[keep])
        torch.testing.assert_close(ours[:, 5], cls[keep].to(ours.dtype))


def test_the_nms_kernel_and_box_iou_equal_torchvisions_and_importing_them_does_not_import_torchvision(
    tmp_path: Path,
) -> None:
    """In a fresh interpreter the modules val.py and detect.py run import no torchvision, and the NMS kernel loaded
    without it keeps what ``torchvision.ops.nms`` keeps (here torchvision is imported, so it is the reference)."""
    import json
    import subprocess
    import sys

    from detector.ops.boxes import box_iou

    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(300, 2, generator=generator) * 500
    boxes = torch.cat((corners, corners + torch.rand(300, 2, generator=generator) * 120 + 1), 1)
    scores = torch.rand(300, generator=generator)
    classes = torch.randint(0, 3, (300,), generator=generator)
    torch.save({"boxes": boxes, "scores": scores, "classes": classes}, tmp_path / "boxes.pt")
    code = (
        "import json, sys, torch\n"
        "import detector.cli.val, detector.cli.detect, detector.engine.validator, detector.engine.predictor\n"
        "from detector.ops.torchvision_kernels import batched_nms, nms\n"
        f"saved = torch.load({str(tmp_path / 'boxes.pt')!r}, weights_only=True)\n"
        "boxes, scores = saved['boxes'], saved['scores']\n"
        "kept = [nms(boxes.to(d), scores.to(d), 0.45).tolist() for d in (torch.float32, torch.float64)]\n"
        "by_class = batched_nms(boxes, scores, saved['classes'], 0.45).tolist()\n"
        "imported = ['torchvision' in sys.modules, 'torch._dynamo' in sys.modules]\n"
        "import torchvision  # after the kernel's library was loaded: torchvision loads it again, and works\n"
        "same = torchvision.ops.nms(boxes, scores, 0.45).tolist() == kept[0]\n"
        "print(json.dumps([kept, by_class, *imported, same]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    kept, by_class, imported_torchvision, imported_dynamo, same_later = json.loads(
        result.stdout.strip().splitlines()[-1]
    )
    assert not imported_torchvision and not imported_dynamo and same_later
    for dtype, indices in zip((torch.float32, torch.float64), kept, strict=True):
        assert indices == torchvision.ops.nms(boxes.to(dtype), scores.to(dtype), 0.45).tolist()
    assert 20 < len(kept[0]) < 300  # some boxes suppressed, some kept
    assert by_class == torchvision.ops.batched_nms(boxes, scores, classes, 0.45).tolist()
    assert len(by_class) > len(kept[0])  # boxes of other classes no longer suppress each other
    torch.testing.assert_close(box_iou(boxes[:50], boxes[50:]), torchvision.ops.box_iou(boxes[:50], boxes[50:]))
    assert box_iou(boxes[:0], boxes).shape == (0, 300)
