"""Exporter pieces that need no model: NMS in the graph vs our Python NMS, metadata, option checks, the CLI.

The NMS graphs are exported around an identity "model", so the input is the (B, N, 5 + nc) predictions
themselves and every case is hand-built or seeded; onnxruntime runs the graph, detector.ops.nms is the reference.
"""

from __future__ import annotations

import dataclasses
import io
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from detector.cli.export import FLAGS, build_parser, main
from detector.config import ExportConfig, build_config
from detector.errors import ConfigError
from detector.export import FORMATS, TensorRTFormat, format_for_include, format_for_path, read_metadata
from detector.export.exporter import ExportResult, results_table, validate_config
from detector.export.metadata import split_engine_header, write_engine_file
from detector.export.nms import NMS_OUTPUT_NAMES, NMSModel, compare_detections, reference_detections
from detector.utils.checks import check_imgsz

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),  # torch.jit/torch.onnx announce TorchScript's deprecation
]


def _config(**changes: object) -> ExportConfig:
    return dataclasses.replace(ExportConfig(), **changes)


def _nms_onnx(tmp_path: Path, config: ExportConfig, example: torch.Tensor, flavor: str = "onnx") -> Path:
    """The NMS graph alone (identity model), batch and box count dynamic."""
    path = tmp_path / f"nms_{flavor}.onnx"
    model = NMSModel(nn.Identity(), config, flavor).eval()
    axes = {"images": {0: "batch", 1: "anchors"}, **{name: {0: "batch"} for name in NMS_OUTPUT_NAMES}}
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, opset_version=17, input_names=["images"],
        output_names=list(NMS_OUTPUT_NAMES), dynamic_axes=axes,
    )  # fmt: skip
    return path


def _run_onnx(path: Path, pred: torch.Tensor) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": pred.numpy()})


