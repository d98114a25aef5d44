"""The metadata stored with every export, and the TensorRT engine header that carries it.

Keys (docs/architecture.md, "Export formats"): ``format`` ("detector-export-v1"), ``names`` (list, index = class
id), ``stride`` (the largest), ``strides`` (per output level), ``imgsz`` ([h, w]), ``batch``, ``dynamic``,
``half``, ``nms``, and with ``nms`` the NMS settings baked into the graph; OpenVINO (always) and int8 ONNX
files add ``int8``. Each format stores them its own way (``Format.read_metadata`` reads them back);
:func:`read_metadata` works for any of them.
"""

from __future__ import annotations

import ast
import datetime
import json
import struct
from pathlib import Path
from typing import Any

from torch import nn

from detector.config import ExportConfig

METADATA_FORMAT = "detector-export-v1"


def build_metadata(model: nn.Module, config: ExportConfig, imgsz: tuple[int, int]) -> dict[str, Any]:
    """The metadata stored with every export of ``model`` at ``imgsz`` (height, width)."""
    strides = [int(s) for s in model.stride.tolist()]
    return {
        "format": METADATA_FORMAT,
        "description": "detector YOLOv5-style detection model",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "names": list(model_names(model)),
        "stride": max(strides),
        "strides": strides,
        "imgsz": list(imgsz),
        "batch": config.batch_size,
        "dynamic": config.dynamic,
        "half": config.half,
        "nms": False,
    }


def nms_metadata(metadata: dict[str, Any], config: ExportConfig) -> dict[str, Any]:
    """``metadata`` for an export with NMS inside its graph: the NMS settings baked into it."""
    return {
        **metadata,
        "nms": True,
        "conf_thres": config.conf_thres,
        "iou_thres": config.iou_thres,
        "topk_all": config.topk_all,
        "topk_per_class": config.topk_per_class,
        "agnostic_nms": config.agnostic_nms,
    }


def model_names(model: nn.Module) -> list[str]:
    """Class names of a model as a list (index = class id); numbered names when it has none."""
    names = getattr(model, "names", None)
    num_classes = int(model.detect.nc)
    if isinstance(names, dict):
        names = [names[i] for i in sorted(names)]
    if not names or len(names) != num_classes:
        return [f"class{i}" for i in range(num_classes)]
    return [str(n) for n in names]


def decode_metadata_value(value: str) -> Any:
    """A metadata string as written by our exporter (JSON), or by YOLOv5 (Python literals such as a names dict).

    Python literals are parsed with ``ast.literal_eval``, which accepts only literals and never runs code.
    """
    try:
        return json.loads(value)
    except (json.JSONDecodeError, TypeError):
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of an exported model of any registered format: .torchscript, .onnx, *_openvino_model/ (or its
    .xml), .engine, ... Returns {} when the file carries none (e.g. an engine written without our header)."""
    from detector.export.base import FORMATS, format_for_path

    path = Path(path)
    weights_format = format_for_path(path)
    if weights_format is None:
        raise ValueError(f"{path}: not an exported model (known formats: {', '.join(FORMATS)})")
    if not path.exists():
        raise FileNotFoundError(f"{path}: exported model not found")
    return weights_format().read_metadata(path)


def write_engine_file(path: Path, metadata: dict[str, Any], engine: bytes) -> None:
    """TensorRT engine with our header: uint32 little-endian length, that many bytes of JSON, then the engine."""
    header = json.dumps(metadata).encode("utf-8")
    with open(path, "wb") as f:
        f.write(struct.pack("<I", len(header)))
        f.write(header)
        f.write(engine)


def split_engine_header(data: bytes) -> tuple[dict[str, Any], bytes]:
    """(metadata, engine bytes) of an .engine file: our files start with a uint32 LE length and that much JSON.

    Engines without the header (e.g. built by trtexec) come back whole, with empty metadata.
    """
    if len(data) > 4:
        length = int.from_bytes(data[:4], "little")
        if 0 < length <= len(data) - 4:
            try:
                metadata = json.loads(data[4 : 4 + length].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                metadata = None
            if isinstance(metadata, dict):
                return metadata, data[4 + length :]
    return {}, data
