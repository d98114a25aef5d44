"""Inference: frames -> letterbox -> backend -> NMS -> :class:`Results`, for detect.py and the Python API.

:class:`Predictor` loads a model of any format once (:func:`load_backend`) and turns batches of BGR frames into
per-image :class:`Results` in original-image pixels. :func:`run_detect` is detect.py: it reads a ``--source``,
logs one line per image, writes annotated images/videos, YOLO label files and crops into ``runs/detect/exp*``
and ends with a speed summary. :class:`Detector` is the Python API over the same predictor. With ``tile`` set,
each image is predicted in overlapping tiles at its original resolution (:mod:`detector.engine.tiling`); the
Results are the same kind, in original-image pixels.

Pre-processing copies each frame as few times as it can: one letterbox (resize + pad), then one copy that does
BGR->RGB and HWC->CHW at once into the batch buffer; the uint8 batch goes to the device and becomes float there.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import cv2
import numpy as np
import torch

from detector.config import DetectConfig
from detector.data.augment import Letterbox, letterbox
from detector.data.media import WRITABLE_IMAGE_SUFFIXES
from detector.engine.backends import Backend, PyTorchBackend, detections_from_output, load_backend
from detector.engine.results import Results, write_image
from detector.engine.sources import FileSource, Frame, SourceInput, StreamSource, open_source
from detector.engine.tiling import TileOptions, predict_tiled, tile_grid
from detector.errors import ConfigError, DataError
from detector.ops.boxes import scale_boxes
from detector.utils.checks import check_imgsz, check_threshold
from detector.utils.files import increment_path
from detector.utils.torch_utils import describe_device, time_sync

LOGGER = logging.getLogger(__name__)

PREDICTIONS_CSV = "predictions.csv"  # --save-csv: one row per detection, in the run folder
PREDICTIONS_CSV_HEADER = ("image", "frame", "class", "class_id", "confidence", "x1", "y1", "x2", "y2")


@dataclass
class SpeedTotals:
    """Milliseconds spent per stage, summed over ``images``, for the final speed summary."""

    images: int = 0
    preprocess: float = 0.0
    inference: float = 0.0
    nms: float = 0.0
    last_input_shape: tuple[int, ...] = field(default_factory=tuple)

    def per_image(self) -> dict[str, float]:
        count = max(self.images, 1)
        return {"preprocess": self.preprocess / count, "inference": self.inference / count, "nms": self.nms / count}


class Stopwatch:
    """Milliseconds per stage of one batch: :meth:`lap` adds the time since the previous lap to a stage."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.ms = {"preprocess": 0.0, "inference": 0.0, "nms": 0.0}
        self.input_shape: tuple[int, ...] = ()  # (B, 3, h, w) of the last batch that went through the backend
        self._last = time_sync(device)

    def lap(self, stage: str) -> None:
        now = time_sync(self.device)
        self.ms[stage] += (now - self._last) * 1e3
        self._last = now


