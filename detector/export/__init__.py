"""Weight formats: each one file that writes the format (export.py) and loads it (detect.py, val.py, the checks).

=====================  ==============================================================================
module                 holds
=====================  ==============================================================================
``base.py``            :class:`Format`, the registry (:func:`register_format`, lookup by ``--include`` name
                       and by file suffix/folder), :class:`ExportContext` (one export run's shared state)
``torchscript.py``     :class:`TorchScriptFormat` and its backend
``onnx.py``            :class:`OnnxFormat` and its backend (ONNX Runtime; ``--int8`` with its static quantization)
``openvino.py``        :class:`OpenVINOFormat` and its backend (``--int8`` with NNCF; bf16 for half precision)
``int8.py``            what both ``--int8`` quantizers share: calibration images, trunk/decode split of the graph
``tensorrt.py``        :class:`TensorRTFormat` and its backend (CUDA)
``nms.py``             NMS inside the graph (``--nms``): :class:`NMSModel`, its Python reference
``metadata.py``        the metadata every export carries, :func:`read_metadata`, the TensorRT engine header
``exporter.py``        :class:`Exporter`, :class:`ExportResult`, the results table, the check after export
                       (through ``load_backend``), option validation and :func:`export` (``detector.export``)
=====================  ==============================================================================

A new format is one module with one :class:`Format` subclass decorated with :func:`register_format`, imported
below (README.md, "A new export format").
"""

from __future__ import annotations

import sys
import types
from typing import Any

from detector.export.base import (
    FORMATS,
    ExportContext,
    Format,
    RawOutput,
    format_for_include,
    format_for_path,
    register_format,
)
from detector.export.metadata import read_metadata
from detector.export.nms import NMSModel, reference_detections

# isort: off
# Formats register as they are imported; this order is the one --help, errors and tables list them in.
from detector.export.torchscript import TorchScriptFormat
from detector.export.onnx import OnnxFormat
from detector.export.openvino import OpenVINOFormat
from detector.export.tensorrt import TensorRTFormat

# isort: on
from detector.export.exporter import Exporter, ExportResult, export, results_table

__all__ = [
    "FORMATS",
    "ExportContext",
    "ExportResult",
    "Exporter",
    "Format",
    "NMSModel",
    "OnnxFormat",
    "OpenVINOFormat",
    "RawOutput",
    "TensorRTFormat",
    "TorchScriptFormat",
    "export",
    "format_for_include",
    "format_for_path",
    "read_metadata",
    "reference_detections",
    "register_format",
    "results_table",
]


class _CallablePackage(types.ModuleType):
    """``detector.export`` names both this package and the public function ``detector.export(weights, ...)``.

    Importing the package makes Python bind ``detector.export`` to the package (after this file has run, so
    nothing here can prevent it); calling the package therefore does what calling the function does.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