def _random_predictions(seed: int, batch: int, boxes: int, nc: int) -> torch.Tensor:
    """(B, N, 5 + nc): boxes in a few clusters (so NMS has overlaps to resolve), varied scores."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 4, 2, generator=generator) * 200 + 20
    cluster = torch.randint(0, 4, (batch, boxes), generator=generator)
    xy = centres.gather(1, cluster[..., None].expand(-1, -1, 2)) + torch.randn(batch, boxes, 2, generator=generator) * 6
    wh = 30 + torch.rand(batch, boxes, 2, generator=generator) * 40
    scores = torch.rand(batch, boxes, 1 + nc, generator=generator)
    return torch.cat((xy, wh, scores), -1)


def _box(xc: float, yc: float, w: float, h: float, obj: float, *cls: float) -> list[float]:
    return [xc, yc, w, h, obj, *cls]


@pytest.mark.parametrize("agnostic", [False, True])
def test_onnx_nms_graph_equals_python_nms_on_seeded_predictions(tmp_path: Path, agnostic: bool) -> None:
    config = _config(conf_thres=0.2, iou_thres=0.5, topk_all=30, topk_per_class=8, agnostic_nms=agnostic)
    path = _nms_onnx(tmp_path, config, _random_predictions(0, 2, 60, 3))
    for seed, batch, boxes in ((1, 2, 60), (2, 3, 150)):  # a different batch and box count than traced
        pred = _random_predictions(seed, batch, boxes, 3)
        outputs = _run_onnx(path, pred)
        expected = reference_detections(pred, config)
        matched, problem = compare_detections(outputs, expected, atol=1e-5)
        assert problem is None
        assert matched == sum(len(e) for e in expected) > 10
        assert [o.dtype for o in outputs] == [np.int32, np.float32, np.float32, np.int32]
        assert outputs[1].shape == (batch, 30, 4) and outputs[0].shape == (batch, 1)


def test_onnx_nms_hand_built_cases(tmp_path: Path) -> None:
    config = _config(conf_thres=0.25, iou_thres=0.45, topk_all=4, topk_per_class=2)
    # image 0: boxes A and B overlap (IoU 0.90) in class 0 -> B suppressed; C is class 1 at the same place -> kept.
    # D is below the threshold (0.9 * 0.2 = 0.18). E, F, G are three separate class-2 boxes: topk_per_class=2 keeps 2.
    image0 = [
        _box(50, 50, 40, 40, 0.9, 0.9, 0.1, 0.0),  # A: class 0, 0.81
        _box(52, 50, 40, 40, 0.9, 0.8, 0.0, 0.0),  # B: class 0, 0.72, suppressed by A
        _box(51, 50, 40, 40, 0.9, 0.0, 0.5, 0.0),  # C: class 1, 0.45
        _box(150, 150, 20, 20, 0.9, 0.2, 0.0, 0.0),  # D: 0.18 < 0.25
        _box(200, 20, 10, 10, 1.0, 0.0, 0.0, 0.7),  # E: class 2, 0.7
        _box(230, 20, 10, 10, 1.0, 0.0, 0.0, 0.6),  # F: class 2, 0.6
        _box(260, 20, 10, 10, 1.0, 0.0, 0.0, 0.5),  # G: class 2, 0.5, beyond topk_per_class
    ]
    image1 = [_box(10, 10, 4, 4, 0.1, 0.5, 0.5, 0.5)] * 7  # nothing above the threshold
    pred = torch.tensor([image0, image1], dtype=torch.float32)
    num_dets, boxes, scores, classes = _run_onnx(_nms_onnx(tmp_path, config, pred), pred)
    assert num_dets.tolist() == [[4], [0]]
    np.testing.assert_allclose(scores[0], [0.81, 0.7, 0.6, 0.45], atol=1e-6)  # topk_all=4, by descending score
    assert classes[0].tolist() == [0, 2, 2, 1]
    np.testing.assert_allclose(boxes[0, 0], [30, 30, 70, 70], atol=1e-5)  # A as xyxy
    assert not boxes[1].any() and not scores[1].any() and not classes[1].any()  # padding rows are zeros


def test_onnx_nms_agnostic_suppresses_across_classes(tmp_path: Path) -> None:
    config = _config(conf_thres=0.25, iou_thres=0.45, topk_all=5, agnostic_nms=True)
    pred = torch.tensor([[_box(50, 50, 40, 40, 0.9, 0.9, 0.1), _box(51, 50, 40, 40, 0.9, 0.1, 0.5)]])
    num_dets, _, scores, classes = _run_onnx(_nms_onnx(tmp_path, config, pred), pred)
    assert num_dets.tolist() == [[1]] and classes[0, 0] == 0
    assert scores[0, 0] == pytest.approx(0.81, abs=1e-6)


def test_tensorrt_flavor_has_efficient_nms_node_and_same_eager_outputs(tmp_path: Path) -> None:
    config = _config(conf_thres=0.2, iou_thres=0.5, topk_all=20, topk_per_class=20)
    pred = _random_predictions(3, 2, 50, 3)
    path = _nms_onnx(tmp_path, config, pred, flavor="tensorrt")
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "EfficientNMS_TRT"]
    assert len(nodes) == 1 and nodes[0].domain == "TRT" and len(nodes[0].output) == 4
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attributes["max_output_boxes"] == 20 and attributes["box_coding"] == 0
    assert attributes["iou_threshold"] == pytest.approx(0.5) and attributes["score_threshold"] == pytest.approx(0.2)
    assert attributes["class_agnostic"] == 0 and attributes["background_class"] == -1
    # The PyTorch stand-in used for tracing gives what the ONNX flavor (and Python NMS) gives.
    with torch.no_grad():
        eager = [t.numpy() for t in NMSModel(nn.Identity(), config, "tensorrt")(pred)]
    assert compare_detections(eager, reference_detections(pred, config), atol=1e-5)[1] is None


def test_reference_detections_applies_per_class_and_total_caps() -> None:
    rows = [_box(30 * i + 15, 15, 10, 10, 1.0, 0.9 - 0.1 * i, 0.0) for i in range(4)]  # 4 class-0 boxes
    rows.append(_box(15, 100, 10, 10, 1.0, 0.0, 0.3))  # one class-1 box
    pred = torch.tensor([rows])
    detections = reference_detections(pred, _config(conf_thres=0.1, topk_per_class=2, topk_all=10))[0]
    assert detections[:, 5].tolist() == [0, 0, 1]
    assert detections[:, 4].tolist() == pytest.approx([0.9, 0.8, 0.3])
    assert len(reference_detections(pred, _config(conf_thres=0.1, topk_per_class=9, topk_all=3))[0]) == 3


def test_compare_detections_reports_a_missing_or_wrong_detection() -> None:
    expected = [torch.tensor([[0.0, 0.0, 10.0, 10.0, 0.9, 1.0], [20.0, 20.0, 30.0, 30.0, 0.3, 0.0]])]
    outputs = [
        np.array([[2]], np.int32),
        np.array([[[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]]], np.float32),
        np.array([[0.9, 0.3, 0.0]], np.float32),
        np.array([[1, 0, 0]], np.int32),
    ]
    assert compare_detections(outputs, expected, atol=1e-4) == (2, None)
    wrong_class = [outputs[0], outputs[1], outputs[2], np.array([[1, 2, 0]], np.int32)]
    assert "missing" in compare_detections(wrong_class, expected, atol=1e-4)[1]
    one_fewer = [np.array([[1]], np.int32), outputs[1] * [[[1], [0], [0]]], outputs[2] * [[1, 0, 0]], outputs[3]]
    assert "missing" in compare_detections(one_fewer, expected, atol=1e-4)[1]
    # ... unless the lost one scores under the borderline (within rounding of the threshold)
    assert compare_detections(one_fewer, expected, atol=1e-4, borderline_score=0.31)[1] is None
    # a tolerance for near-tie swaps: 1 of 2 unmatched fails at 0.9, passes at 0.5
    assert compare_detections(one_fewer, expected, atol=1e-4, min_match_fraction=0.5)[1] is None
    dirty_padding = [outputs[0], outputs[1], np.array([[0.9, 0.3, 0.2]], np.float32), outputs[3]]
    assert "not zero" in compare_detections(dirty_padding, expected, atol=1e-4)[1]


def test_engine_header_round_trip_and_plain_engine(tmp_path: Path) -> None:
    metadata = {"names": ["a", "b"], "stride": 32, "nms": True}
    path = tmp_path / "model.engine"
    write_engine_file(path, metadata, b"\x00ENGINE-BYTES")
    assert split_engine_header(path.read_bytes()) == (metadata, b"\x00ENGINE-BYTES")
    assert read_metadata(path)["names"] == ["a", "b"]
    (tmp_path / "plain.engine").write_bytes(b"\xff\xff\xff\x7fnot a header")  # a headerless engine
    assert split_engine_header((tmp_path / "plain.engine").read_bytes()) == ({}, b"\xff\xff\xff\x7fnot a header")


def test_read_metadata_accepts_yolov5_style_onnx_names(tmp_path: Path) -> None:
    graph = onnx.helper.make_graph([], "empty", [], [])
    proto = onnx.helper.make_model(graph)
    for key, value in {"stride": "32", "names": "{0: 'person', 1: 'bicycle'}"}.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(tmp_path / "v5.onnx"))
    assert read_metadata(tmp_path / "v5.onnx") == {"stride": 32, "names": {0: "person", 1: "bicycle"}}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"include": ("onnxx",)}, "did you mean 'onnx'"),
        ({"include": ()}, "--include"),
        ({"opset": 9}, "--opset"),
        ({"conf_thres": 1.5}, "--conf-thres"),
        ({"topk_all": 0}, "--topk-all"),
        ({"batch_size": 0}, "--batch-size"),
        ({"workspace": 0.0}, "--workspace"),
        ({"imgsz": (0,)}, "--imgsz"),
        ({"optimize": True, "device": "0"}, "CPU-only"),
    ],
)
def test_bad_options_are_one_line_config_errors(changes: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        validate_config(_config(**changes))


def test_image_size_rounds_up_to_the_stride() -> None:
    # the exporter rounds --imgsz with the shared check (detector.utils.checks), as train/val/detect do
    assert check_imgsz((640,), 32) == (640, 640)
    assert check_imgsz((100,), 32) == (128, 128)
    assert check_imgsz((64, 90), 32) == (64, 96)
    with pytest.raises(ConfigError, match="one or two positive integers"):
        check_imgsz((1, 2, 3), 32)
    with pytest.raises(ConfigError, match="--imgsz expects one or two positive integers"):
        validate_config(_config(imgsz=(1, 2, 3)))


def test_cli_flags_map_to_export_config() -> None:
    from detector.cli.common import given_flags

    argv = ["--weights", "w.pt", "--img", "320", "256", "--include", "onnx,openvino", "engine", "--nms"]
    argv += ["--topk-all", "50", "--conf-thres", "0.4", "--dynamic", "--opset", "13", "--agnostic-nms"]
    flags = given_flags(build_parser(), argv)
    flags["include"] = [n for item in flags["include"] for n in item.split(",")]
    config = build_config(ExportConfig, ("command line", flags))
    assert config.imgsz == (320, 256) and config.include == ("onnx", "openvino", "engine")
    assert (config.nms, config.topk_all, config.conf_thres, config.dynamic) == (True, 50, 0.4, True)
    assert (config.opset, config.agnostic_nms, config.batch_size) == (13, True, 1)


def test_help_lists_every_flag_with_its_default() -> None:
    text = build_parser().format_help()
    for flags, _, _ in FLAGS:
        assert flags[0] in text
    assert text.count("(default:") == len(FLAGS)
    for name in FORMATS:
        assert name in text
    names = {field.name for field in dataclasses.fields(ExportConfig)}
    assert {flags[0].lstrip("-").replace("-", "_") for flags, _, _ in FLAGS} == names  # every option has a flag


def test_cli_error_is_one_line_and_exit_status_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with redirect_stdout(io.StringIO()):
        status = main(["--weights", str(tmp_path / "missing.pt"), "--include", "onnx", "--project", str(tmp_path)])
    assert status == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error:") and "missing.pt" in error and "\n" not in error


def test_tensorrt_is_skipped_with_its_reason_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: TensorRT is not skipped here")
    reason = TensorRTFormat().unavailable(None)  # type: ignore[arg-type]
    assert reason is not None and "CUDA" in reason


class _FakeTensorRT:
    """Just enough of the tensorrt module to drive TensorRTFormat.write without a GPU; records what it is asked."""

    __version__ = "10.3.0"

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            self.level = level

    class MemoryPoolType:
        WORKSPACE = "workspace"

    class BuilderFlag:
        FP16 = "fp16"

    def __init__(self, parse_ok: bool = True, build_ok: bool = True) -> None:
        self.parse_ok, self.build_ok = parse_ok, build_ok
        self.calls: dict[str, object] = {}
        fake = self

        class Config:
            def set_memory_pool_limit(self, pool: str, size: int) -> None:
                fake.calls["workspace"] = size

            def set_flag(self, flag: str) -> None:
                fake.calls.setdefault("flags", []).append(flag)

            def add_optimization_profile(self, profile: object) -> None:
                fake.calls["profile"] = profile.shapes  # type: ignore[attr-defined]

        class Profile:
            def set_shape(self, name: str, *shapes: tuple[int, ...]) -> None:
                self.shapes = (name, *shapes)

        class Builder:
            platform_has_fast_fp16 = True

            def __init__(self, logger: object) -> None:
                pass

            def create_network(self, flags: int) -> object:
                fake.calls["network_flags"] = flags
                return object()

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: object, config: object) -> bytes | None:
                return b"SERIALIZED-ENGINE" if fake.build_ok else None

        class OnnxParser:
            num_errors = 1

            def __init__(self, network: object, logger: object) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                fake.calls["onnx"] = path
                return fake.parse_ok

            def get_error(self, index: int) -> str:
                return "node 7: unsupported operator Foo"

        self.Builder, self.OnnxParser = Builder, OnnxParser

    def init_libnvinfer_plugins(self, logger: object, namespace: str) -> None:
        self.calls["plugins"] = True


def _tensorrt_context(tmp_path: Path, **changes: object) -> object:
    from types import SimpleNamespace

    config = _config(**changes)
    onnx_path = tmp_path / "model_raw.onnx"
    return SimpleNamespace(
        config=config,
        metadata={"names": ["a"], "stride": 32, "nms": False},
        imgsz=(640, 480),
        export_shape=(config.batch_size, 3, 640, 480),
        max_stride=32,
        device=torch.device("cpu"),
        output_stem=tmp_path / "model",
        onnx_file=lambda flavor, half: onnx_path.with_name(f"model_{flavor}.onnx"),
    )


def test_tensorrt_build_options_and_engine_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib
    import sys

    fake = _FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    ctx = _tensorrt_context(tmp_path, half=True, dynamic=True, batch_size=8, workspace=2.0, nms=True, topk_all=50)
    path = TensorRTFormat().write(ctx)  # type: ignore[arg-type]
    assert path == tmp_path / "model.engine"
    metadata, engine = split_engine_header(path.read_bytes())
    assert engine == b"SERIALIZED-ENGINE" and metadata["nms"] is True and metadata["topk_all"] == 50
    assert fake.calls["onnx"].endswith("model_tensorrt.onnx")  # the EfficientNMS_TRT flavor for --nms
    assert fake.calls["workspace"] == 2 * 2**30 and fake.calls["flags"] == ["fp16"] and fake.calls["plugins"]
    assert fake.calls["network_flags"] == 0  # explicit batch is implicit from TensorRT 10
    assert fake.calls["profile"] == ("images", (1, 3, 32, 32), (8, 3, 640, 480), (8, 3, 640, 480))


@pytest.mark.parametrize(
    ("parse_ok", "build_ok", "message"), [(False, True, "unsupported operator Foo"), (True, False, "build failed")]
)
def test_tensorrt_failures_say_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, parse_ok: bool, build_ok: bool, message: str
) -> None:
    import contextlib
    import sys

    from detector.errors import ExportError

    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTensorRT(parse_ok, build_ok))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    with pytest.raises(ExportError, match=message):
        TensorRTFormat().write(_tensorrt_context(tmp_path))  # type: ignore[arg-type]
    assert not (tmp_path / "model.engine").exists()  # never a silent empty result


ONE_CONV_YAML = {
    "nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": [[10, 13, 16, 30]],
    "backbone": [[-1, 1, "Conv", [8, 3, 2]]], "head": [[[0], 1, "Detect", ["nc", "anchors"]]],
}  # fmt: skip


def test_only_skipped_formats_is_an_error_not_a_silent_success(tmp_path: Path) -> None:
    from detector.errors import ExportError
    from detector.export import Exporter
    from detector.models.yolo import DetectionModel

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: TensorRT is not skipped here")
    config = _config(include=("engine",), imgsz=(64,), project=str(tmp_path))
    with pytest.raises(ExportError, match=r"nothing exported: TensorRT skipped \(.*CUDA"):
        Exporter(config).run(DetectionModel(ONE_CONV_YAML))
    assert not any(tmp_path.iterdir())  # known before writing: no empty run folder left behind


@pytest.mark.parametrize("int8", [False, True], ids=["check-images", "int8-calibration"])
def test_a_data_yaml_that_does_not_load_is_refused_before_the_run_folder(tmp_path: Path, int8: bool) -> None:
    from detector.errors import DataError
    from detector.export import Exporter
    from detector.models.yolo import DetectionModel

    project = tmp_path / "runs"
    missing = tmp_path / "missing.yaml"
    config = _config(include=("onnx",), imgsz=(64,), project=str(project), data=str(missing), int8=int8)
    with pytest.raises((ConfigError, DataError), match=r"missing\.yaml: file not found"):
        Exporter(config).run(DetectionModel(ONE_CONV_YAML))
    assert not project.exists()


# -- single-label NMS in the graph (detect.py's NMS) ------------------------------------------------------------------


def test_onnx_nms_is_single_label_like_detect(tmp_path: Path) -> None:
    """A box above the threshold in two classes is reported once, in its best class, as detect.py's NMS does
    (the ONNX op alone would keep it once per class: a bus that is also reported as a truck)."""
    from detector.ops.nms import non_max_suppression

    config = _config(conf_thres=0.25, iou_thres=0.45, topk_all=10)
    pred = torch.tensor([[_box(50, 50, 40, 40, 0.9, 0.8, 0.6), _box(150, 50, 20, 20, 0.9, 0.1, 0.5)]])
    num_dets, boxes, scores, classes = _run_onnx(_nms_onnx(tmp_path, config, pred), pred)
    assert num_dets.tolist() == [[2]]  # multi-label would add (box 0, class 1, 0.54)
    assert classes[0, :2].tolist() == [0, 1]
    np.testing.assert_allclose(scores[0, :2], [0.72, 0.45], atol=1e-6)
    expected = non_max_suppression(pred, 0.25, 0.45, multi_label=False)[0]
    np.testing.assert_allclose(np.c_[boxes[0, :2], scores[0, :2], classes[0, :2]], expected.numpy(), atol=1e-5)
    # seeded predictions where single- and multi-label NMS disagree: the graph gives the single-label result
    pred = _random_predictions(7, 2, 120, 4)
    multi = non_max_suppression(pred, 0.2, 0.5, multi_label=True, max_det=1000)
    single = non_max_suppression(pred, 0.2, 0.5, multi_label=False, max_det=1000)
    assert sum(map(len, multi)) > sum(map(len, single)) > 10
    config = _config(conf_thres=0.2, iou_thres=0.5, topk_all=200, topk_per_class=200)
    outputs = _run_onnx(_nms_onnx(tmp_path, config, pred), pred)
    assert compare_detections(outputs, single, atol=1e-5) == (sum(map(len, single)), None)


@pytest.mark.parametrize("flavor", ["onnx", "tensorrt"])
def test_static_nms_graph_holds_no_prediction_sized_constant(tmp_path: Path, flavor: str) -> None:
    """With fixed shapes torch.onnx folds constants; a (B, N, C) fill tensor would double yolov5n's file."""
    pred = _random_predictions(0, 1, 2000, 80)  # (1, 2000, 85): 160k scores, 640 kB as a float32 constant
    path = tmp_path / f"static_{flavor}.onnx"
    torch.onnx.export(
        NMSModel(nn.Identity(), _config(), flavor).eval(), (pred,), str(path), dynamo=False, opset_version=17,
        input_names=["images"], output_names=list(NMS_OUTPUT_NAMES),
    )  # fmt: skip
    assert path.stat().st_size < 64_000


