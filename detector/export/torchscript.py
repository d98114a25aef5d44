"""TorchScript: ``<stem>.torchscript``, traced, metadata as the JSON ``config.txt`` extra file.

``--optimize`` writes a mobile lite-interpreter file under the same name (CPU, needs a PyTorch build with
XNNPACK); the loader reads both kinds. YOLOv5's TorchScript files load too (their ``config.txt`` has ``shape``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.backends.xnnpack
from torch import Tensor

from detector.engine.backends import Backend, apply_metadata, exported_input_shape, first_line
from detector.errors import CheckpointError
from detector.export.base import ExportContext, Format, RawOutput, quiet_tracing, register_format


def trace(ctx: ExportContext, half: bool) -> torch.jit.ScriptModule:
    """``ctx.model`` (fp32, or its fp16 copy) traced on the export-shaped check input, one output."""
    example = ctx.example_input(ctx.export_shape, half=half)
    with quiet_tracing(), torch.inference_mode(False), torch.no_grad():
        return torch.jit.trace(RawOutput(ctx.model_in(half)).eval(), example, strict=False, check_trace=False)


def load_torchscript(path: Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """A ``torch.jit`` file in eval mode and its metadata (the JSON ``config.txt`` extra file, {} if absent)."""
    extra_files = {"config.txt": ""}
    try:
        with quiet_tracing():
            model = torch.jit.load(str(path), map_location=device, _extra_files=extra_files).eval()
    except RuntimeError:  # export --optimize writes a lite-interpreter file, which needs the mobile loader
        from torch.jit.mobile import _load_for_lite_interpreter

        try:
            model = _load_for_lite_interpreter(str(path), map_location=device, _extra_files=extra_files)
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: not a readable TorchScript file ({first_line(e)})") from e
    text = extra_files["config.txt"]
    return model, json.loads(text) if text else {}


class TorchScriptBackend(Backend):
    """A ``torch.jit`` file; metadata is the JSON ``config.txt`` extra file (ours, or YOLOv5's ``shape`` key)."""

    format_name = "TorchScript"

    def __init__(self, weights: Path, device: torch.device, half: bool) -> None:
        super().__init__(weights, device, half)
        self.model, metadata = load_torchscript(weights, device)
        apply_metadata(self, metadata, str(weights))
        parameters = getattr(self.model, "parameters", None)  # lite modules have none to inspect
        parameter = next(parameters(), None) if parameters is not None else None
        if parameter is not None:
            self.fp16 = parameter.dtype == torch.float16
        self.input_shape = exported_input_shape(metadata)

    def forward(self, images: Tensor) -> Tensor:
        output = self.model(images)
        return output[0] if isinstance(output, (tuple, list)) else output


@register_format
class TorchScriptFormat(Format):
    """TorchScript by tracing; names/stride in ``_extra_files["config.txt"]``. --optimize: mobile lite file."""

    name = "torchscript"
    title = "TorchScript"
    suffixes = (".torchscript",)
    required_packages = ("torch",)

    def unavailable(self, ctx: ExportContext | None) -> str | None:
        if ctx is not None and ctx.config.optimize and not torch.backends.xnnpack.enabled:  # type: ignore[attr-defined]
            return "--optimize needs a PyTorch build with XNNPACK (this one has none); export without --optimize"
        return None

    def output_path(self, ctx: ExportContext) -> Path:
        return ctx.output_stem.with_suffix(".torchscript")

    def write(self, ctx: ExportContext) -> Path:
        path = self.output_path(ctx)
        traced = trace(ctx, half=self.is_half(ctx))
        extra_files = {"config.txt": json.dumps(ctx.metadata)}
        if ctx.config.optimize:
            from torch.utils.mobile_optimizer import optimize_for_mobile

            optimize_for_mobile(traced)._save_for_lite_interpreter(str(path), _extra_files=extra_files)
        else:
            traced.save(str(path), _extra_files=extra_files)
        return path

    def load(self, path: Path, device: torch.device, half: bool) -> Backend:
        return TorchScriptBackend(path, device, half)

    def read_metadata(self, path: Path) -> dict[str, Any]:
        return load_torchscript(path, torch.device("cpu"))[1]