class Predictor:
    """A model loaded once, turning BGR frames into :class:`Results`.

    Options are detect.py's: ``imgsz`` one or two numbers (height, width); ``conf_thres``/``iou_thres``/``max_det``
    for NMS; ``classes`` keeps only those ids; ``agnostic_nms`` suppresses across classes; ``augment`` is test-time
    augmentation; ``half`` FP16 on CUDA; ``data`` a dataset YAML for class names; ``dnn`` runs ONNX files with
    OpenCV's DNN module. ``weights`` may also be an already loaded :class:`Backend`, or a list of weights for an
    ensemble (:class:`EnsembleBackend`). ``multi_label`` keeps a box for every class above ``conf_thres`` (val's
    rule).

    Tiling (:mod:`detector.engine.tiling`): with ``tiling`` (a :class:`TileOptions`, e.g.
    ``TileOptions.from_config(config)``; None = off) each image is predicted in overlapping tiles, each letterboxed
    to ``imgsz`` and batched, plus the whole image with ``full``; the tiles' boxes are joined by ``merge``
    ("nms"/"nmm") of boxes whose ``match`` ("iou"/"ios") exceeds ``match_thres`` (across classes with
    ``agnostic_nms``).
    """

    def __init__(
        self,
        weights: str | Path | Sequence[str | Path] | Backend,
        *,
        device: str | torch.device = "",
        imgsz: int | Sequence[int] = 640,
        conf_thres: float = 0.25,
        iou_thres: float = 0.45,
        max_det: int = 1000,
        classes: Sequence[int] | None = None,
        agnostic_nms: bool = False,
        augment: bool = False,
        half: bool = False,
        data: str | Path | None = None,
        dnn: bool = False,
        multi_label: bool = False,
        tiling: TileOptions | None = None,
    ) -> None:
        check_threshold("--conf-thres", conf_thres)
        check_threshold("--iou-thres", iou_thres)
        if max_det < 1:
            raise ConfigError(f"--max-det must be at least 1, got {max_det}")
        self.tiling = tiling
        if isinstance(weights, Backend):
            self.backend: Backend = weights
        else:
            self.backend = load_backend(weights, device, half=half, data=data or None, dnn=dnn)
        self.imgsz = check_imgsz(imgsz, self.backend.stride)
        if self.backend.fixed_hw and self.backend.fixed_hw != self.imgsz:
            LOGGER.warning(
                "WARNING: %s only accepts %dx%d inputs; using that instead of --imgsz %s",
                weights,
                *self.backend.fixed_hw,
                list(self.imgsz),
            )
            self.imgsz = self.backend.fixed_hw
        self.conf_thres = conf_thres
        self.iou_thres = iou_thres
        self.max_det = max_det
        self.classes = list(classes) if classes is not None else None
        unknown = [c for c in self.classes or () if not 0 <= c < len(self.names)]
        if unknown:  # a filter that can only ever keep nothing
            raise ConfigError(
                f"--classes {' '.join(map(str, unknown))}: the model has {len(self.names)} classes, "
                f"ids 0-{len(self.names) - 1}"
            )
        self.agnostic_nms = agnostic_nms
        self.augment = augment
        self.multi_label = multi_label
        self.speed = SpeedTotals()
        if self.backend.device.type == "cuda":
            self.backend.warmup(self.imgsz)

    @classmethod
    def from_config(cls, config: DetectConfig) -> Predictor:
        return cls(
            config.weights,
            device=config.device,
            imgsz=config.imgsz,
            conf_thres=config.conf_thres,
            iou_thres=config.iou_thres,
            max_det=config.max_det,
            classes=config.classes,
            agnostic_nms=config.agnostic_nms,
            augment=config.augment,
            half=config.half,
            data=config.data,
            dnn=config.dnn,
            tiling=TileOptions.from_config(config),
        )

    @property
    def names(self) -> list[str]:
        return self.backend.names

    def tile_count(self, shape: tuple[int, ...]) -> int:
        """How many tiles an image of ``shape`` (h, w, ...) is cut into (1 when tiling is off)."""
        if self.tiling is None:
            return 1
        return len(tile_grid(shape[0], shape[1], self.tiling.size, self.tiling.overlap))

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[torch.Tensor, list[Letterbox]]:
        """BGR (H, W, 3) uint8 frames -> (B, 3, h, w) float 0-1 RGB on the backend's device, and each letterbox.

        A single frame (or frames all of one size) is padded only up to the next stride multiple when the model
        takes any size; otherwise every frame is padded to the full ``imgsz`` so the batch shares one shape.
        """
        same_shape = all(image.shape == images[0].shape for image in images)
        auto = same_shape and self.backend.fixed_hw is None
        boxed = [letterbox(image, self.imgsz, stride=self.backend.stride, auto=auto) for image in images]
        height, width = boxed[0][0].shape[:2]
        batch = np.empty((len(images), 3, height, width), dtype=np.uint8)
        for i, (image, _) in enumerate(boxed):
            batch[i] = image.transpose(2, 0, 1)[::-1]  # HWC BGR -> CHW RGB in the one copy into the batch
        tensor = torch.from_numpy(batch).to(self.backend.device, non_blocking=True)
        tensor = tensor.half() if self.backend.fp16 else tensor.float()
        return tensor.div_(255), [info for _, info in boxed]

    def predict_images(
        self, images: Sequence[np.ndarray], paths: Sequence[str] | None = None, frames: Sequence[int] | None = None
    ) -> list[Results]:
        """:class:`Results` for BGR (H, W, 3) uint8 images (one batch, or tile by tile each image when tiling);
        ``paths``/``frames`` label them."""
        if not images:
            return []
        watch = Stopwatch(self.backend.device)
        if self.tiling is None:
            detections = self._detect(images, watch)
        else:
            detections = [self._detect_tiled(image, watch) for image in images]
        input_hw = watch.input_shape[2:]
        results = [self._to_results(found, image, input_hw) for found, image in zip(detections, images, strict=True)]
        watch.lap("nms")
        count = len(images)
        speed = {stage: ms / count for stage, ms in watch.ms.items()}
        for i, result in enumerate(results):
            result.speed = dict(speed)
            result.path = paths[i] if paths else f"image{i}"
            result.frame = frames[i] if frames else 0
        self._add_speed(speed, count, watch.input_shape)
        return results

    def _detect(self, images: Sequence[np.ndarray], watch: Stopwatch) -> list[torch.Tensor]:
        """Per image (n, 6) float ``[x1, y1, x2, y2, conf, class]`` in its own pixels, the images as one batch."""
        tensor, letterboxes = self.preprocess(images)
        watch.lap("preprocess")
        output = self._infer(tensor)
        watch.lap("inference")
        detections = detections_from_output(
            output,
            self.backend.end2end,
            self.conf_thres,
            self.iou_thres,
            classes=self.classes,
            agnostic=self.agnostic_nms,
            max_det=self.max_det,
            multi_label=self.multi_label,
        )
        input_hw = tuple(tensor.shape[2:])
        detections = [found.float() for found in detections]
        for found, info, image in zip(detections, letterboxes, images, strict=True):
            scale_boxes(found[:, :4], input_hw, image.shape[:2], ratio_pad=(info.ratio, info.pad))
        watch.input_shape = tuple(tensor.shape)
        watch.lap("nms")
        return detections

    def _detect_tiled(self, image: np.ndarray, watch: Stopwatch) -> torch.Tensor:
        """(n, 6) detections of one image predicted tile by tile, in its pixels; the merge counts as NMS time."""
        assert self.tiling is not None
        detections = predict_tiled(
            image,
            self.tiling,
            lambda crops: self._detect(crops, watch),
            agnostic=self.agnostic_nms,
            max_det=self.max_det,
        )
        watch.lap("nms")
        return detections

    def predict_frames(self, frames: Sequence[Frame]) -> list[Results]:
        """:class:`Results` for a batch of source frames."""
        return self.predict_images([f.image for f in frames], [f.path for f in frames], [f.frame for f in frames])

    def _infer(self, tensor: torch.Tensor) -> torch.Tensor:
        """Run the backend, in chunks of its fixed batch size (zero-padding the last) when it has one."""
        fixed = self.backend.fixed_batch
        if fixed is None or fixed == len(tensor):
            return self.backend(tensor, augment=self.augment)
        outputs = []
        for chunk in tensor.split(fixed):
            count = len(chunk)
            if count < fixed:
                chunk = torch.cat([chunk, chunk.new_zeros((fixed - count, *chunk.shape[1:]))])
            outputs.append(self.backend(chunk, augment=self.augment)[:count])
        return torch.cat(outputs)

    def save_feature_maps(self, image: np.ndarray, folder: Path) -> list[Path]:
        """``--visualize``: every layer's output for BGR ``image``, letterboxed as :meth:`predict_images` does, saved
        in ``folder`` as ``stage{i}_{module}_features.png`` and ``.npy`` (maps of 1 pixel in height or width are
        skipped, as in YOLOv5). One extra forward of the image; a ``.pt`` model only."""
        from detector.utils.plots import save_feature_maps

        backend = self.backend
        if not isinstance(backend, PyTorchBackend):
            raise ConfigError(f"--visualize needs one .pt model (its layers' outputs), not {_model_kind(backend)}")
        tensor, _ = self.preprocess([image])
        with torch.inference_mode():
            outputs = backend.model.layer_outputs(tensor)
        written = []
        for index, module, features in outputs:
            if features.shape[2] > 1 and features.shape[3] > 1:
                name = f"stage{index}_{module.split('.')[-1]}_features.png"
                written.append(save_feature_maps(features[0].float().cpu().numpy(), folder / name))
        return written

    def _to_results(self, detections: torch.Tensor, image: np.ndarray, input_shape: tuple[int, ...]) -> Results:
        """Results of (n, 6) detections already in ``image``'s pixels; ``input_shape`` (h, w) of the model input."""
        return Results(
            boxes=detections[:, :4].cpu().numpy().astype(np.float32, copy=False),
            confidences=detections[:, 4].float().cpu().numpy(),
            class_ids=detections[:, 5].cpu().numpy().astype(np.int64),
            names=tuple(self.names),
            orig_shape=(image.shape[0], image.shape[1]),
            image=image,
            input_shape=(int(input_shape[0]), int(input_shape[1])),
        )

    def _add_speed(self, speed: dict[str, float], count: int, input_shape: tuple[int, ...]) -> None:
        self.speed.images += count
        self.speed.preprocess += speed["preprocess"] * count
        self.speed.inference += speed["inference"] * count
        self.speed.nms += speed["nms"] * count
        self.speed.last_input_shape = input_shape

    def stream(
        self, source: SourceInput | FileSource | StreamSource, vid_stride: int = 1
    ) -> Iterator[tuple[Frame, Results]]:
        """(frame, results) for every frame of a source, lazily; the source is closed when iteration stops."""
        opened = source if isinstance(source, (FileSource, StreamSource)) else open_source(source, vid_stride)
        try:
            for batch in opened:
                yield from zip(batch, self.predict_frames(batch), strict=True)
        finally:
            opened.close()