def test_tensorrt_graph_feeds_efficient_nms_one_class_per_box(tmp_path: Path) -> None:
    """EfficientNMS_TRT takes every class score above the threshold; the graph masks all but each box's best
    class to -1 before it, so the TensorRT engine is single-label too. The subgraph up to the plugin runs here."""
    import onnxruntime

    config = _config(conf_thres=0.2, iou_thres=0.5, topk_all=20)
    pred = _random_predictions(5, 2, 50, 3)
    path = _nms_onnx(tmp_path, config, pred, flavor="tensorrt")
    proto = onnx.load(str(path))
    (plugin,) = [n for n in proto.graph.node if n.op_type == "EfficientNMS_TRT"]
    producer = {output: node for node in proto.graph.node for output in node.output}
    assert producer[plugin.input[1]].op_type == "Where"
    masked_path = tmp_path / "masked_scores.onnx"
    onnx.utils.extract_model(str(path), str(masked_path), ["images"], [plugin.input[1]])
    session = onnxruntime.InferenceSession(str(masked_path), providers=["CPUExecutionProvider"])
    (masked,) = session.run(None, {"images": pred.numpy()})
    scores = (pred[..., 5:] * pred[..., 4:5]).numpy()
    assert ((masked >= 0).sum(-1) == 1).all()  # one class per box, the others at -1 (below any threshold)
    np.testing.assert_allclose(masked.max(-1), scores.max(-1), atol=1e-6)
    assert (masked.argmax(-1) == scores.argmax(-1)).all()


