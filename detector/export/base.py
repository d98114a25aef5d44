"""The format registry, the :class:`Format` base class, and the state one export run shares between formats.

A weight format is one :class:`Format` subclass in its own module (``torchscript.py``, ``onnx.py``, ...),
registered with :func:`register_format`. The class both writes the format (``write``, for export.py) and loads it
(``load``, returning the :class:`~detector.engine.backends.Backend` that detect.py, val.py and the check after
every export run), so a file is always read back by the very code users get. The registry is looked up by
``--include`` name (:func:`format_for_include`) and by file suffix or folder name (:func:`format_for_path`).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from detector.config import ExportConfig
from detector.errors import ExportError
from detector.export.nms import reference_detections
from detector.utils.checks import check_choice

if TYPE_CHECKING:
    from detector.engine.backends import Backend

LOGGER = logging.getLogger(__name__)

INPUT_NAME = "images"
CHECK_IMAGES = 4  # validation images the checks run on (cycled to fill a batch)
NMS_CHECK_POOL = 64  # images searched, in order, for ones on which the model detects something (the --nms check)

FORMATS: dict[str, type[Format]] = {}  # --include name -> format, in registration order


def register_format(cls: type[Format]) -> type[Format]:
    """Class decorator adding a format to :data:`FORMATS` under ``cls.name`` (its ``--include`` value)."""
    if cls.name in FORMATS:
        raise ValueError(
            f"export format {cls.name!r} is registered twice ({FORMATS[cls.name].__name__}, {cls.__name__})"
        )
    for other in FORMATS.values():
        taken = set(cls.suffixes) & set(other.suffixes)
        if taken:
            raise ValueError(f"{cls.__name__}: suffix {sorted(taken)} already belongs to {other.__name__}")
    FORMATS[cls.name] = cls
    return cls


def format_for_include(name: str) -> type[Format]:
    """The format of an ``--include`` value; a one-line ConfigError with a suggestion for an unknown one."""
    return check_choice("--include", name, FORMATS)


def format_for_path(path: str | Path) -> type[Format] | None:
    """The format that reads ``path`` (by suffix, or folder name for OpenVINO), or None when none does."""
    path = Path(path)
    return next((cls for cls in FORMATS.values() if cls.matches(path)), None)


def missing_packages(*modules: str) -> str | None:
    """Why ``modules`` cannot be imported, with the pip command; None when all are installed."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs the Python package(s) {', '.join(missing)} (pip install {' '.join(missing)})"
    return None


