"""Per-image detection results of the Python API and detect.py: boxes, confidences, classes, and ways to save them.

A :class:`Results` holds NumPy arrays in the original image's pixel coordinates (not the letterboxed model input):
``boxes`` (N, 4) float32 xyxy, ``confidences`` (N,) float32, ``class_ids`` (N,) int64.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from detector.errors import DataError
from detector.ops.boxes import xyxy2xywhn
from detector.utils.drawing import crop_box, draw_detections
from detector.utils.files import safe_file_name


@dataclass
class Results:
    """Detections of one image or video frame.

    ``boxes`` (N, 4) float32 xyxy pixels of the original image, ``confidences`` (N,) float32 in 0-1,
    ``class_ids`` (N,) int64, ``names`` class names indexed by id, ``orig_shape`` (height, width) of the original
    image, ``path`` its file (or 'image0' for an array, the URL for a stream), ``frame`` the 1-based video frame
    (0 for a still image), ``image`` the original (H, W, 3) uint8 BGR image (kept for plot/save/crops),
    ``speed`` milliseconds per image and stage: 'preprocess', 'inference', 'nms', ``input_shape`` the
    (height, width) of the letterboxed model input.
    """

    boxes: np.ndarray
    confidences: np.ndarray
    class_ids: np.ndarray
    names: tuple[str, ...]
    orig_shape: tuple[int, int]
    path: str = "image0"
    frame: int = 0
    image: np.ndarray | None = field(default=None, repr=False)
    speed: dict[str, float] = field(default_factory=dict)
    input_shape: tuple[int, int] = (0, 0)

    def __len__(self) -> int:
        return len(self.boxes)

    def __repr__(self) -> str:
        return f"Results({self.path!r}, {self.orig_shape[1]}x{self.orig_shape[0]}, {self.summary()})"

    def class_name(self, class_id: int) -> str:
        return self.names[class_id] if 0 <= class_id < len(self.names) else str(class_id)

    def summary(self) -> str:
        """Counts per class in class-id order, e.g. '4 persons, 1 bus', or '(no detections)'."""
        if not len(self):
            return "(no detections)"
        counts = Counter(int(c) for c in self.class_ids)
        return ", ".join(f"{n} {self.class_name(c)}{'s' * (n > 1)}" for c, n in sorted(counts.items()))

    def plot(
        self,
        *,
        line_thickness: int | None = None,
        hide_labels: bool = False,
        hide_conf: bool = False,
        inplace: bool = False,
    ) -> np.ndarray:
        """The original image with the boxes and labels drawn: (H, W, 3) uint8 BGR.

        A copy unless ``inplace`` (detect.py draws on the frame it owns to save the copy).
        """
        image = self._require_image("plot")
        canvas = image if inplace else image.copy()
        return draw_detections(
            canvas,
            self.boxes,
            self.class_ids,
            self.confidences,
            self.names,
            line_thickness=line_thickness,
            hide_labels=hide_labels,
            hide_conf=hide_conf,
        )

    def save(self, path: str | Path, **plot_options: Any) -> Path:
        """Write the annotated image (format from the suffix, e.g. .jpg/.png) and return its path."""
        path = Path(path)
        write_image(path, self.plot(**plot_options))
        return path

    def to_json(self) -> list[dict[str, Any]]:
        """One dict per detection: name, class, confidence and box {x1, y1, x2, y2} in pixels (plain Python types)."""
        return [
            {
                "name": self.class_name(int(class_id)),
                "class": int(class_id),
                "confidence": round(float(confidence), 5),
                "box": {key: round(float(v), 2) for key, v in zip(("x1", "y1", "x2", "y2"), box, strict=True)},
            }
            for box, confidence, class_id in zip(self.boxes, self.confidences, self.class_ids, strict=True)
        ]

    tojson = to_json  # the spelling ultralytics users know

    def yolo_lines(self, save_conf: bool = False, xyxy: bool = False) -> list[str]:
        """YOLO label lines 'class x_center y_center width height [confidence]', coordinates normalised 0-1;
        with ``xyxy`` 'class x1 y1 x2 y2 [confidence]', corners normalised 0-1 (YOLOv5's ``--save-format 1``)."""
        height, width = self.orig_shape
        boxes = self.boxes.astype(np.float64)
        if xyxy:
            normalised = boxes / np.array([width, height, width, height], np.float64)
        else:
            normalised = xyxy2xywhn(boxes, width, height)
        lines = []
        for box, confidence, class_id in zip(normalised, self.confidences, self.class_ids, strict=True):
            values = [f"{v:.6g}" for v in box]
            if save_conf:
                values.append(f"{float(confidence):.6g}")
            lines.append(" ".join([str(int(class_id)), *values]))
        return lines

    def save_txt(self, path: str | Path, save_conf: bool = False, xyxy: bool = False) -> Path:
        """Write the detections as a YOLO label file (see :meth:`yolo_lines`); an empty file when there are none."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = self.yolo_lines(save_conf, xyxy)
        path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
        return path

    def crops(self) -> list[np.ndarray]:
        """The region of every detection (slightly enlarged for context), as BGR copies, in detection order."""
        image = self._require_image("crops")
        return [crop_box(image, box) for box in self.boxes]

    def save_crops(self, folder: str | Path, stem: str | None = None) -> list[Path]:
        """Write each crop to ``folder/<class name>/<stem>_<k>.jpg`` and return the paths (a class name that is no
        safe folder name - 'a/b', '..' - is made one: :func:`~detector.utils.files.safe_file_name`)."""
        stem = stem or Path(self.path).stem + (f"_{self.frame}" if self.frame else "")
        paths = []
        for k, (crop, class_id) in enumerate(zip(self.crops(), self.class_ids, strict=True)):
            class_folder = safe_file_name(self.class_name(int(class_id)), f"class{int(class_id)}")
            path = Path(folder) / class_folder / f"{stem}_{k}.jpg"
            write_image(path, crop)
            paths.append(path)
        return paths

    def _require_image(self, action: str) -> np.ndarray:
        if self.image is None:
            raise ValueError(f"Results.{action}() needs the original image, but this result was made without it")
        return self.image


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Encode with the suffix's format and write, creating folders; works with non-ASCII paths on every OS."""
    path = Path(path)
    suffix = path.suffix.lower() or ".jpg"
    ok, encoded = cv2.imencode(suffix, image)
    if not ok:
        raise DataError(f"{path}: OpenCV cannot write images of type '{suffix}'")
    path.parent.mkdir(parents=True, exist_ok=True)
    encoded.tofile(str(path))