# -- the registry and the results table -------------------------------------------------------------------------------


def test_formats_are_found_by_include_name_and_by_path(tmp_path: Path) -> None:
    assert list(FORMATS) == ["torchscript", "onnx", "openvino", "engine"]
    assert format_for_include("engine") is TensorRTFormat
    with pytest.raises(ConfigError, match="did you mean 'openvino'"):
        format_for_include("openvin")
    folder = tmp_path / "plain_folder"
    folder.mkdir()
    (folder / "m.xml").write_text("<net/>")
    expected = {
        "m.torchscript": "torchscript", "m.onnx": "onnx", "m.ONNX": "onnx", "m_openvino_model": "openvino",
        "m_openvino_model/m.xml": "openvino", str(folder): "openvino", "m.engine": "engine",
    }  # fmt: skip
    for name, format_name in expected.items():
        assert format_for_path(tmp_path / name) is FORMATS[format_name], name
    assert format_for_path(tmp_path / "m.pt") is None and format_for_path(tmp_path / "m.tflite") is None


def test_results_table_shows_precision_nms_and_skipped_options() -> None:
    results = [
        ExportResult(
            "torchscript", "TorchScript", Path("r/m.torchscript"), 1.0, 2.0, "scores max |Δ| 0", precision="fp32",
            nms="not in graph", skipped_options={"nms": "not in graph (no NMS here)"},
        ),
        ExportResult("onnx", "ONNX", Path("r/m.onnx"), 1.0, 2.0, "3/3 detections", precision="fp32", nms="in graph"),
        ExportResult(
            "openvino", "OpenVINO", Path("r/m_openvino_model"), 1.0, 2.0, "scores max |Δ| 0", precision="fp32",
            nms="not in graph", skipped_options={"int8": "skipped: NNCF is not installed (pip install nncf)"},
        ),
        ExportResult("engine", "TensorRT", None, skipped="no CUDA device"),
    ]  # fmt: skip
    lines = results_table(results).splitlines()
    assert lines[0].split() == ["Format", "File", "Size", "Time", "Precision", "NMS", "Check"]
    rows = {line.split()[0]: line for line in lines[1:5]}
    assert "not in graph" in rows["TorchScript"] and "in graph" in rows["ONNX"]
    assert "not in graph" not in rows["ONNX"]
    assert "fp32 (int8 skipped)" in rows["OpenVINO"] and "int8  " not in rows["OpenVINO"]
    assert "skipped: no CUDA device" in rows["TensorRT"]
    assert lines[5:] == [
        "TorchScript: --nms not in graph (no NMS here)",
        "OpenVINO: --int8 skipped: NNCF is not installed (pip install nncf)",
    ]


