"""export.py's engine: write the formats of ``--include`` and check each file through ``load_backend``.

:class:`Exporter` prepares the model once (fused, eval, ``Detect.export`` so grids are computed inside the graph),
has each requested :class:`~detector.export.base.Format` write its file into the run folder, then loads the file
with :func:`detector.engine.backends.load_backend` - the loader detect.py and val.py use - and compares what it
returns with the PyTorch model on real validation images (``--data``'s, else the built-in dataset's):

* raw exports: the (B, N, 5 + nc) predictions must agree within 1e-3 (fp32; fp16 and int8 have looser bounds);
* ``--nms`` exports (ONNX, TensorRT): the final detections must equal our single-label Python NMS
  (:func:`detector.export.nms.reference_detections`) on the same raw predictions, on images where the model
  detects something (a check that compares no detections never passes).

A failed check is an :class:`~detector.errors.ExportError`: the bad file is deleted, the other formats are still
written, and :meth:`Exporter.run` raises after logging the results table. Options a format cannot apply (``--nms``
for TorchScript/OpenVINO, ``--int8`` for TorchScript/TensorRT or without NNCF) are shown in the table, never
silently.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from detector.config import ExportConfig, build_config
from detector.engine.backends import detections_from_output, load_backend
from detector.errors import ConfigError, DetectorError, ExportError
from detector.export.base import ExportContext, Format, format_for_include, quiet_tracing
from detector.export.int8 import warn_if_calibrated_on_builtin
from detector.export.metadata import build_metadata, model_names
from detector.export.nms import match_detections, reference_detections
from detector.export.onnx import MAX_OPSET, MIN_INT8_OPSET, MIN_OPSET
from detector.utils.checks import check_imgsz, check_threshold
from detector.utils.files import file_size_mb, increment_path
from detector.utils.torch_utils import select_device

LOGGER = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-3  # raw predictions vs PyTorch: |Δ| of scores, |Δ| / max(1, |value|) of pixel box values
FP16_SCORE_TOLERANCE = 2e-2  # fp16 keeps ~3 significant digits: single scores within 0.02 (the --nms check)
# fp16 checks the mean: rounding the logits to fp16 moves a box's width or height through exp-like decoding by up to
# 7.5% at some anchor (yolov5n at 640 on coco128: PyTorch's own fp16 against its fp32, median 2.9%; an fp16 ONNX
# against PyTorch's fp16 up to 3.5%), while the means stay at 4e-4 (boxes) and 2e-5 (scores); a broken graph moves
# whole scales, far past these bounds
FP16_MEAN_BOX_TOLERANCE = 2e-3
FP16_MEAN_SCORE_TOLERANCE = 1e-3
TOLERANCES = {  # precision -> (statistic of |Δ|, bound for boxes, bound for scores) of the raw-prediction check
    "fp32": ("max", FP32_TOLERANCE, FP32_TOLERANCE),
    "fp16": ("mean", FP16_MEAN_BOX_TOLERANCE, FP16_MEAN_SCORE_TOLERANCE),
    # int8 moves single outputs by up to ~0.3 (measured on yolov5n); the mean catches a broken graph instead
    "int8": ("mean", 0.1, 0.02),
}
NMS_MIN_MATCH_OTHER_RUNTIME = 0.9  # --nms check against PyTorch's predictions (TensorRT): near-ties may swap


@dataclass(frozen=True)
class ExportResult:
    """What happened to one format: where it went, how long it took, what it holds, and how its check came out."""

    format: str  # registry name, e.g. "onnx"
    title: str  # display name, e.g. "ONNX"
    path: Path | None  # the written file or folder (None when skipped or failed)
    seconds: float = 0.0  # time to write it (the check not included)
    size_mb: float = 0.0
    check: str = ""  # e.g. "scores max |Δ| 3.1e-05, ... at 1x3x640x640 (4 built-in validation images)"
    precision: str = ""  # what the file computes in: "fp32", "fp16", "fp16 weights", "int8"
    nms: str = ""  # "in graph", "not in graph", or "" when --nms was not asked for
    skipped_options: dict[str, str] = field(default_factory=dict)  # option asked for -> why it was not applied
    skipped: str | None = None  # why the format was not attempted (missing runtime or device)
    error: str | None = None  # why it failed

    @property
    def ok(self) -> bool:
        return self.skipped is None and self.error is None


class Exporter:
    """Writes the formats of ``config.include`` and checks each through ``load_backend`` against PyTorch.

    ``Exporter(config).run()`` loads ``config.weights``; ``run(model)`` exports an in-memory DetectionModel.
    Returns one :class:`ExportResult` per format, or raises ExportError (after logging the table) if any failed.
    """

    def __init__(self, config: ExportConfig) -> None:
        self.config = config
        validate_config(config)

    def run(self, model: nn.Module | None = None) -> list[ExportResult]:
        config = self.config
        device = select_device(config.device)
        if model is None:
            if not config.weights:
                raise ConfigError("--weights: expected a model file (.pt), got nothing")
            from detector.models.loading import load_model

            model = load_model(config.weights, device=str(device))
        started = time.perf_counter()
        model = prepare_model(model, device)
        imgsz = check_imgsz(config.imgsz, int(model.stride.max()), flag="--imgsz")
        stem = Path(config.weights).stem if config.weights else "model"
        formats = [format_for_include(name)() for name in config.include]
        _check_before_writing(config, formats)
        run_dir = increment_path(Path(config.project) / config.name, exist_ok=config.exist_ok)
        if config.inplace:
            LOGGER.info("--inplace has no effect: the exported Detect head never writes into its inputs")
        LOGGER.info(
            f"Exporting {stem} ({len(model_names(model))} classes, input {config.batch_size}x3x{imgsz[0]}x{imgsz[1]}"
            f"{', dynamic' if config.dynamic else ''}{', fp16' if config.half else ''}"
            f"{', NMS in graph' if config.nms else ''}{', int8' if config.int8 else ''}) to {run_dir}"
        )
        if config.int8:
            warn_if_calibrated_on_builtin(model_names(model), config.data)
        with tempfile.TemporaryDirectory(prefix=".export-", dir=run_dir) as work_dir:
            ctx = ExportContext(
                config=config,
                model=model,
                metadata=build_metadata(model, config, imgsz),
                imgsz=imgsz,
                device=device,
                output_stem=run_dir / stem,
                work_dir=Path(work_dir),
            )
            results = [export_format(fmt, ctx) for fmt in formats]
        LOGGER.info(results_table(results))
        LOGGER.info(f"Export finished in {time.perf_counter() - started:.1f}s, results in {run_dir}")
        failed = [r for r in results if r.error]
        if failed:
            raise ExportError("; ".join(f"{r.title}: {r.error}" for r in failed))
        if not any(r.ok for r in results):  # asked for formats, got none: a script must not take that as success
            raise ExportError("nothing exported: " + "; ".join(f"{r.title} skipped ({r.skipped})" for r in results))
        return results


def _check_before_writing(config: ExportConfig, formats: Sequence[Format]) -> None:
    """What can fail before anything is written, raised before the run folder exists: a ``--data`` YAML that does
    not load (its images check every export and calibrate ``--int8``), and formats none of which can be written
    here (a missing runtime or device; when only some are missing, those are skipped in the results table)."""
    from detector.data.dataset_config import load_dataset_config

    if config.data:
        load_dataset_config(config.data)
    missing = [(fmt.title, fmt.unavailable(None)) for fmt in formats]
    if missing and all(reason for _, reason in missing):
        raise ExportError("nothing exported: " + "; ".join(f"{title} skipped ({reason})" for title, reason in missing))


def prepare_model(model: nn.Module, device: torch.device) -> nn.Module:
    """A copy of ``model`` ready to export: float32 on ``device``, eval, BatchNorm fused, no gradients, and
    ``Detect.export`` on so grids are computed from the input shape inside the graph."""
    model = copy.deepcopy(model).to(device).float().eval()
    if hasattr(model, "fuse"):
        model = model.fuse() or model
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    detect = getattr(model, "detect", None)
    if detect is None or not hasattr(detect, "export"):
        raise ExportError("the model has no Detect head with an export mode (expected a detector DetectionModel)")
    detect.export = True
    return model


def export_format(fmt: Format, ctx: ExportContext) -> ExportResult:
    """Write one format and check it; problems become the result's ``skipped``/``error``, never an exception."""
    reason = fmt.unavailable(ctx)
    if reason:
        LOGGER.info(f"{fmt.title}: skipped, {reason}")
        return ExportResult(fmt.name, fmt.title, None, skipped=reason)
    LOGGER.info(f"{fmt.title}: exporting with {_runtime_versions(fmt)}...")
    holds: dict[str, Any] = {
        "precision": fmt.precision(ctx),
        "nms": ("in graph" if fmt.uses_nms(ctx) else "not in graph") if ctx.config.nms else "",
        "skipped_options": fmt.skipped_options(ctx),
    }
    path = fmt.output_path(ctx)
    started = time.perf_counter()
    try:
        with quiet_tracing():
            path = fmt.write(ctx)
            seconds = time.perf_counter() - started
            check = check_export(fmt, path, ctx)
    except DetectorError as e:
        _remove(path)
        return ExportResult(fmt.name, fmt.title, None, time.perf_counter() - started, error=str(e), **holds)
    except Exception as e:  # a converter's own failure (torch.onnx, OpenVINO, TensorRT): report it in one line
        LOGGER.debug(f"{fmt.title} export failed", exc_info=True)
        _remove(path)
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        error = f"export failed with {type(e).__name__}: {first_line}"
        return ExportResult(fmt.name, fmt.title, None, time.perf_counter() - started, error=error, **holds)
    size = file_size_mb(path)
    LOGGER.info(f"{fmt.title}: {path} ({size:.1f} MB, {seconds:.1f}s), check {check}")
    return ExportResult(fmt.name, fmt.title, path, seconds, size, check, **holds)


