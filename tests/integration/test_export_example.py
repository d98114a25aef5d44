"""README's "A new export format" example (docs/examples/export_format.py, shown there verbatim) works as written:
export.py writes and checks the new format, and load_backend - what detect.py and val.py use - runs the file."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
from tiny_models import strided_convs_yaml

from detector.config import ExportConfig
from detector.engine.backends import load_backend
from detector.export import FORMATS, Exporter, format_for_path, read_metadata
from detector.models.yolo import DetectionModel

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.jit announces TorchScript's deprecation
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "docs" / "examples" / "export_format.py"


@pytest.fixture
def example() -> Iterator[ModuleType]:
    """Import the example (registering its format) after checking README.md shows it verbatim; unregister after."""
    body = EXAMPLE.read_text().split('"""', 2)[2].strip()  # the README shows the code without the docstring
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### A new export format") :]
    assert body in section, f"README.md's 'A new export format' must show {EXAMPLE} verbatim"
    spec = importlib.util.spec_from_file_location("readme_example_export_format", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        yield module
    finally:
        FORMATS.pop("frozen", None)


def test_the_readme_format_is_written_checked_and_loaded(example: ModuleType, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = DetectionModel(strided_convs_yaml(nc=3)).eval()
    model.names = ["cat", "dog", "bird"]
    config = ExportConfig(include=("torchscript", "frozen"), imgsz=(64, 96), dynamic=True, project=str(tmp_path))
    plain, frozen = Exporter(config).run(model)
    assert frozen.ok and frozen.title == "Frozen TorchScript" and frozen.path == tmp_path / "exp" / "model.frozen"
    assert frozen.check.startswith("scores max |Δ|")  # checked against PyTorch through load_backend, like the rest
    assert format_for_path(frozen.path) is example.FrozenTorchScriptFormat
    assert read_metadata(frozen.path)["names"] == ["cat", "dog", "bird"]

    backend = load_backend(frozen.path, "cpu")
    assert backend.names == ["cat", "dog", "bird"] and backend.strides == (8, 16, 32) and backend.dynamic
    assert not list(backend.model.parameters())  # frozen: the weights are constants of the graph
    images = torch.rand(2, 3, 96, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(backend(images), model(images), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(backend(images), load_backend(plain.path, "cpu")(images), atol=1e-5, rtol=1e-5)
