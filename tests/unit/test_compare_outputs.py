"""scripts/compare_outputs.py: the error of one model's raw predictions against another's, on hand-made predictions
and on yolov5n.pt against its own ONNX export (ONNX Runtime computes what PyTorch does, to float rounding)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from detector.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compare():
    """scripts/compare_outputs.py as a module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(
        "compare_outputs_script", REPO_ROOT / "scripts" / "compare_outputs.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_errors_count_only_anchors_the_reference_is_confident_about(compare) -> None:
    """Anchor 1: reference score 0.5 x 0.8 = 0.4, candidate 0.5 x 0.6 = 0.3 (|Δ| 0.1), box off by 1 and 2 pixels
    in x and h (mean |Δ| 0.75). Anchor 2 scores 0.01 in the reference: its large differences do not count."""
    reference = torch.tensor([[[10.0, 10, 4, 4, 0.5, 0.2, 0.8], [50, 50, 8, 8, 0.1, 0.1, 0.05]]])
    candidate = torch.tensor([[[11.0, 10, 4, 6, 0.5, 0.2, 0.6], [90, 10, 1, 1, 0.9, 0.9, 0.9]]])
    errors = compare.summary(compare.prediction_errors(reference, candidate, min_score=0.05))
    assert errors["anchors"] == 1
    assert errors["score"] == pytest.approx(0.1) and errors["max_score"] == pytest.approx(0.1)
    assert errors["box"] == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="different shapes"):
        compare.prediction_errors(reference, candidate[:, :1], 0.05)


def test_yolov5n_against_its_onnx_export_differs_only_by_float_rounding(
    compare, yolov5n_weights: Path, coco128_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from detector.export import export

    onnx_file = export(str(yolov5n_weights), include=("onnx",), imgsz=320, project=str(tmp_path))["onnx"]
    data = str(coco128_dir / "coco128.yaml")
    common = ["--data", data, "--img", "320", "--limit", "4", "--reference", str(yolov5n_weights)]
    assert compare.main([*common, "--candidate", str(onnx_file)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("4 images at 320, ")
    score = float(line.split("score mean |Δ| ")[1].split(" ")[0])
    anchors = int(line.split(", ")[1].split(" ")[0])
    assert anchors > 50 and score < 1e-4  # the same network: float rounding only