# --------------------------------------------------------------------------------------------------------------------
# The Python API


class Detector:
    """Detection from Python: ``Detector("best.pt", device="cpu")("bus.jpg") -> [Results]``.

    The model is loaded once; every call reuses it. Options have detect.py's names and defaults. Inputs: an
    image path, a BGR (H, W, 3) uint8 array, a list of paths/arrays, a folder, a glob, a .txt list or a video
    file -> a list of :class:`Results`, one per image or video frame. Long videos, webcams and stream URLs are
    read lazily with :meth:`stream` (results keep their frame, so a list of a long video holds every frame).
    ``tile=640`` (and ``tile_overlap``, ``tile_full``, ``tile_merge``, ``tile_match``, ``tile_match_thres``: detect.py's
    ``--tile*`` flags, :class:`~detector.engine.tiling.TileOptions`) predicts in tiles, for small objects.
    ``Detector(["a.pt", "b.pt"])`` runs the models as an ensemble (detect.py ``--weights a.pt b.pt``).
    """

    def __init__(
        self,
        weights: str | Path | Sequence[str | Path],
        device: str = "",
        *,
        imgsz: int | Sequence[int] = 640,
        conf_thres: float = 0.25,
        iou_thres: float = 0.45,
        max_det: int = 1000,
        classes: Sequence[int] | None = None,
        agnostic_nms: bool = False,
        augment: bool = False,
        half: bool = False,
        data: str | Path | None = None,
        dnn: bool = False,
        tile: int = 0,
        tile_overlap: float = 0.2,
        tile_full: bool = False,
        tile_merge: str = "nms",
        tile_match: str = "ios",
        tile_match_thres: float = 0.5,
    ) -> None:
        tiling = TileOptions.create(
            tile, overlap=tile_overlap, full=tile_full, merge=tile_merge, match=tile_match, match_thres=tile_match_thres
        )
        self.predictor = Predictor(
            weights,
            device=device,
            imgsz=imgsz,
            conf_thres=conf_thres,
            iou_thres=iou_thres,
            max_det=max_det,
            classes=classes,
            agnostic_nms=agnostic_nms,
            augment=augment,
            half=half,
            data=data,
            dnn=dnn,
            tiling=tiling,
        )

    @property
    def names(self) -> list[str]:
        return self.predictor.names

    @property
    def backend(self) -> Backend:
        return self.predictor.backend

    def __call__(self, source: SourceInput, vid_stride: int = 1) -> list[Results]:
        """Results for every image/frame of a finite source (see the class docstring)."""
        opened = open_source(source, vid_stride)
        if opened.is_live:
            opened.close()
            raise ConfigError(f"{source!r} is a live stream that never ends: iterate Detector.stream(source) instead")
        return [result for _, result in self.predictor.stream(opened)]

    def stream(self, source: SourceInput, vid_stride: int = 1) -> Iterator[Results]:
        """Results one frame at a time (videos, webcams, stream URLs, or anything :meth:`__call__` takes)."""
        for _, result in self.predictor.stream(source, vid_stride):
            yield result

    def __repr__(self) -> str:
        return f"Detector({self.backend!r})"


