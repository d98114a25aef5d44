"""A new export format: TorchScript with the weights folded into the graph as constants (torch.jit.freeze)."""

import json
from pathlib import Path

import torch

from detector.engine.backends import Backend
from detector.export import ExportContext, Format, register_format
from detector.export.torchscript import TorchScriptBackend, load_torchscript, trace


@register_format
class FrozenTorchScriptFormat(Format):
    name = "frozen"  # python export.py --include frozen
    title = "Frozen TorchScript"  # its row in the results table
    suffixes = (".frozen",)  # load_backend (detect.py, val.py, the check after export) picks this class for them

    def output_path(self, ctx: ExportContext) -> Path:
        return ctx.output_stem.with_suffix(".frozen")

    def write(self, ctx: ExportContext) -> Path:
        frozen = torch.jit.freeze(trace(ctx, half=self.is_half(ctx)))  # traced on real images, then frozen
        path = self.output_path(ctx)
        frozen.save(str(path), _extra_files={"config.txt": json.dumps(ctx.metadata)})
        return path

    def load(self, path: Path, device: torch.device, half: bool) -> Backend:
        return TorchScriptBackend(path, device, half)  # a frozen module is still a TorchScript file

    def read_metadata(self, path: Path) -> dict:
        return load_torchscript(path, torch.device("cpu"))[1]