def test_detector_export_is_callable_whichever_is_imported_first(tmp_path: Path) -> None:
    """``detector.export`` is both the package and the API function; importing the package first (as
    load_backend does) must not turn ``detector.export(...)`` into a call of a module."""
    import subprocess
    import sys

    script = f"""
import detector.export.onnx  # the package first: Python binds detector.export to it
import detector
from detector import export
from detector.models.yolo import DetectionModel
yaml = {{"nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0, "anchors": [[10, 13, 16, 30]],
        "backbone": [[-1, 1, "Conv", [8, 3, 2]]], "head": [[[0], 1, "Detect", ["nc", "anchors"]]]}}
for call in (detector.export, export):
    paths = call(DetectionModel(yaml), include=("torchscript",), imgsz=(64,), project={str(tmp_path)!r})
    assert paths["torchscript"].is_file(), paths
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]


def test_split_graph_finds_the_head_and_the_decode_of_a_hand_built_graph() -> None:
    from detector.export.int8 import split_graph

    # image -> stem -> c1 -> {head_a, c2 -> head_b}; the decode: sigmoids of the heads, a grid, an add, a concat
    inputs_of = {
        "image": [],
        "stem": ["image"],
        "c1": ["stem"],
        "c2": ["c1"],
        "head_a": ["c1"],
        "head_b": ["c2"],
        "sig_a": ["head_a"],
        "sig_b": ["head_b"],
        "grid": [],
        "add": ["sig_a", "grid"],
        "out": ["add", "sig_b"],
    }
    split = split_graph(inputs_of, ["stem", "c1", "c2", "head_a", "head_b"])
    assert split.head == {"head_a", "head_b"}
    assert split.decode == {"sig_a", "sig_b", "grid", "add", "out"}


@pytest.mark.parametrize(
    ("data", "names", "warned"),
    [
        ("", ("person", "bicycle", "car"), True),  # a COCO model, no --data: calibrated on synthetic shapes
        ("", None, False),  # a model of the built-in dataset's classes: its own kind of images
        ("my.yaml", ("person", "bicycle", "car"), False),
    ],
)
def test_int8_without_data_warns_unless_the_model_is_of_the_builtin_classes(
    data: str, names: tuple[str, ...] | None, warned: bool, caplog
) -> None:
    import logging

    from detector.data.builtin import BUILTIN_CLASSES
    from detector.export.int8 import warn_if_calibrated_on_builtin

    with caplog.at_level(logging.WARNING, logger="detector"):
        warn_if_calibrated_on_builtin(list(names or BUILTIN_CLASSES), data)
    messages = [record.getMessage() for record in caplog.records]
    assert messages == (
        [
            "WARNING: --int8 without --data calibrates a model of 3 classes (person, bicycle, car, ...) on the "
            "built-in dataset's synthetic shapes; pass --data with images like the model's (e.g. --data "
            "coco128.yaml for a COCO model)"
        ]
        if warned
        else []
    )