# --------------------------------------------------------------------------------------------------------------------
# detect.py


class DetectOutputs:
    """Everything detect.py writes into its run folder: annotated images and videos, label files, crops."""

    def __init__(self, save_dir: Path, config: DetectConfig) -> None:
        self.save_dir = save_dir
        self.config = config
        self.labels_written = 0
        self._videos: dict[str, tuple[cv2.VideoWriter, Path]] = {}  # source path/URL -> (writer, output)
        if config.save_txt:
            (save_dir / "labels").mkdir(parents=True, exist_ok=True)
        self._csv_file: TextIO | None = None
        if config.save_csv:
            save_dir.mkdir(parents=True, exist_ok=True)
            self._csv_file = open(save_dir / PREDICTIONS_CSV, "w", newline="", encoding="utf-8")  # noqa: SIM115
            self._csv = csv.writer(self._csv_file)
            self._csv.writerow(PREDICTIONS_CSV_HEADER)

    @property
    def draws(self) -> bool:
        return not self.config.nosave or self.config.view_img

    def write(self, frame: Frame, result: Results) -> None:
        """Save what the flags ask for; draws the boxes on ``frame.image`` itself (crops are taken before)."""
        stem = _output_stem(frame)
        if self.config.save_txt:
            path = self.save_dir / "labels" / f"{stem}.txt"
            result.save_txt(path, save_conf=self.config.save_conf, xyxy=self.config.save_format == 1)
            self.labels_written += 1
        if self.config.save_crop:
            result.save_crops(self.save_dir / "crops", stem)
        if self._csv_file is not None:
            self._write_csv(frame, result)
        if self.draws:
            result.plot(
                line_thickness=self.config.line_thickness,
                hide_labels=self.config.hide_labels,
                hide_conf=self.config.hide_conf,
                inplace=True,
            )
        if self.config.nosave:
            return
        if frame.kind == "image":
            write_image(self.save_dir / _image_name(frame.path), frame.image)
        else:
            self._video_writer(frame).write(frame.image)

    def _write_csv(self, frame: Frame, result: Results) -> None:
        """One row per detection, flushed with each frame (an interrupted run keeps what it found)."""
        for box, confidence, class_id in zip(result.boxes, result.confidences, result.class_ids, strict=True):
            name = result.names[class_id] if class_id < len(result.names) else str(class_id)
            self._csv.writerow(
                [frame.path, frame.frame, name, int(class_id), f"{confidence:.5f}", *(f"{v:.1f}" for v in box)]
            )
        self._csv_file.flush()

    def _video_writer(self, frame: Frame) -> cv2.VideoWriter:
        key = f"{frame.kind}:{frame.path}"
        if key not in self._videos:
            if frame.kind == "video":
                self._close_videos()  # files are read one after another: the previous video is complete
            path = self.save_dir / f"{_output_stem(frame, with_frame=False)}.mp4"
            height, width = frame.image.shape[:2]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), frame.fps or 30.0, (width, height))
            if not writer.isOpened():
                raise DataError(f"{path}: OpenCV cannot write an mp4v video here")
            self._videos[key] = (writer, path)
        return self._videos[key][0]

    def close(self) -> None:
        self._close_videos()
        if self._csv_file is not None:
            self._csv_file.close()
            self._csv_file = None

    def _close_videos(self) -> None:
        for writer, _ in self._videos.values():
            writer.release()
        self._videos.clear()