class Format(ABC):
    """One weight format: how export.py writes it, how every tool loads it, and what it can hold.

    Subclasses set ``name`` (the ``--include`` value), ``title`` (shown in the results table) and ``suffixes``
    (what :func:`format_for_path` recognises: file suffixes like ".onnx", or a folder-name ending), and implement
    :meth:`output_path`, :meth:`write`, :meth:`load` and :meth:`read_metadata`.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ()
    required_packages: ClassVar[tuple[str, ...]] = ()  # Python modules needed to write (and check) the format
    supports_nms: ClassVar[bool] = False  # whether --nms puts NMS into this format's graph
    supports_int8: ClassVar[bool] = False  # whether --int8 quantizes this format

    @classmethod
    def matches(cls, path: Path) -> bool:
        """Whether ``path`` is a file of this format (default: its suffix is one of ``suffixes``)."""
        return path.suffix.lower() in cls.suffixes

    def unavailable(self, ctx: ExportContext | None) -> str | None:
        """Why this format cannot be written here (missing package or device), or None."""
        return missing_packages(*self.required_packages)

    @abstractmethod
    def output_path(self, ctx: ExportContext) -> Path:
        """Where the file (or folder) goes: ``ctx.output_stem`` plus the format's suffix."""

    @abstractmethod
    def write(self, ctx: ExportContext) -> Path:
        """Write the export of ``ctx.model`` with ``ctx.metadata`` and return its path."""

    @abstractmethod
    def load(self, path: Path, device: torch.device, half: bool) -> Backend:
        """The backend running ``path`` (what ``load_backend`` returns for it)."""

    @abstractmethod
    def read_metadata(self, path: Path) -> dict[str, Any]:
        """The metadata stored in ``path`` ({} when it has none)."""

    # -- what the format does with the options ------------------------------------------------------------------

    def uses_nms(self, ctx: ExportContext) -> bool:
        return self.supports_nms and ctx.config.nms

    def int8_unavailable(self) -> str | None:
        """Why ``--int8`` cannot be applied to this format here (e.g. its quantizer is not installed), or None."""
        if self.supports_int8:
            return None
        capable = ", ".join(name for name, cls in FORMATS.items() if cls.supports_int8)
        return f"{self.title} has no int8 export (only {capable})"

    def uses_int8(self, ctx: ExportContext) -> bool:
        return ctx.config.int8 and self.int8_unavailable() is None

    def is_half(self, ctx: ExportContext) -> bool:
        """Whether the graph computes in (and takes) float16."""
        return ctx.config.half

    def precision(self, ctx: ExportContext) -> str:
        """What the written file computes in, for the results table."""
        if self.uses_int8(ctx):
            return "int8"
        return "fp16" if ctx.config.half else "fp32"

    def skipped_options(self, ctx: ExportContext) -> dict[str, str]:
        """Options asked for that this format does not apply, each with the reason (shown in the results table)."""
        skipped = {}
        if ctx.config.nms and not self.supports_nms:
            capable = ", ".join(name for name, cls in FORMATS.items() if cls.supports_nms)
            skipped["nms"] = f"not in graph ({self.title} holds the raw predictions; NMS in the graph: {capable})"
        if ctx.config.int8 and not self.uses_int8(ctx):
            skipped["int8"] = f"skipped: {self.int8_unavailable()}"
        return skipped

    # -- the check after export ---------------------------------------------------------------------------------

    def check_device(self, ctx: ExportContext) -> torch.device:
        """Where the check loads the written file."""
        return ctx.device

    def check_shapes(self, ctx: ExportContext) -> list[tuple[int, int, int, int]]:
        """Input shapes the check runs: the export shape, plus another batch and size for --dynamic."""
        shapes = [ctx.export_shape]
        if ctx.config.dynamic:
            height, width = ctx.imgsz
            smaller = max(ctx.max_stride, (height // 2) // ctx.max_stride * ctx.max_stride)
            shapes.append((ctx.config.batch_size + 1, 3, smaller, width))
        return shapes

    def nms_reference_predictions(self, images: Tensor, ctx: ExportContext) -> tuple[Tensor, bool]:
        """Raw predictions the NMS check starts from, and whether they came from this format's own runtime
        (then results must match exactly; from PyTorch, borderline detections may differ by rounding)."""
        return ctx.torch_predictions(images, half=self.is_half(ctx)), False


# --------------------------------------------------------------------------------------------------------------------
# Shared state of one export run


class RawOutput(nn.Module):
    """Wraps a model so the exported graph has exactly one output: the decoded (B, N, 5 + nc) predictions."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        output = self.model(images)
        return output[0] if isinstance(output, (tuple, list)) else output


@dataclass
class ExportContext:
    """Everything a format needs: the prepared model, the options, where to write, and cached intermediate files."""

    config: ExportConfig
    model: nn.Module  # fused, eval, Detect.export on, float32, on ``device``; outputs (B, N, 5 + nc)
    metadata: dict[str, Any]
    imgsz: tuple[int, int]  # (height, width)
    device: torch.device
    output_stem: Path  # run folder / weights stem: formats add their suffix
    work_dir: Path  # temporary files (e.g. an ONNX file that only OpenVINO needs), removed after the run
    _half_model: nn.Module | None = None
    _onnx_files: dict[tuple[str, bool, bool], Path] = field(default_factory=dict)
    _predictions: dict[tuple[Any, ...], Tensor] = field(default_factory=dict)
    _check_images: list[np.ndarray] | None = None
    _nms_pool: list[np.ndarray] | None = None  # validation images the --nms check searches ...
    _nms_searched: int = 0  # ... how many of them it has run the model on ...
    _nms_check_images: list[np.ndarray] = field(default_factory=list)  # ... and those with detections

    @property
    def max_stride(self) -> int:
        return int(self.metadata["stride"])

    @property
    def export_shape(self) -> tuple[int, int, int, int]:
        return (self.config.batch_size, 3, *self.imgsz)

    @property
    def check_source(self) -> str:
        """Where the check images come from, for the results table."""
        return f"{self.config.data} validation" if self.config.data else "built-in validation"

    def model_in(self, half: bool) -> nn.Module:
        """The model in fp32, or an fp16 copy (made once)."""
        if not half:
            return self.model
        if self._half_model is None:
            self._half_model = copy.deepcopy(self.model).half()
        return self._half_model

    def check_images(self) -> list[np.ndarray]:
        """The first few BGR validation images of ``--data`` (the built-in dataset's without it), loaded once."""
        if self._check_images is None:
            self._check_images = validation_images(self.config.data, CHECK_IMAGES)
        return self._check_images

    def nms_check_images(self, count: int) -> list[np.ndarray]:
        """``count`` validation images (at most :data:`CHECK_IMAGES`) on which the model finds something at
        ``--conf-thres`` - our Python NMS on the PyTorch predictions at the export size - searched in order and
        kept for the next format: an ``--nms`` check must compare real detections, never empty outputs.

        Raises ExportError when none of the first :data:`NMS_CHECK_POOL` images has a detection.
        """
        count = min(count, CHECK_IMAGES)
        if self._nms_pool is None:
            self._nms_pool = validation_images(self.config.data, NMS_CHECK_POOL)
        while len(self._nms_check_images) < count and self._nms_searched < len(self._nms_pool):
            image = self._nms_pool[self._nms_searched]
            self._nms_searched += 1
            batch = torch.from_numpy(self.letterboxed(image, self.imgsz)[None]).to(self.device)
            if len(reference_detections(self.torch_predictions(batch), self.config)[0]):
                self._nms_check_images.append(image)
        if not self._nms_check_images:
            raise ExportError(
                f"the --nms check found no detections above --conf-thres {self.config.conf_thres} on the "
                f"{len(self._nms_pool)} {self.check_source} images it searched, so it cannot compare the graph's NMS "
                "with ours: pass --data with images of the model's classes (or a lower --conf-thres)"
            )
        return self._nms_check_images

    def example_input(
        self, shape: Sequence[int], half: bool = False, images: Sequence[np.ndarray] | None = None
    ) -> Tensor:
        """A (B, 3, H, W) input in [0, 1]: ``images`` (default :meth:`check_images`) letterboxed to (H, W) as
        val.py does, cycled to fill the batch. Real scenes, never noise: the checks compare real predictions."""
        batch, _, height, width = shape
        images = self.check_images() if images is None else images
        stacked = np.stack([self.letterboxed(images[i % len(images)], (height, width)) for i in range(batch)])
        tensor = torch.from_numpy(stacked).to(self.device)
        return tensor.half() if half else tensor

    def letterboxed(self, image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """A BGR uint8 image -> (3, H, W) float32 RGB 0-1, letterboxed to ``size`` (height, width) as val.py does."""
        return letterboxed_input(image, size, self.max_stride)

    @torch.inference_mode()
    def torch_predictions(self, images: Tensor, half: bool = False) -> Tensor:
        """Raw (B, N, 5 + nc) predictions of the PyTorch model (fp32 or its fp16 copy) as float32, on the CPU.

        Cached per input: every format is checked on the same few inputs.
        """
        key = (tuple(images.shape), str(images.dtype), half, float(images.float().sum()))
        if key not in self._predictions:
            model = self.model_in(half)
            dtype = torch.float16 if half else torch.float32
            self._predictions[key] = RawOutput(model).eval()(images.to(self.device, dtype)).float().cpu()
        return self._predictions[key]

    def onnx_file(self, flavor: str, half: bool, for_openvino: bool = False) -> Path:
        """An ONNX file of this model in ``work_dir`` (made once per flavor/precision/target): "raw", "nms" or
        "tensorrt"; ``for_openvino`` as :func:`detector.export.onnx.write_onnx`."""
        from detector.export.onnx import write_onnx

        key = (flavor, half, for_openvino)
        if key not in self._onnx_files or not self._onnx_files[key].is_file():
            suffix = ("_fp16" if half else "") + ("_openvino" if for_openvino else "")
            path = self.work_dir / f"{self.output_stem.name}_{flavor}{suffix}.onnx"
            write_onnx(self, path, flavor=flavor, half=half, simplify=False, for_openvino=for_openvino)
            self._onnx_files[key] = path
        return self._onnx_files[key]


def letterboxed_input(image: np.ndarray, size: tuple[int, int], stride: int) -> np.ndarray:
    """A BGR uint8 image -> (3, H, W) float32 RGB 0-1 network input, letterboxed to ``size`` (height, width) as
    val.py does (padding to exactly ``size``; ``stride`` as the letterbox takes it)."""
    from detector.data.augment import letterbox

    image, _ = letterbox(image, size, stride=stride, auto=False)
    return np.ascontiguousarray(image[..., ::-1].transpose(2, 0, 1)).astype(np.float32) / 255


def validation_images(data: str, limit: int) -> list[np.ndarray]:
    """Up to ``limit`` BGR (H, W, 3) uint8 validation images of a dataset YAML.

    ``data`` "" means the built-in dataset (``detector.data.builtin``): generated deterministically on first use
    into the cache folder (``$DETECTOR_CACHE``, else ``~/.cache/detector``) that train.py and val.py share, then
    read from there. Unreadable files are skipped with a warning; none readable is an ExportError naming the dataset.
    """
    import cv2

    from detector.data.dataset import find_images
    from detector.data.dataset_config import load_dataset_config

    images = []
    for file, _ in find_images(load_dataset_config(data).val)[:limit]:
        image = cv2.imread(str(file))
        if image is None:
            LOGGER.warning(f"skipping unreadable image {file}")
            continue
        images.append(image)
    if not images:
        raise ExportError(f"--data {data!r}: no readable images in its validation set")
    return images


@contextlib.contextmanager
def quiet_tracing() -> Iterator[None]:
    """Silence TracerWarnings and the TorchScript-based ONNX exporter's deprecation notice during export.

    Tracer warnings flag Python values frozen into a trace; the check after every export runs the file at a
    second input shape with --dynamic, which is what catches a wrongly frozen shape.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # torch.jit.trace/load announce TorchScript's deprecation; it stays the way to write .torchscript files
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx.*")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        yield