def _remove(path: Path) -> None:
    """Delete a failed export so nothing downstream picks up a bad file."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------------------------
# The check after export


def check_export(fmt: Format, path: Path, ctx: ExportContext) -> str:
    """Load the written file with ``load_backend`` (as detect.py and val.py do), run it at every check shape and
    compare with PyTorch; ExportError if it is off."""
    backend = load_backend(path, fmt.check_device(ctx))
    half = fmt.is_half(ctx)
    precision = fmt.precision(ctx)
    tolerance = TOLERANCES[precision if precision in TOLERANCES else "fp16"]
    uses_nms = fmt.uses_nms(ctx)
    if uses_nms != backend.end2end:
        raise ExportError(f"{path.name} loads {'with' if backend.end2end else 'without'} NMS outputs, as not written")
    shapes = fmt.check_shapes(ctx)
    images = ctx.nms_check_images(max(shape[0] for shape in shapes)) if uses_nms else ctx.check_images()
    reports = []
    for i, shape in enumerate(shapes):
        inputs = ctx.example_input(shape, half=half, images=images)
        where = "x".join(map(str, shape))
        if uses_nms:
            reports.append(_check_nms(fmt, backend(inputs), inputs, ctx, precision != "fp32", where, i == 0))
        else:
            reports.append(_check_raw(backend(inputs), ctx.torch_predictions(inputs, half=half), tolerance, where))
    return f"{'; '.join(reports)} ({len(images)} {ctx.check_source} image{'' if len(images) == 1 else 's'})"


def _check_raw(got: Tensor, expected: Tensor, tolerance: tuple[str, float, float], where: str) -> str:
    """Raw predictions vs PyTorch: the max (or mean, for int8) |Δ| of scores, and of boxes relative to their values.

    Box columns are pixels (up to the input size), so float32 rounding alone moves them by ~1e-5 of their value;
    the bound applies to |Δ| / max(1, |value|) there, and to |Δ| for the 0-1 scores.
    """
    got, expected = got.float().cpu(), expected.float().cpu()
    if got.shape != expected.shape:
        raise ExportError(f"output shape {tuple(got.shape)} != PyTorch's {tuple(expected.shape)} at {where}")
    if not torch.isfinite(got).all():
        raise ExportError(f"predictions contain NaN or infinity at {where}")
    statistic, box_bound, score_bound = tolerance
    reduce = _max_or_zero if statistic == "max" else _mean_or_zero
    difference = (got - expected).abs()
    box_error = reduce(difference[..., :4] / expected[..., :4].abs().clamp(min=1))
    score_error = reduce(difference[..., 4:])
    report = f"scores {statistic} |Δ| {score_error:.1e}, boxes {statistic} |Δ|/value {box_error:.1e} at {where}"
    if box_error > box_bound or score_error > score_bound:
        raise ExportError(
            f"predictions differ from PyTorch beyond the tolerance (scores {score_bound:g}, boxes {box_bound:g}): "
            f"{report}"
        )
    return report


def _mean_or_zero(values: Tensor) -> float:
    return float(values.mean()) if values.numel() else 0.0


def _max_or_zero(values: Tensor) -> float:
    return float(values.max()) if values.numel() else 0.0


def _check_nms(
    fmt: Format, output: Tensor, images: Tensor, ctx: ExportContext, lossy: bool, where: str, need_detections: bool
) -> str:
    """The graph's detections (``output`` (B, K, 6) from the backend) vs our Python NMS on the same raw predictions.

    ``need_detections``: at the export shape the images were picked for having detections, so finding none
    there is a failure, never a pass.
    """
    got = detections_from_output(output, end2end=True, conf_thres=0.0, max_det=output.shape[1])
    predictions, same_runtime = fmt.nms_reference_predictions(images, ctx)
    expected = reference_detections(predictions, ctx.config)
    atol = 1e-4 if same_runtime else (FP16_SCORE_TOLERANCE if lossy else FP32_TOLERANCE)
    # A score within rounding of the threshold may fall on either side, even between two graphs in one runtime.
    borderline = ctx.config.conf_thres + atol
    fraction = 1.0 if same_runtime else NMS_MIN_MATCH_OTHER_RUNTIME
    matched, problem = match_detections(got, expected, atol, borderline, min_match_fraction=fraction)
    if problem:
        raise ExportError(f"NMS output differs from Python NMS on the same predictions at {where}: {problem}")
    total = sum(len(e) for e in expected)
    if total == 0 and need_detections:
        raise ExportError(f"the --nms check has no detections to compare at {where}; pass --data with real images")
    return f"{matched}/{total} detections = Python NMS at {where}"


def _runtime_versions(fmt: Format) -> str:
    versions = []
    for module in fmt.required_packages:
        if importlib.util.find_spec(module) is not None:
            versions.append(f"{module} {getattr(importlib.import_module(module), '__version__', '?')}")
    return ", ".join(versions) or "no runtime"


# --------------------------------------------------------------------------------------------------------------------
# Reporting, options and the Python API


def results_table(results: Sequence[ExportResult]) -> str:
    """The results as an aligned text table - format, file, size, time, precision, NMS, check - followed by one
    line per option a format did not apply (``--nms`` not in graph, ``--int8`` skipped) with the reason."""
    rows = [("Format", "File", "Size", "Time", "Precision", "NMS", "Check")]
    notes = []
    for r in results:
        precision = r.precision + (" (int8 skipped)" if "int8" in r.skipped_options else "")
        if r.ok:
            size, seconds, status = f"{r.size_mb:.1f} MB", f"{r.seconds:.1f}s", f"ok: {r.check}"
            rows.append((r.title, str(r.path), size, seconds, precision, r.nms or "-", status))
        else:
            status = f"skipped: {r.skipped}" if r.skipped else f"FAILED: {r.error}"
            seconds = f"{r.seconds:.1f}s" if r.error else "-"
            rows.append((r.title, "-", "-", seconds, precision or "-", r.nms or "-", status))
        notes += [f"{r.title}: --{option} {reason}" for option, reason in r.skipped_options.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ]
    return "\n".join(lines + notes)


def validate_config(config: ExportConfig) -> None:
    """One-line ConfigError for options that cannot work, before any work is done."""
    if not config.include:
        raise ConfigError("--include: expected one or more formats")
    for name in config.include:
        format_for_include(name)
    check_imgsz(config.imgsz, 1, flag="--imgsz")  # sizes only; rounded to the model's stride once it is loaded
    if config.batch_size < 1:
        raise ConfigError(f"--batch-size: expected at least 1, got {config.batch_size}")
    if not MIN_OPSET <= config.opset <= MAX_OPSET:
        raise ConfigError(f"--opset: expected {MIN_OPSET}..{MAX_OPSET} (torch's ONNX exporter), got {config.opset}")
    if config.int8 and "onnx" in config.include and config.opset < MIN_INT8_OPSET:
        raise ConfigError(
            f"--opset: --int8 ONNX needs {MIN_INT8_OPSET} or newer (per-channel DequantizeLinear), got {config.opset}"
        )
    check_threshold("--conf-thres", config.conf_thres)
    check_threshold("--iou-thres", config.iou_thres)
    for flag, value in (("--topk-all", config.topk_all), ("--topk-per-class", config.topk_per_class)):
        if value < 1:
            raise ConfigError(f"{flag}: expected at least 1, got {value}")
    if config.workspace <= 0:
        raise ConfigError(f"--workspace: expected a positive size in GiB, got {config.workspace}")
    if config.optimize and config.device not in ("", "cpu"):
        raise ConfigError(f"--optimize: TorchScript mobile optimisation is CPU-only, got --device {config.device}")


def export(weights: str | Path | nn.Module, **options: Any) -> dict[str, Path]:
    """Export a model: ``detector.export("best.pt", include=("onnx",), imgsz=320, dynamic=True)``.

    ``weights`` is a .pt path or an in-memory DetectionModel; ``options`` are ExportConfig fields (the flags of
    export.py with underscores). Returns {format: path} of the written files (skipped formats absent);
    raises ExportError when an export fails its check.
    """
    model = weights if isinstance(weights, nn.Module) else None
    source = "" if model is not None else str(weights)
    config = build_config(ExportConfig, ("detector.export()", {**options, "weights": source}))
    results = Exporter(config).run(model)
    return {r.format: r.path for r in results if r.ok and r.path is not None}