class Viewer:
    """``--view-img``: shows frames in an OpenCV window when a display and a GUI-enabled OpenCV exist."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and _display_available()
        if enabled and not self.enabled:
            LOGGER.warning("WARNING: --view-img: no display here; not showing images")
        self._windows: set[str] = set()

    def show(self, name: str, image: np.ndarray) -> None:
        if not self.enabled:
            return
        try:
            if name not in self._windows:
                cv2.namedWindow(name, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO)
                cv2.resizeWindow(name, image.shape[1], image.shape[0])
                self._windows.add(name)
            cv2.imshow(name, image)
            cv2.waitKey(1)
        except cv2.error as e:  # e.g. opencv-python-headless: built without any GUI backend
            LOGGER.warning("WARNING: --view-img: OpenCV cannot open a window (%s); not showing images", _first_line(e))
            self.enabled = False

    def close(self) -> None:
        if self._windows:
            cv2.destroyAllWindows()


def _display_available() -> bool:
    if sys.platform.startswith("linux"):
        return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
    return True


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _output_stem(frame: Frame, with_frame: bool = True) -> str:
    """File stem for a frame's outputs: 'bus', 'video_12' (frame 12), '0' for webcam 0, a safe name for URLs."""
    stem = Path(frame.path).stem if frame.kind != "stream" else re.sub(r"[^\w.-]+", "_", frame.path).strip("_")
    return f"{stem}_{frame.frame}" if with_frame and frame.kind != "image" else stem


