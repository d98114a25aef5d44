"""``detector benchmarks``: yolov5n exported to each format, each file validated and timed, one table.

Real data (8 coco128 images, the official yolov5n.pt). Every row comes from its own file (the val log of each
names the backend that ran it) and, the exports being dynamic, scores what the .pt scores on the same batches.
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest

import detector
from detector.cli import main as detector_main
from detector.cli.benchmarks import build_benchmark_config, main
from detector.config import BenchmarkConfig
from detector.data.dataset_config import load_dataset_config
from detector.errors import ConfigError, DetectorError
from detector.export.benchmarks import run_benchmarks
from detector.utils.torch_utils import cpu_has_native_bf16

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]


@pytest.fixture(scope="module")
def subset(tmp_path_factory: pytest.TempPathFactory, coco128_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("subset")
    images = sorted((coco128_dir / "images" / "train2017").glob("*.jpg"))[:8]
    (root / "val.txt").write_text("".join(f"{p}\n" for p in images))
    names = load_dataset_config(coco128_dir / "coco128.yaml").names
    (root / "data.yaml").write_text(f"path: {root}\ntrain: val.txt\nval: val.txt\nnames: {json.dumps(names)}\n")
    return root / "data.yaml"


def test_every_format_is_exported_validated_and_timed(
    tmp_path: Path, yolov5n_weights: Path, subset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = BenchmarkConfig(
        weights=str(yolov5n_weights),
        data=str(subset),
        imgsz=256,
        include=("torchscript", "onnx", "engine"),
        project=str(tmp_path),
    )
    with caplog.at_level(logging.INFO, logger="detector"):
        rows, save_dir = run_benchmarks(config)
    assert [r.format for r in rows] == ["PyTorch", "TorchScript", "ONNX", "TensorRT"]
    pt, torchscript, onnx, tensorrt = rows
    assert pt.status == torchscript.status == onnx.status == "ok" and pt.map50 > 0.3
    for row in (torchscript, onnx):  # another runtime on the same rectangular batches: the same mAP
        assert (row.map50, row.map50_95) == pytest.approx((pt.map50, pt.map50_95), abs=1e-3)
        assert row.precision == "fp32" and row.size_mb > 1 and row.export_s > 0 and row.inference_ms > 0
    assert tensorrt.status.startswith("TensorRT skipped (") and "CUDA" in tensorrt.status  # this CPU machine
    validated = [m.split("(")[0] for m in caplog.messages if m.startswith("Validating ")]
    assert validated == ["Validating PyTorchBackend", "Validating TorchScriptBackend", "Validating OnnxBackend"]
    assert (save_dir / "export-onnx" / "yolov5n.onnx").is_file()

    with open(save_dir / "benchmarks.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["format"] for t in table] == [r.format for r in rows]
    assert float(table[2]["map50_95"]) == pytest.approx(onnx.map50_95) and table[3]["status"] == tensorrt.status
    markdown = (save_dir / "benchmarks.md").read_text().splitlines()
    assert markdown[0].startswith("| format | precision |") and len(markdown) == 2 + len(rows)


def test_half_runs_the_files_as_val_py_half_does(
    tmp_path: Path, yolov5n_weights: Path, subset: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--half: the fp16 exports are validated with val.py's --half, so the OpenVINO IR computes in bf16 where the CPU
    has it (as detect.py --half and val.py --half run it), not in f32; the .pt reference row stays fp32."""
    config = BenchmarkConfig(
        weights=str(yolov5n_weights),
        data=str(subset),
        imgsz=128,
        include=("openvino",),
        half=True,
        project=str(tmp_path),
    )
    with caplog.at_level(logging.INFO, logger="detector"):
        (pt, openvino), _ = run_benchmarks(config)
    assert pt.precision == "fp32" and openvino.precision == "fp16 weights" and openvino.status == "ok"
    validated = [m for m in caplog.messages if m.startswith("Validating ")]
    assert validated[0].startswith("Validating PyTorchBackend") and "fp16=False" in validated[0]
    expected = "bf16" if cpu_has_native_bf16() else "f32"
    assert validated[1].startswith("Validating OpenVinoBackend") and f"inference_precision='{expected}'" in validated[1]


def test_flags_and_errors(
    tmp_path: Path, yolov5n_weights: Path, subset: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = build_benchmark_config(["--weights", "a.pt", "--include", "onnx", "openvino", "--img", "320"])
    assert (config.weights, config.include, config.imgsz, config.batch_size) == ("a.pt", ("onnx", "openvino"), 320, 1)
    with pytest.raises(ConfigError, match="--include"):
        run_benchmarks(BenchmarkConfig(weights=str(yolov5n_weights), include=("tflite",), project=str(tmp_path)))
    with pytest.raises(DetectorError, match=r"absent\.yaml"):
        run_benchmarks(
            BenchmarkConfig(weights=str(yolov5n_weights), data=str(tmp_path / "absent.yaml"), project=str(tmp_path))
        )
    assert not any(tmp_path.iterdir())  # nothing written before the options are checked
    with pytest.raises(ConfigError, match=r"TensorRT skipped .*\(--hard-fail\)"):
        run_benchmarks(
            BenchmarkConfig(weights=str(yolov5n_weights), data=str(subset), imgsz=128, include=("engine",),
                            hard_fail=True, project=str(tmp_path))
        )  # fmt: skip
    (pt,) = detector.benchmarks(yolov5n_weights, data=str(subset), imgsz=128, include=[], project=str(tmp_path))
    assert pt.format == "PyTorch" and pt.status == "ok" and pt.map50 > 0  # the Python API: the .pt row alone
    assert main(["--weights", str(tmp_path / "absent.pt")]) == 2
    assert detector_main(["benchmarks", "--weights", str(tmp_path / "absent.pt")]) == 2  # `detector benchmarks`
    assert "weights file not found" in capsys.readouterr().err
