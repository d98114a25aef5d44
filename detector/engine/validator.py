"""Validation: one implementation for val.py and for the trainer's per-epoch evaluation.

:class:`Validator` runs any model over a validation DataLoader and returns :class:`~detector.ops.metrics.Metrics`.
The model is either

- an in-memory :class:`~detector.models.yolo.DetectionModel` (the trainer's EMA); with ``loss_fn`` the loss on
  the validation set comes from the same forward pass as the predictions (``forward_raw`` + ``detect.decode``), or
- any backend from :func:`detector.engine.backends.load_backend` (.pt, TorchScript, ONNX, OpenVINO, TensorRT):
  a callable ``(images float (B, 3, H, W) 0-1) -> (B, N, 5 + nc)`` with ``names`` and ``stride``. A new weight
  format therefore needs no change here.

Predictions and labels are both mapped back to original-image pixels (the letterbox undone, boxes clipped)
before matching, which is the frame pycocotools sees in the ``--save-json`` results.

With ``config.tile`` (val.py ``--tile``) the loader's letterboxed batches are not used: each image is read whole
at its original resolution and predicted tile by tile by detect.py's :class:`~detector.engine.predictor.Predictor`
(:mod:`detector.engine.tiling`), one image at a time, and matched the same way.

:func:`run_validation` is what ``val.py`` calls: run folder, dataset, backend, dataloader, Validator, COCO JSON
and pycocotools, and the ``speed`` and ``study`` tasks.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from detector.config import ValConfig, build_config
from detector.engine.coco_eval import (
    crowd_regions,
    evaluate_coco,
    find_coco_annotations,
    image_id_from_path,
    labels_to_coco,
    predictions_to_coco,
    write_json,
)
from detector.engine.tiling import TileOptions
from detector.errors import CheckpointError, ConfigError
from detector.models.loss import LossFunction
from detector.models.release import resolve_release_weights
from detector.ops.boxes import clip_boxes, xywhn2xyxy, xyxy2xywhn
from detector.ops.metrics import DetectionStats, Metrics, Speed, box_iou_numpy, confusion_matrix
from detector.ops.nms import non_max_suppression
from detector.utils.checks import check_threshold
from detector.utils.memory import keep_freed_memory
from detector.utils.torch_utils import half_precision_dtype, time_sync, usable_cpus

LOGGER = logging.getLogger(__name__)

# Images per rectangular letterbox shape in validation (YOLOv5 uses the batch; see create_val_dataloader).
RECT_SHAPE_GROUP = 16

CONFUSION_CONF = 0.25  # confusion-matrix thresholds, as YOLOv5 (a deployment-like operating point)
CONFUSION_IOU = 0.45
SPEED_TASK_CONF = 0.25  # --task speed measures at detect.py's thresholds, where NMS has far fewer boxes
SPEED_TASK_IOU = 0.45
HYBRID_IOU = 0.45  # --save-hybrid drops predictions overlapping a label of their class by more than this
PLOTTED_MOSAICS = 3  # val_batch0..2_labels.jpg / _pred.jpg ...
MOSAIC_IMAGES = 16  # ... of 16 images each, whatever the batch size
STUDY_MIN_SIZE = 256  # --task study sweeps 256, 384, ... up to --imgsz
STUDY_STEP = 128
TABLE_HEADER = ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")

Batch = tuple[Tensor, Tensor, Sequence[str], Sequence[Any]]


class Validator:
    """Runs a model over a validation loader and computes COCO-rule metrics (see the module docstring).

    Args:
        config: thresholds, ``max_det``, ``single_cls``, ``augment``, ``half``, ``verbose``, ``save_txt``/
            ``save_hybrid``/``save_conf``/``save_json`` (the last four need ``save_dir``).
        names: class names, index = class id.
        save_dir: run folder for plots, label files and the collected COCO results; None writes nothing.
        plots: write the confusion matrix, PR/F1/P/R curves and val_batch mosaics into ``save_dir``.
        category_ids: COCO category id per class; None = COCO80_TO_COCO91 when ``names`` are COCO's 80, else
            the class index.
        crowd_annotations: a COCO instances JSON whose ``iscrowd`` regions make detections on them count neither
            way, as in pycocotools; "auto" finds ``annotations/instances_<split>.json`` beside the images' ``images``
            folder (COCO's and coco128's layout); None ignores crowds.
        training: called by the trainer; logs which settings differ from val.py's defaults, and prints the
            per-class table only with ``config.verbose``.
    """

    def __init__(
        self,
        config: ValConfig,
        names: Sequence[str],
        save_dir: str | Path | None = None,
        *,
        plots: bool = False,
        category_ids: Sequence[int] | None = None,
        crowd_annotations: str | Path | None = "auto",
        training: bool = False,
        progress: bool = True,
    ) -> None:
        from detector.data.dataset_config import COCO80_TO_COCO91, COCO_NAMES

        _check_options(config)
        self.config = config
        self.names = tuple(names)
        self.save_dir = Path(save_dir) if save_dir is not None else None
        self.plots = plots and self.save_dir is not None
        if category_ids is None and self.names == tuple(COCO_NAMES):
            category_ids = COCO80_TO_COCO91
        self.category_ids = category_ids
        self.crowd_annotations = None if config.single_cls else crowd_annotations
        self._crowds: dict[str, tuple[np.ndarray, np.ndarray]] | None = None  # read on the first run
        self.training = training
        self.progress = progress
        self.coco_results: list[dict[str, Any]] = []  # filled when config.save_json
        self._original_labels: dict[str, np.ndarray] = {}
        self._plot_items: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = []
        self.confusion = np.zeros((len(self.names) + 1, len(self.names) + 1), dtype=np.int64)
        if training and (differences := differences_from_val_defaults(config)):
            LOGGER.info("Validation settings that differ from val.py's defaults: %s", "; ".join(differences))

    # -- the loop -------------------------------------------------------------------------------------------------

    def run(self, model: Any, dataloader: Any, loss_fn: LossFunction | None = None) -> Metrics:
        """Validate ``model`` on ``dataloader`` (batches of ``(uint8 images, targets, paths, shapes)``).

        ``loss_fn(raw_maps, targets) -> {name: scalar term}`` (the trainer's loss) adds the mean of each term over
        the batches to ``Metrics.loss``, keyed by the term names; it needs a DetectionModel (``forward_raw``). The
        model's train/eval mode is restored.
        """
        if loss_fn is not None and not hasattr(model, "forward_raw"):
            raise ValueError("loss_fn needs an in-memory DetectionModel (with forward_raw), not an exported backend")
        if loss_fn is not None and self.config.tile:
            raise ValueError("tiled validation (config.tile) computes no loss; validate with tile 0 for loss_fn")
        device = _device_of(model)
        was_training = model.training if isinstance(model, nn.Module) else None
        if isinstance(model, nn.Module):
            model.eval()
        stats = DetectionStats()
        self._original_labels = _labels_by_path(dataloader)
        if self._crowds is None:
            self._crowds = self._read_crowds(dataloader)
        self.coco_results = []
        self.confusion[:] = 0
        loss_sums: dict[str, Tensor] = {}
        seconds = np.zeros(4)  # pre-process, inference, NMS, metrics
        num_images = largest_batch = 0
        batches = tqdm(dataloader, desc=_format_row(TABLE_HEADER), disable=not self.progress, leave=False)
        try:
            if self.config.tile:
                num_images, largest_batch = self._run_tiled(model, dataloader, stats, seconds), 1
            else:
                for images, targets, paths, shapes in batches:
                    start = time_sync(device)
                    inputs = images.to(device, non_blocking=True).float().div_(255)
                    targets = targets.to(device)
                    preprocessed = time_sync(device)
                    predictions, loss_terms = self._forward(model, inputs, targets, loss_fn)
                    for name, term in loss_terms.items():
                        loss_sums[name] = loss_sums.get(name, 0.0) + term.detach().float()
                    inferred = time_sync(device)
                    detections = self._detections(model, predictions)
                    suppressed = time_sync(device)
                    self._update(stats, detections, targets, tuple(inputs.shape[2:]), paths, shapes)
                    matched = time.perf_counter()
                    seconds += np.array([preprocessed - start, inferred - preprocessed, suppressed - inferred, 0.0])
                    seconds[3] += matched - suppressed
                    num_images += images.shape[0]
                    largest_batch = max(largest_batch, images.shape[0])
                    if self.plots:
                        self._collect_for_plots(images, targets, detections, paths)
        finally:
            if was_training is not None:
                model.train(was_training)
        metrics_start = time.perf_counter()
        metrics = stats.compute(self.names)
        seconds[3] += time.perf_counter() - metrics_start
        speed = Speed(*(1000 * seconds / max(num_images, 1)))
        losses = {name: float(total) / max(len(dataloader), 1) for name, total in loss_sums.items()}
        metrics = metrics.replace(speed=speed, loss=losses)
        self._report(metrics, largest_batch)
        if self.plots:
            self._plot_results(metrics)
        return metrics

    def _forward(
        self, model: Any, inputs: Tensor, targets: Tensor, loss_fn: LossFunction | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Decoded predictions (B, N, 5 + nc) (or end2end detections) and the loss terms when asked (else {})."""
        if not isinstance(model, nn.Module):
            return _call_backend(model, inputs, self.config.augment), {}
        dtype = half_precision_dtype(inputs.device) if self.config.half else None
        with torch.inference_mode(), torch.autocast(inputs.device.type, dtype=dtype, enabled=dtype is not None):
            if loss_fn is not None:
                raw = model.forward_raw(inputs)
                loss_terms = loss_fn([r.float() for r in raw], targets)
                return model.detect.decode(raw).float(), loss_terms
            return model(inputs, augment=self.config.augment).float(), {}

    def _detections(self, model: Any, predictions: Tensor) -> list[Tensor]:
        config = self.config
        if getattr(model, "end2end", False):  # NMS already inside the exported graph
            from detector.engine.backends import detections_from_output

            detections = detections_from_output(predictions, True, config.conf_thres, max_det=config.max_det)
        else:
            # multi_label as YOLOv5's val: a box counts for every class above the threshold (higher mAP).
            detections = non_max_suppression(
                predictions,
                config.conf_thres,
                config.iou_thres,
                agnostic=config.single_cls,
                multi_label=True,
                max_det=config.max_det,
            )
        if config.single_cls:
            for image_detections in detections:
                image_detections[:, 5] = 0
        return detections

    def _run_tiled(self, model: Any, dataloader: Any, stats: DetectionStats, seconds: np.ndarray) -> int:
        """``config.tile``: every image of the loader's dataset read whole and predicted tile by tile, then matched
        as a batch of one image with no letterbox to undo. Adds to ``stats``/``seconds``; returns the image count.

        ``model`` must be a backend (:func:`~detector.engine.backends.load_backend`), and the loader's dataset a
        YOLODataset (``im_files``, ``labels``). Detections come from detect.py's Predictor with this config's
        thresholds, multi-label as the batched path, merged across classes with ``single_cls``.
        """
        from detector.data.media import read_image
        from detector.engine.backends import Backend
        from detector.engine.predictor import Predictor

        if not isinstance(model, Backend):
            raise ValueError("tiled validation (config.tile) needs a backend from load_backend, not a torch module")
        dataset = dataloader.dataset
        config = self.config
        if config.tile_merge == "nmm" and config.conf_thres < CONFUSION_CONF:
            LOGGER.warning(
                "WARNING: --tile-merge nmm at --conf-thres %g: confident boxes grow into the unlikely larger boxes "
                "around them; --tile-merge nms suits validation's low threshold",
                config.conf_thres,
            )
        predictor = Predictor(
            model,
            imgsz=config.imgsz,
            conf_thres=config.conf_thres,
            iou_thres=config.iou_thres,
            max_det=config.max_det,
            agnostic_nms=config.single_cls,
            augment=config.augment,
            multi_label=True,
            tiling=TileOptions.from_config(config),
        )
        images = tqdm(dataset.im_files, desc=_format_row(TABLE_HEADER), disable=not self.progress, leave=False)
        for path, labels in zip(images, dataset.labels, strict=True):
            start = time.perf_counter()
            image = read_image(path)
            seconds[0] += time.perf_counter() - start
            result = predictor.predict_images([image], [path])[0]
            seconds[:3] += [result.speed[stage] / 1e3 for stage in ("preprocess", "inference", "nms")]
            start = time.perf_counter()
            columns = (result.boxes, result.confidences[:, None], result.class_ids[:, None] * (not config.single_cls))
            detections = torch.from_numpy(np.concatenate(columns, 1).astype(np.float32))
            targets = torch.from_numpy(np.concatenate([np.zeros((len(labels), 1)), labels], 1).astype(np.float32))
            original_hw = (image.shape[0], image.shape[1])
            no_letterbox = (original_hw, ((1.0, 1.0), (0.0, 0.0)))
            self._update(stats, [detections], targets, original_hw, [path], [no_letterbox])
            if self.plots:
                self._collect_whole_image_for_plots(image, targets, detections, path)
            seconds[3] += time.perf_counter() - start
        return len(dataset.im_files)

    # -- per batch ------------------------------------------------------------------------------------------------

    def _update(
        self,
        stats: DetectionStats,
        detections: list[Tensor],
        targets: Tensor,
        input_hw: tuple[int, int],
        paths: Sequence[str],
        shapes: Sequence[Any],
    ) -> None:
        """Match each image's detections to its labels in original-image pixels; write txt/JSON if asked."""
        height, width = input_hw
        targets = targets.cpu().double().numpy()
        for i, image_detections in enumerate(detections):
            original_hw, ratio_pad = _original_shape(shapes[i], input_hw)
            original_labels = self._original_labels.get(paths[i])
            if original_labels is not None:
                # The label file's own boxes: undoing the letterbox on them would be off by up to a pixel where
                # rounding made the x and y scales differ, enough to flip a match at IoU 0.5.
                label_classes = original_labels[:, 0].astype(np.float64)
                label_boxes = xywhn2xyxy(original_labels[:, 1:5].astype(np.float64), original_hw[1], original_hw[0])
            else:
                labels = targets[targets[:, 0] == i]
                label_classes = labels[:, 1]
                label_boxes = _to_original(xywhn2xyxy(labels[:, 2:6], width, height), original_hw, ratio_pad)
            predicted = image_detections.detach().double().cpu().numpy()
            predicted[:, :4] = _to_original(predicted[:, :4], original_hw, ratio_pad)
            crowd_boxes, crowd_classes = self._crowds.get(paths[i], (None, None))
            stats.update(
                predicted[:, :4],
                predicted[:, 4],
                predicted[:, 5],
                label_boxes,
                label_classes,
                crowd_boxes,
                crowd_classes,
            )
            if self.plots:
                self.confusion += confusion_matrix(
                    predicted[:, :4],
                    predicted[:, 4],
                    predicted[:, 5],
                    label_boxes,
                    label_classes,
                    len(self.names),
                    CONFUSION_CONF,
                    CONFUSION_IOU,
                )
            if self.config.save_json:
                self.coco_results += predictions_to_coco(predicted, image_id_from_path(paths[i]), self.category_ids)
            if (self.config.save_txt or self.config.save_hybrid) and self.save_dir is not None:
                rows = _hybrid(predicted, label_boxes, label_classes) if self.config.save_hybrid else predicted
                _write_label_file(
                    self.save_dir / "labels" / f"{Path(paths[i]).stem}.txt", rows, original_hw, self.config.save_conf
                )

    def _read_crowds(self, dataloader: Any) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Crowd regions of the loader's images from ``crowd_annotations`` (see the class docstring)."""
        image_files = list(getattr(getattr(dataloader, "dataset", None), "im_files", []))
        annotations = self.crowd_annotations
        if annotations == "auto":
            annotations = _annotations_beside(image_files)
        if annotations is None or not image_files:
            return {}
        crowds = crowd_regions(annotations, image_files, self.category_ids)
        if crowds:
            count = sum(len(classes) for _, classes in crowds.values())
            LOGGER.info(
                "%d crowd regions from %s: detections on them count neither way (as pycocotools)", count, annotations
            )
        return crowds

    # -- output ---------------------------------------------------------------------------------------------------

    def _report(self, metrics: Metrics, largest_batch: int) -> None:
        LOGGER.info(_format_row(TABLE_HEADER))
        all_row = (
            "all",
            metrics.num_images,
            metrics.num_instances,
            metrics.precision,
            metrics.recall,
            metrics.map50,
            metrics.map,
        )
        LOGGER.info(_format_row(all_row))
        if metrics.num_instances == 0:
            LOGGER.warning("WARNING: no labels in the validation set, so no metrics can be computed")
        show_classes = self.config.verbose or (len(self.names) < 50 and not self.training)
        if show_classes and len(self.names) > 1:
            for k, cls in enumerate(metrics.ap_class):
                row = (
                    self.names[cls],
                    metrics.class_images[k],
                    metrics.class_instances[k],
                    metrics.class_precision[k],
                    metrics.class_recall[k],
                    metrics.ap50[k],
                    metrics.ap50_95[k],
                )
                LOGGER.info(_format_row(row))
        if not self.training and largest_batch:
            if self.config.tile:
                shape = f"whole images in {self.config.tile} px tiles at {self.config.imgsz}"
            else:
                shape = f"batches of up to {largest_batch} images, long side {self.config.imgsz}"
            LOGGER.info("Speed: %s (%s)", metrics.speed, shape)

    def _collect_for_plots(
        self, images: Tensor, targets: Tensor, detections: list[Tensor], paths: Sequence[str]
    ) -> None:
        """Keep the first PLOTTED_MOSAICS x 16 images (any batch sizes) with their labels and detections."""
        room = PLOTTED_MOSAICS * MOSAIC_IMAGES - len(self._plot_items)
        height, width = images.shape[2:]
        targets = targets.cpu().numpy()
        for i in range(min(room, images.shape[0])):
            rows = targets[targets[:, 0] == i]
            labels = np.concatenate([xywhn2xyxy(rows[:, 2:6], width, height), np.ones((len(rows), 1)), rows[:, 1:2]], 1)
            predicted = detections[i].detach().float().cpu().numpy()
            self._plot_items.append((images[i].cpu().numpy(), labels, predicted, paths[i]))

    def _collect_whole_image_for_plots(self, image: np.ndarray, targets: Tensor, detections: Tensor, path: str) -> None:
        """:meth:`_collect_for_plots` for one original-resolution BGR image, shrunk to the long side ``imgsz``."""
        from detector.data.dataset import resize_long_side

        if len(self._plot_items) >= PLOTTED_MOSAICS * MOSAIC_IMAGES:
            return
        small = resize_long_side(image, self.config.imgsz)
        scaled = detections.clone()
        scaled[:, [0, 2]] *= small.shape[1] / image.shape[1]
        scaled[:, [1, 3]] *= small.shape[0] / image.shape[0]
        chw = torch.from_numpy(np.ascontiguousarray(small.transpose(2, 0, 1)[::-1]))  # BGR HWC -> RGB CHW
        self._collect_for_plots(chw[None], targets, [scaled], [path])

    def _plot_batches(self) -> None:
        """val_batch{k}_labels.jpg and val_batch{k}_pred.jpg, 16 images each, side by side in the run folder."""
        from detector.utils.plots import PREDICTION_PLOT_CONF, plot_batch

        for k in range(PLOTTED_MOSAICS):
            items = self._plot_items[k * MOSAIC_IMAGES : (k + 1) * MOSAIC_IMAGES]
            if not items:
                break
            images, labels, predicted, paths = zip(*items, strict=True)
            labels_path = self.save_dir / f"val_batch{k}_labels.jpg"
            plot_batch(images, labels, self.names, labels_path, paths, show_conf=False)
            pred_path = self.save_dir / f"val_batch{k}_pred.jpg"
            plot_batch(images, predicted, self.names, pred_path, paths, min_conf=PREDICTION_PLOT_CONF)
        self._plot_items = []

    def _plot_results(self, metrics: Metrics) -> None:
        from detector.utils.plots import drawn_alongside, plot_confusion_matrix, plot_metrics_curves

        # The four curves in a child process while this one draws the rest: 80 classes' plots take 1.6 s on one core.
        with drawn_alongside(functools.partial(plot_metrics_curves, metrics, self.save_dir)):
            self._plot_batches()
            plot_confusion_matrix(self.confusion, self.names, self.save_dir / "confusion_matrix.png")


# --------------------------------------------------------------------------------------------------------------------
# Helpers of the loop


def _check_options(config: ValConfig) -> None:
    """val.py's numeric options and --tile*: one-line ConfigErrors before any model or data is loaded."""
    for key in ("conf_thres", "iou_thres"):
        check_threshold(f"--{key.replace('_', '-')}", getattr(config, key))
    if config.max_det < 1:
        raise ConfigError(f"--max-det must be at least 1, got {config.max_det}")
    if config.imgsz < 1:  # train.py, detect.py and export.py refuse it too (YOLOv5 would validate at 32)
        raise ConfigError(f"--imgsz: expected a positive number, got {config.imgsz}")
    if config.batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive number of images, got {config.batch_size}")
    if config.workers < 0:  # train.py refuses it too; it used to mean 0 here
        raise ConfigError(f"--workers: expected 0 or more, got {config.workers}")
    TileOptions.from_config(config)  # raises on invalid --tile* values


def _device_of(model: Any) -> torch.device:
    if isinstance(model, nn.Module):
        parameter = next(model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")
    return torch.device(getattr(model, "device", "cpu"))


def _call_backend(backend: Any, inputs: Tensor, augment: bool) -> Tensor:
    """A backend's output; a model exported for a fixed batch gets the last, smaller batch padded with zeros."""
    fixed_batch = getattr(backend, "fixed_batch", None)
    count = inputs.shape[0]
    if fixed_batch and count < fixed_batch:
        padding = inputs.new_zeros((fixed_batch - count, *inputs.shape[1:]))
        return backend(torch.cat((inputs, padding)), augment=augment)[:count]
    return backend(inputs, augment=augment)


def _annotations_beside(image_files: Sequence[str]) -> Path | None:
    """``<root>/annotations/instances_*.json`` for images under ``<root>/images/...``, if there is one."""
    for parent in Path(image_files[0]).parents if image_files else ():
        if parent.name == "images":
            return find_coco_annotations(parent.parent, image_files)
    return None


def _labels_by_path(dataloader: Any) -> dict[str, np.ndarray]:
    """Image path -> its (n, 5) ``[class, xywhn]`` labels of the original image, when the loader's dataset has them
    (``YOLODataset.im_files``/``labels``); empty for other loaders, which then fall back to the batch targets."""
    dataset = getattr(dataloader, "dataset", None)
    files, labels = getattr(dataset, "im_files", None), getattr(dataset, "labels", None)
    if files is None or labels is None or len(files) != len(labels):
        return {}
    return {str(f): np.asarray(lb).reshape(-1, 5) for f, lb in zip(files, labels, strict=True)}


def _to_original(boxes_xyxy: np.ndarray, original_hw: tuple[int, int], ratio_pad: Any) -> np.ndarray:
    """Undo a letterbox on xyxy pixel boxes (in place): x by its own ratio, y by its own, then clip to the image.

    ``ratio_pad`` is ``((ratio_h, ratio_w), (pad_w, pad_h))``. The two ratios differ slightly when a resize rounded
    one side; one shared gain (as YOLOv5's scale_boxes uses) would shift boxes by up to a pixel.
    """
    (ratio_h, ratio_w), (pad_w, pad_h) = ratio_pad
    boxes_xyxy[:, [0, 2]] = (boxes_xyxy[:, [0, 2]] - pad_w) / ratio_w
    boxes_xyxy[:, [1, 3]] = (boxes_xyxy[:, [1, 3]] - pad_h) / ratio_h
    return clip_boxes(boxes_xyxy, original_hw)


def _original_shape(shape: Any, input_hw: tuple[int, int]) -> tuple[tuple[int, int], Any]:
    """(original (h, w), ratio_pad) of a dataset ``shapes`` entry; None (augmented) means no letterbox to undo."""
    if shape is None:
        return input_hw, ((1.0, 1.0), (0.0, 0.0))
    (original_h, original_w), ratio_pad = shape
    return (int(original_h), int(original_w)), ratio_pad


def _hybrid(predicted: np.ndarray, label_boxes: np.ndarray, label_classes: np.ndarray) -> np.ndarray:
    """--save-hybrid rows (for auto-labelling): every label (conf 1), plus each prediction that overlaps no label of
    its class by IoU > HYBRID_IOU. Labels never suppress each other, and never enter the metrics (unlike YOLOv5)."""
    labels = np.concatenate([label_boxes, np.ones((len(label_boxes), 1)), label_classes[:, None]], 1)
    if len(labels) and len(predicted):
        iou = box_iou_numpy(predicted[:, :4], label_boxes)
        iou[predicted[:, 5:6] != label_classes[None, :]] = 0.0
        predicted = predicted[iou.max(1) <= HYBRID_IOU]
    return np.concatenate([labels, predicted], 0)


def _write_label_file(path: Path, rows: np.ndarray, original_hw: tuple[int, int], save_conf: bool) -> None:
    """YOLO-format lines ``class xc yc w h [conf]`` (normalised to the original image) for one image."""
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = original_hw
    boxes = xyxy2xywhn(np.asarray(rows[:, :4], dtype=np.float64), width, height)
    with open(path, "w", encoding="utf-8") as f:
        for box, conf, cls in zip(boxes, rows[:, 4], rows[:, 5], strict=True):
            values = [f"{v:.6g}" for v in box] + ([f"{conf:.5f}"] if save_conf else [])
            f.write(f"{int(cls)} {' '.join(values)}\n")


def _format_row(values: Sequence[Any]) -> str:
    """One line of the results table: a 22-wide name, then 11-wide numbers (3 decimals for floats)."""
    name, *rest = values
    cells = [f"{v:>11.3f}" if isinstance(v, (float, np.floating)) else f"{v!s:>11}" for v in rest]
    return f"{name!s:>22}" + "".join(cells)


def differences_from_val_defaults(config: ValConfig) -> list[str]:
    """'key value (val.py: default)' for each setting that could change results and differs from ValConfig()."""
    defaults = ValConfig()
    keys = ("imgsz", "batch_size", "conf_thres", "iou_thres", "max_det", "single_cls", "augment", "half")
    notes = {
        "batch_size": " - rectangular batch shapes depend on it",
        "half": " - half precision (fp16 on CUDA, bf16 on a CPU) moves mAP in the 3rd decimal",
    }
    return [
        f"{key} {getattr(config, key)} (val.py: {getattr(defaults, key)}){notes.get(key, '')}"
        for key in keys
        if getattr(config, key) != getattr(defaults, key)
    ]


# --------------------------------------------------------------------------------------------------------------------
# val.py: weights + dataset YAML -> run folder with metrics, plots and COCO evaluation


@dataclasses.dataclass
class _Setup:
    """What every validation of one weights file on one dataset shares (loaded once for --task study)."""

    weights: Path
    data: Any  # DatasetConfig
    backend: Any  # Backend
    names: tuple[str, ...]
    category_ids: Sequence[int] | None


def val(weights: str | Path | Sequence[str | Path], **options: Any) -> Metrics:
    """Python API of val.py: ``detector.val("best.pt", data="coco128.yaml", imgsz=640)`` -> :class:`Metrics`.

    ``options`` are ValConfig fields (val.py's flags with underscores); several ``weights`` validate an ensemble.
    Writes the same run folder as val.py (``project``/``name``).
    """
    from detector.utils.logging import setup_logging

    setup_logging()  # the same console output as val.py (idempotent)
    given = str(weights) if isinstance(weights, (str, Path)) else tuple(str(w) for w in weights)
    return run_validation(build_config(ValConfig, ("detector.val()", {**options, "weights": given})))


def run_validation(config: ValConfig, plots: bool = True) -> Metrics:
    """``val.py``: validate ``config.weights`` on ``config.data`` and write everything into a new run folder.

    Tasks: train/val/test validate that split; ``speed`` times it at conf 0.25 / IoU 0.45 (no rect batches,
    no JSON); ``study`` sweeps image sizes (see :func:`run_study`). Returns the Metrics (of the largest size
    for ``study``); with ``save_json`` mAP50 and mAP50-95 are pycocotools' (``Metrics.source``). ``plots=False``
    leaves out the curves, confusion matrix and batch images (``detector benchmarks``).
    """
    from detector.utils.files import increment_path
    from detector.utils.logging import add_file_log, remove_file_log

    _check_options(config)
    if config.task == "speed":
        config = dataclasses.replace(
            config, conf_thres=SPEED_TASK_CONF, iou_thres=SPEED_TASK_IOU, save_json=False, save_hybrid=False
        )
    setup = _setup(config)  # before the run folder exists, so a bad flag leaves no empty folder behind
    keep_freed_memory()  # each batch's forward reuses the last one's memory: no page faults (15-20% of it on a CPU)
    save_dir = increment_path(Path(config.project) / config.name, exist_ok=config.exist_ok)
    log_handler = add_file_log(save_dir, "val.log")
    try:
        LOGGER.info("Validating %r", setup.backend)
        if config.task == "study":
            return run_study(config, setup, save_dir)
        metrics = _validate(config, setup, save_dir, plots=plots and config.task != "speed")
        LOGGER.info("Results saved to %s", save_dir)
        return metrics
    finally:
        remove_file_log(log_handler)


def run_study(config: ValConfig, setup: _Setup, save_dir: Path) -> Metrics:
    """--task study: validate at 256, 384, ... up to ``config.imgsz``; write study.csv and study.png."""
    from detector.utils.plots import plot_study

    sizes = list(range(STUDY_MIN_SIZE, config.imgsz + 1, STUDY_STEP))
    if not sizes or sizes[-1] != config.imgsz:
        sizes.append(config.imgsz)
    rows, metrics = [], Metrics()
    for size in sizes:
        LOGGER.info("Study: image size %d", size)
        sized = dataclasses.replace(config, imgsz=size, save_json=False, save_txt=False, save_hybrid=False)
        metrics = _validate(sized, setup, save_dir, plots=False)
        speed = metrics.speed
        rows.append(
            [
                size,
                metrics.precision,
                metrics.recall,
                metrics.map50,
                metrics.map,
                speed.preprocess,
                speed.inference,
                speed.nms,
            ]
        )
    csv_path = save_dir / "study.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["imgsz", "precision", "recall", "mAP50", "mAP50-95", "preprocess_ms", "inference_ms", "nms_ms"]
        )
        writer.writerows([[row[0], *(f"{v:.5f}" for v in row[1:])] for row in rows])
    table = np.array(rows, dtype=np.float64)
    plot_study(sizes, table[:, 3], table[:, 4], table[:, 6] + table[:, 7], save_dir / "study.png")
    LOGGER.info("Study results saved to %s and %s", csv_path, save_dir / "study.png")
    return metrics


def _setup(config: ValConfig) -> _Setup:
    from detector.data.dataset_config import COCO80_TO_COCO91, load_dataset_config
    from detector.engine.backends import load_backend

    paths = [resolve_release_weights(path) for path in resolve_weights(config.weights)]
    for path in paths:
        if not path.exists():  # before the dataset, which may take a while to load (or generate)
            raise CheckpointError(f"{path}: weights not found")
    weights = paths[0]  # names the JSON file; an ensemble is named after its first model, as in YOLOv5
    data = load_dataset_config(config.data)
    split = config.task if config.task in ("train", "val", "test") else "val"
    if not data.split(split):
        raise ConfigError(f"{data.yaml_path}: no '{split}' split (set the '{split}:' key, or use --task val)")
    backend = load_backend(paths, config.device, half=config.half, dnn=config.dnn)
    if config.single_cls:
        names: tuple[str, ...] = ("item",)
    elif not backend.names:
        names = data.names
    elif len(backend.names) != data.nc:
        raise ConfigError(
            f"{weights}: the model predicts {len(backend.names)} classes but {data.yaml_path} has {data.nc}; "
            "pass the dataset the weights were trained on (or --single-cls)"
        )
    else:
        names = tuple(backend.names)
        if names != data.names:
            LOGGER.warning("WARNING: class names of %s differ from %s; using the model's", weights, data.yaml_path)
    category_ids = COCO80_TO_COCO91 if data.is_coco and not config.single_cls else None
    return _Setup(weights, data, backend, names, category_ids)


def _validate(config: ValConfig, setup: _Setup, save_dir: Path, plots: bool) -> Metrics:
    backend = setup.backend
    rect = config.task != "speed" and backend.fixed_hw is None
    imgsz = _check_image_size(config.imgsz, backend)
    batch_size = backend.fixed_batch or config.batch_size
    config = dataclasses.replace(config, imgsz=imgsz, batch_size=batch_size)
    loader, dataset = create_val_dataloader(
        setup.data,
        split=config.task if config.task in ("train", "val", "test") else "val",
        imgsz=imgsz,
        batch_size=batch_size,
        stride=backend.stride,
        workers=val_loader_workers(config.workers, backend.device),
        single_cls=config.single_cls,
        rect=rect,
        cache_dir=config.cache_dir,
    )
    backend.warmup((imgsz, imgsz))
    validator = Validator(
        config,
        setup.names,
        save_dir,
        plots=plots,
        category_ids=setup.category_ids,
        crowd_annotations=setup.data.coco_annotations or "auto",
    )
    metrics = validator.run(backend, loader)
    if config.save_json:
        metrics = coco_evaluation(
            metrics, validator.coco_results, dataset, setup, save_dir, setup.weights.stem, config.single_cls
        )
    return metrics


def val_loader_workers(requested: int, device: str | torch.device) -> int:
    """Validation loader worker processes for a forward on ``device``: on the CPU only the cores the forward's
    threads leave free, so none on a small machine, where the main process then loads each batch on threads
    (``YOLODataset.__getitems__``). Workers there would take cores from the forward (2 cores: val.py 4% slower
    with 2 workers)."""
    if torch.device(device).type != "cpu":
        return requested
    return min(requested, max(0, usable_cpus() - torch.get_num_threads()))


def create_val_dataloader(
    data: Any,
    *,
    split: str = "val",
    imgsz: int = 640,
    batch_size: int = 32,
    stride: int = 32,
    workers: int = 8,
    single_cls: bool = False,
    rect: bool = True,
    cache_dir: str | None = None,
) -> tuple[Any, Any]:
    """The validation (loader, dataset) of a DatasetConfig split; the trainer uses it too.

    ``cache_dir`` (``--cache-dir``; None or "" = automatic) is where the label scan cache goes; see
    :func:`detector.data.scan.label_cache_path`.

    Rectangular letterboxing follows YOLOv5's rule with one change that makes results independent of
    ``batch_size``: images are sorted by aspect ratio (height / width) and each group of ``RECT_SHAPE_GROUP``
    consecutive images is letterboxed (without ``auto``) to the smallest stride multiple that fits its most
    extreme aspect ratio, plus half a stride of padding (``pad`` 0.5). In YOLOv5 the group is the batch, so an
    image's padding - and its predictions - change with ``--batch-size`` (on coco128 at 640 mAP50 moves by up to
    0.01), and in-training figures differ from val.py's. Here the group size is fixed at 16, the batch size at
    which REFERENCE.md's YOLOv5 figures were taken, and batches are runs of consecutive images of one shape, up to
    ``batch_size`` long: any batch size gives the same predictions. The sort is stable, so equal aspect ratios keep
    their file order on every machine (NumPy's default sort orders ties differently across CPUs).
    """
    from torch.utils.data import DataLoader

    from detector.data.dataset import YOLODataset
    from detector.data.loader import collate_fn, same_shape_batches, worker_count

    sources = data.split(split)
    if not sources:
        raise ConfigError(f"{data.yaml_path}: no '{split}' split (set the '{split}:' key, or use --task val)")
    dataset = YOLODataset(
        sources,
        imgsz=imgsz,
        batch_size=RECT_SHAPE_GROUP,  # with rect: one letterbox shape per group of images (see above)
        stride=stride,
        augment=False,
        rect=rect,
        pad=0.5 if rect else 0.0,
        num_classes=len(data.names),
        single_cls=single_cls,
        label_dir=data.root / data.labels if data.labels else None,
        cache_dir=cache_dir,
        workers=workers,
        prefix=f"{split}: ",
    )
    num_workers = worker_count(workers, batch_size)
    loader = DataLoader(
        dataset,
        batch_sampler=same_shape_batches(dataset.batch_index, dataset.batch_shapes, batch_size, len(dataset)),
        num_workers=num_workers,
        collate_fn=collate_fn,  # no shared-memory slots: idle between validations, they would hold their pages
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,  # the trainer validates every epoch: keep the workers
    )
    return loader, dataset


def coco_evaluation(
    metrics: Metrics,
    results: list[dict[str, Any]],
    dataset: Any,
    setup: _Setup,
    save_dir: Path,
    weights_stem: str,
    single_cls: bool = False,
) -> Metrics:
    """Write the COCO results JSON, evaluate it with pycocotools, and return metrics carrying its mAPs.

    Ground truth: the dataset's COCO annotations (``annotations:`` in the YAML, or ``annotations/instances_<split>
    .json`` beside the images, as COCO and coco128 ship), else a JSON written from the YOLO labels.
    """
    predictions_path = write_json(results, save_dir / f"{weights_stem}_predictions.json")
    LOGGER.info("Saved %d detections in COCO format to %s", len(results), predictions_path)
    annotations = None
    if not single_cls:
        annotations = setup.data.coco_annotations or find_coco_annotations(setup.data.root, dataset.im_files)
    if annotations is None:
        ground_truth = labels_to_coco(dataset.im_files, dataset.shapes, dataset.labels, setup.names, setup.category_ids)
        annotations = write_json(ground_truth, save_dir / "ground_truth.json")
        LOGGER.info("No COCO annotations for this dataset: wrote ground truth from the YOLO labels to %s", annotations)
    LOGGER.info("Evaluating with pycocotools against %s", annotations)
    image_ids = [image_id_from_path(f) for f in dataset.im_files]
    coco = evaluate_coco(annotations, results, image_ids)
    LOGGER.info("%s", coco.summary)
    LOGGER.info(
        "pycocotools mAP50 %.3f mAP50-95 %.3f (detector's own matcher on the YOLO labels: %.3f %.3f)",
        coco.map50,
        coco.map,
        metrics.map50,
        metrics.map,
    )
    return metrics.replace(map=coco.map, map50=coco.map50, source="pycocotools")


def resolve_weights(weights: str | Sequence[str]) -> list[Path]:
    """``weights`` as paths (several: an ensemble); "" means the most recent runs/train/*/weights/best.pt (what
    train.py just wrote)."""
    if not isinstance(weights, str):
        return [Path(w) for w in weights]
    if weights:
        return [Path(weights)]
    candidates = sorted(Path("runs/train").glob("*/weights/best.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError("--weights is required (no runs/train/*/weights/best.pt found to default to)")
    LOGGER.info("No --weights given: using the most recent %s", candidates[-1])
    return [candidates[-1]]


def _check_image_size(imgsz: int, backend: Any) -> int:
    """--imgsz rounded up to a multiple of the stride, or the exported model's fixed size."""
    if backend.fixed_hw is not None:
        height, width = backend.fixed_hw
        if height != width:
            raise ConfigError(f"{backend.weights}: exported for a non-square {height}x{width} input; val needs square")
        if height != imgsz:
            LOGGER.warning(
                "WARNING: %s only accepts %dx%d inputs; validating at %d", backend.weights, height, width, height
            )
        return height
    stride = int(backend.stride)
    size = max(int(np.ceil(imgsz / stride)) * stride, stride)
    if size != imgsz:
        LOGGER.warning("WARNING: --imgsz %d is not a multiple of the stride %d; using %d", imgsz, stride, size)
    return size