def _image_name(path: str) -> str:
    name = Path(path).name
    return name if Path(name).suffix.lower() in WRITABLE_IMAGE_SUFFIXES else f"{Path(name).stem}.jpg"


def _model_kind(backend: Backend) -> str:
    """'an ONNX model (best.onnx)', for errors about what a format cannot do."""
    kind = backend.format_name
    return f"{'an' if kind[0] in 'AEIOU' else 'a'} {kind} model ({backend.weights})"


def run_detect(config: DetectConfig, source: FileSource | StreamSource | None = None) -> Path:
    """detect.py: detect on ``config.source`` (or the already opened ``source``) with ``config.weights``.

    Returns the run folder.
    """
    if not config.weights:
        raise ConfigError("--weights is required (a .pt, .torchscript, .onnx, *_openvino_model or .engine)")
    if config.line_thickness < 1:  # OpenCV fills a rectangle drawn with a negative thickness: boxes would hide objects
        raise ConfigError(f"--line-thickness must be at least 1 pixel, got {config.line_thickness}")
    if source is None:
        source = open_source(config.source, config.vid_stride)
    try:
        predictor = Predictor.from_config(config)
        LOGGER.info("%s on %s", predictor.backend, describe_device(predictor.backend.device))
        if config.visualize and not isinstance(predictor.backend, PyTorchBackend):  # before the run folder exists
            raise ConfigError(
                f"--visualize needs one .pt model (its layers' outputs), not {_model_kind(predictor.backend)}"
            )
        save_dir = increment_path(Path(config.project) / config.name, config.exist_ok)
        outputs, viewer = DetectOutputs(save_dir, config), Viewer(config.view_img)
        try:
            for frame, result in predictor.stream(source):
                height, width = result.input_shape
                shape = f"{height}x{width}"
                if predictor.tiling is not None:
                    shape = f"{predictor.tile_count(frame.image.shape)} tiles of {shape}"
                speed = result.speed["inference"]
                LOGGER.info("%s: %s %s, %.1fms", frame.describe(), shape, result.summary(), speed)
                if config.visualize:  # before the boxes are drawn onto the frame
                    predictor.save_feature_maps(frame.image, save_dir / _output_stem(frame))
                outputs.write(frame, result)
                viewer.show(frame.path if frame.kind != "image" else "detector", frame.image)  # one window per stream
        finally:
            outputs.close()
            viewer.close()
    finally:
        source.close()
    _log_summary(predictor.speed, save_dir, outputs, source.skipped)
    return save_dir


def _log_summary(speed: SpeedTotals, save_dir: Path, outputs: DetectOutputs, skipped: int) -> None:
    per_image = speed.per_image()
    LOGGER.info(
        "Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape %s",
        per_image["preprocess"],
        per_image["inference"],
        per_image["nms"],
        speed.last_input_shape,
    )
    if skipped:
        LOGGER.warning("WARNING: %d unreadable file(s) skipped", skipped)
    saved = []
    if not outputs.config.nosave:
        saved.append("annotated images/videos")
    if outputs.labels_written:
        saved.append(f"{outputs.labels_written} label files in labels/")
    if outputs.config.save_crop:
        saved.append("crops in crops/")
    if outputs.config.save_csv:
        saved.append(f"detections in {PREDICTIONS_CSV}")
    if outputs.config.visualize:
        saved.append("feature maps in a folder per image")
    LOGGER.info("Results saved to %s%s", save_dir, f" ({', '.join(saved)})" if saved else "")
