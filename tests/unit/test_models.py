"""Model package: registry, YAML parsing, parameter counts and GFLOPs against YOLOv5's, Detect head, fuse, TTA."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import yolov5_blocks_yaml as tiny_yaml
from torch import nn

from detector.config import MODEL_CONFIG_DIR
from detector.errors import ConfigError
from detector.models import blocks, registry
from detector.models.blocks import Conv
from detector.models.head import Detect
from detector.models.yolo import DetectionModel, make_divisible, parse_model, read_model_yaml

MODEL_YAMLS = sorted(p.name for p in MODEL_CONFIG_DIR.glob("*.yaml"))

# YOLOv5's own figures for 80 classes (REFERENCE.md): parameters unfused / fused, GFLOPs at 640 unfused.
YOLOV5_P5 = {
    "yolov5n.yaml": (1_872_157, 1_867_405, 4.6),
    "yolov5s.yaml": (7_235_389, 7_225_885, 16.6),
    "yolov5m.yaml": (21_190_557, 21_172_173, 49.2),
    "yolov5l.yaml": (46_563_709, 46_533_693, 109.6),
    "yolov5x.yaml": (86_749_405, 86_705_005, 206.3),
}
# P6 models, from YOLOv5's README: parameters (millions, 1 decimal) and GFLOPs at 640; and the exact fused counts
# YOLOv5 prints ("Fusing layers... summary: ... parameters") in public logs of s6, l6 and x6.
YOLOV5_P6 = {
    "yolov5n6.yaml": (3.2, 4.6),
    "yolov5s6.yaml": (12.6, 16.8),
    "yolov5m6.yaml": (35.7, 50.0),
    "yolov5l6.yaml": (76.8, 111.4),
    "yolov5x6.yaml": (140.7, 209.8),
}
YOLOV5_P6_FUSED = {"yolov5s6.yaml": 12_612_508, "yolov5l6.yaml": 76_726_332, "yolov5x6.yaml": 140_730_220}


@pytest.fixture(scope="module")
def yolov5n() -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel("yolov5n.yaml").eval()


def _conv_bn_count(modules: nn.Module) -> int:
    """Parameters removed by fusing: each Conv loses BN weight+bias (2C) and gains a conv bias (C)."""
    return sum(m.bn.num_features for m in modules.modules() if isinstance(m, Conv))


# -- registry ---------------------------------------------------------------------------------------------------------


def test_unknown_layer_suggests_close_names() -> None:
    with pytest.raises(KeyError, match="did you mean 'C3'"):
        registry.get_layer("C4")


def test_registering_a_name_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(type("Conv", (nn.Module,), {}))


def test_a_new_block_is_one_registered_class() -> None:
    @registry.register
    class DoubleConvForTest(nn.Module):
        scales_width = True

        def __init__(self, in_channels: int, out_channels: int) -> None:
            super().__init__()
            self.a = nn.Conv2d(in_channels, out_channels, 3, padding=1)
            self.b = nn.Conv2d(out_channels, out_channels, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x))

    try:
        config = tiny_yaml()
        config["backbone"][1] = [-1, 1, "DoubleConvForTest", [100]]
        layers, specs = parse_model(config, 3)
        # 100 * 0.125 = 12.5 -> rounded up to a multiple of 8 = 16; input channels come from layer 0 (64*0.125 = 8).
        assert specs[1].args == (8, 16)
        assert layers[1].a.in_channels == 8 and layers[1].b.out_channels == 16
    finally:
        del registry.LAYERS["DoubleConvForTest"]


# -- YAML parsing -----------------------------------------------------------------------------------------------------


def test_depth_and_width_rounding_follow_yolov5() -> None:
    config, _ = read_model_yaml("yolov5n.yaml")
    layers, specs = parse_model(config, 3)
    # depth 0.33: 3 -> 1, 6 -> round(1.98) = 2, 9 -> round(2.97) = 3; width 0.25: 64 -> 16, 1024 -> 256.
    assert [len(layers[i].m) for i in (2, 4, 6, 8)] == [1, 2, 3, 1]
    assert specs[0].args == (3, 16, 6, 2, 2)
    assert specs[9].args == (256, 256, 5)
    assert make_divisible(0.25 * 100) == 32 and make_divisible(8) == 8
    assert specs[12].out_channels == 128 + 128  # Concat of layer 11 (Upsample of layer 10's 128 ch) and layer 6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"head": [[-1, 1, "C4", [128]]]}, r"head row 0 \(layer 5\).*unknown layer 'C4'; did you mean 'C3'"),
        ({"head": [[9, 1, "Conv", [128]]]}, r"head row 0 .*'from' 9 does not name an earlier layer"),
        ({"head": [[-1, 1, "Conv", ["width"]]]}, r"unknown symbol 'width'"),
        ({"head": [[-1, 1, "Conv", [128, 3, 1, 1, 1, 1, 1, 1, 1]]]}, r"head row 0 .*cannot build Conv"),
        ({"head": [[-1, 1, "nn.Upsample", ["None", 2, "nearst"]]]}, r"Upsample mode must be one of"),
        ({"head": [[-1, 0, "Conv", [128]]]}, r"'number' must be a positive integer"),
        ({"head": [[-1, 1, "Conv"]]}, r"expected \[from, number, module, args\]"),
        ({"width_multiple": "big"}, r"'width_multiple' must be a positive number"),
        ({"depth_multipel": 1.0}, r"unknown key 'depth_multipel'; did you mean 'depth_multiple'"),
        ({"activation": "nn.Swish()"}, r"activation 'nn.Swish\(\)' is not one of"),
    ],
)
def test_bad_model_yaml_is_a_one_line_config_error(tmp_path: Path, change: dict, message: str) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(tiny_yaml(**change)))
    with pytest.raises(ConfigError, match=message) as error:
        DetectionModel(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_strides_are_measured_beyond_the_first_probe() -> None:
    """Seven stride-2 convs: a P7 level (stride 128) is a 1x1 map on the first 64 px probe, so the probe grows."""
    config = tiny_yaml(
        backbone=[[-1, 1, "Conv", [16, 3, 2]] for _ in range(7)],
        head=[[[5, 6], 1, "Detect", ["nc", "anchors"]]],
    )
    model = DetectionModel(config)
    assert model.stride.tolist() == [64.0, 128.0]


def test_last_layer_must_be_detect() -> None:
    config = tiny_yaml(head=[[-1, 1, "Conv", [32, 1, 1]]])
    with pytest.raises(ConfigError, match="last layer must be Detect"):
        DetectionModel(config)


def test_yaml_activation_key_is_used_by_every_conv() -> None:
    model = DetectionModel(tiny_yaml(activation="nn.LeakyReLU(0.1)"))
    acts = [m.act for m in model.modules() if isinstance(m, Conv)]
    assert acts and all(isinstance(a, nn.LeakyReLU) and a.negative_slope == 0.1 for a in acts)


@pytest.mark.parametrize(
    ("ours", "torchs"), [(blocks.SiLU, nn.SiLU), (blocks.Hardswish, nn.Hardswish), (blocks.Mish, nn.Mish)]
)
def test_in_place_activations_overwrite_only_without_autograd(ours, torchs) -> None:
    """In place under autograd, torch clones the input for the gradient; ours then computes a new tensor instead,
    with torch's values and gradients, and works in place only in inference."""
    x = torch.randn(2, 4, 5, 5) * 4
    with torch.no_grad():
        given = x.clone()
        out = ours(inplace=True)(given)
        assert out.data_ptr() == given.data_ptr()  # overwritten: no new map in inference
        torch.testing.assert_close(out, torchs()(x), rtol=0, atol=0)

    ours_in, torch_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out = ours(inplace=True)(ours_in * 1.0)  # a non-leaf input, as a Conv's BatchNorm output
    expected = torchs()(torch_in * 1.0)
    assert out.data_ptr() != ours_in.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward(), expected.sum().backward()
    torch.testing.assert_close(ours_in.grad, torch_in.grad, rtol=0, atol=0)
    leaf = x.clone().requires_grad_(True)
    with torch.profiler.profile() as profile:
        ours(inplace=True)(leaf * 1.0).sum().backward()
    assert "aten::clone" not in {e.key for e in profile.key_averages()}  # torchs(inplace=True) clones the input


def test_models_build_in_place_silu() -> None:
    model = DetectionModel(tiny_yaml())
    acts = [m.act for m in model.modules() if isinstance(m, Conv)]
    assert acts and all(type(a) is blocks.SiLU and a.inplace for a in acts)
    named = DetectionModel(tiny_yaml(activation="nn.SiLU()"))
    assert all(type(m.act) is blocks.SiLU and m.act.inplace for m in named.modules() if isinstance(m, Conv))


def test_nc_and_anchor_count_overrides() -> None:
    model = DetectionModel(tiny_yaml(), nc=7, anchors=4)
    assert model.nc == 7 and model.detect.na == 4 and model.yaml["nc"] == 7
    raw = model.train()(torch.zeros(1, 3, 64, 64))
    assert [tuple(r.shape) for r in raw] == [(1, 4, 16, 16, 12), (1, 4, 8, 8, 12)]  # strides 4 and 8


# -- sizes against YOLOv5 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODEL_YAMLS)
def test_parameter_counts_equal_yolov5(name: str) -> None:
    """Counted on the meta device (no memory, no init) so even yolov5x6 takes milliseconds."""
    config, _ = read_model_yaml(name)
    with torch.device("meta"):
        layers, _ = parse_model(config, 3)
    unfused = sum(p.numel() for p in layers.parameters())
    fused = unfused - _conv_bn_count(layers)
    if name in YOLOV5_P5:
        assert (unfused, fused) == YOLOV5_P5[name][:2]
    else:
        assert abs(fused / 1e6 - YOLOV5_P6[name][0]) <= 0.05 or abs(unfused / 1e6 - YOLOV5_P6[name][0]) <= 0.05
        assert fused == YOLOV5_P6_FUSED.get(name, fused)


@pytest.mark.parametrize("name", MODEL_YAMLS)
def test_every_model_yaml_builds_and_runs(name: str) -> None:
    model = DetectionModel(name)
    strides = [8.0, 16.0, 32.0] + ([64.0] if name in YOLOV5_P6 else [])
    assert model.stride.tolist() == strides
    image = torch.zeros(2, 3, 64, 64)  # batch 2: BatchNorm in training mode needs 2 values where P6 is 1x1
    with torch.no_grad():
        raw = model.train()(image)
        decoded = model.detect.decode(raw)
    assert [tuple(r.shape) for r in raw] == [(2, 3, 64 // s, 64 // s, 85) for s in map(int, strides)]
    assert tuple(decoded.shape) == (2, sum(3 * (64 // int(s)) ** 2 for s in strides), 85)
    expected_gflops = YOLOV5_P5[name][2] if name in YOLOV5_P5 else YOLOV5_P6[name][1]
    info = model.info()
    assert info.gflops == pytest.approx(expected_gflops, rel=0.02)
    assert info.parameters == sum(p.numel() for p in model.parameters())


def test_fuse_keeps_outputs_and_matches_yolov5_fused_count(yolov5n: DetectionModel) -> None:
    model = copy.deepcopy(yolov5n)
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():  # non-trivial statistics, as after training
        if isinstance(module, nn.BatchNorm2d):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator) * 0.5)
            module.running_var.copy_(torch.rand(shape, generator=generator) * 2 + 0.5)
            module.weight.data.copy_(torch.rand(shape, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(shape, generator=generator) * 0.2)
    image = torch.rand(2, 3, 64, 96, generator=generator)
    with torch.no_grad():
        unfused = model(image)
        fused_model = copy.deepcopy(model).fuse()
        fused = fused_model(image)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused_model.modules())
    assert sum(p.numel() for p in fused_model.parameters()) == 1_867_405
    # Box sizes reach ~400 px: float32 rounding of the fused sums is relative (1e-4 absolute at 400 px is 2.5e-7).
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-4)


def test_info_logs_a_summary(yolov5n: DetectionModel, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="detector"):
        info = yolov5n.info()
    assert info.parameters == 1_872_157 and info.imgsz == 640
    assert "1,872,157 parameters" in caplog.text and "GFLOPs" in caplog.text


# -- Detect head ------------------------------------------------------------------------------------------------------


def test_anchors_are_stored_in_grid_units_and_travel_in_the_state_dict(yolov5n: DetectionModel) -> None:
    expected_pixels = torch.tensor(read_model_yaml("yolov5n.yaml")[0]["anchors"], dtype=torch.float32).view(3, 3, 2)
    assert torch.allclose(yolov5n.detect.anchors * yolov5n.stride.view(-1, 1, 1), expected_pixels)
    state = yolov5n.state_dict()
    assert "model.24.anchors" in state and "model.24.stride" in state


def test_reversed_anchor_order_is_flipped() -> None:
    config = tiny_yaml()
    config["anchors"] = config["anchors"][::-1]  # large anchors first, but level 0 has the small stride
    model = DetectionModel(config)
    pixels = model.detect.anchors * model.stride.view(-1, 1, 1)
    assert torch.allclose(pixels, torch.tensor(tiny_yaml()["anchors"], dtype=torch.float32).view(2, 3, 2))


def _detect_with_strides(nc: int = 2) -> Detect:
    detect = Detect(nc, [[10, 20, 30, 40], [50, 60, 70, 80]], in_channels=[4, 8])
    detect.set_strides(torch.tensor([8.0, 16.0]))
    return detect


def test_bias_priors_follow_yolov5() -> None:
    detect = _detect_with_strides(nc=2)
    for conv in detect.m:
        nn.init.zeros_(conv.bias)
    detect.initialize_biases()
    for conv, stride in zip(detect.m, (8, 16), strict=True):
        bias = conv.bias.view(2, 7)
        assert torch.allclose(bias[:, 4], torch.full((2,), math.log(8 / (640 / stride) ** 2)))
        assert torch.allclose(bias[:, 5:], torch.full((2, 2), math.log(0.6 / (2 - 0.99))))
        nn.init.zeros_(conv.bias)
    detect.initialize_biases(class_frequencies=torch.tensor([3.0, 1.0]))
    assert torch.allclose(detect.m[0].bias.view(2, 7)[0, 5:], torch.log(torch.tensor([0.75, 0.25])))


def test_decode_follows_the_yolov5_formula() -> None:
    detect = _detect_with_strides(nc=2)
    raw = [torch.zeros(1, 2, 3, 4, 7), torch.zeros(1, 2, 2, 2, 7)]
    raw[0][0, 1, 2, 3] = torch.tensor([1.0, -1.0, 0.5, 2.0, 0.0, 3.0, -3.0])
    decoded = detect.decode(raw)
    assert decoded.shape == (1, 2 * 12 + 2 * 4, 7)
    row = decoded[0, 1 * 12 + 2 * 4 + 3]  # level 0, anchor 1, grid y 2, x 3
    sig = torch.sigmoid(torch.tensor([1.0, -1.0, 0.5, 2.0, 0.0, 3.0, -3.0]))
    expected_xy = (2 * sig[:2] - 0.5 + torch.tensor([3.0, 2.0])) * 8
    expected_wh = (2 * sig[2:4]) ** 2 * torch.tensor([30.0, 40.0])
    assert torch.allclose(row[:2], expected_xy) and torch.allclose(row[2:4], expected_wh)
    assert torch.allclose(row[4:], sig[4:])
    # all-zero raw: centre of the cell, anchor size, scores 0.5
    assert torch.allclose(decoded[0, 0], torch.tensor([4.0, 4.0, 10.0, 20.0, 0.5, 0.5, 0.5]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_in_place_and_both_traced_forms_agree(dtype: torch.dtype) -> None:
    """The eager decode (sigmoids written into one output, xy and wh finished in place), the traced "slices" form
    (ONNX Runtime's graph) and the "affine" form (OpenVINO's) are the same arithmetic: equal to float rounding,
    for a batch of 2 and levels of different shapes; and with gradients the decode is differentiable."""
    detect = _detect_with_strides(nc=3)
    raw = [torch.randn(2, 2, 3, 5, 8).to(dtype) * 3, torch.randn(2, 2, 2, 2, 8).to(dtype) * 3]
    with torch.no_grad():
        eager = detect.decode(raw)
        detect.export = True
        traced = {}
        for form in ("slices", "affine"):
            detect.traced_decode = form
            traced[form] = detect.decode(raw)
    assert eager.dtype == torch.float32 and eager.shape == (2, 2 * 15 + 2 * 4, 8)
    for form, decoded in traced.items():
        torch.testing.assert_close(decoded, eager, rtol=1e-6, atol=1e-4, msg=form)
    detect.export = False
    leaf = [r.float().requires_grad_() for r in raw]
    detect.decode(leaf)[..., 2].sum().backward()  # widths: only their own logits move them
    assert leaf[0].grad[..., 2].abs().min() > 0 and leaf[0].grad[..., [0, 1, 3, 4]].abs().max() == 0


def test_raw_maps_are_the_same_from_nchw_and_channels_last_features() -> None:
    # The head's two layout branches against the plain definition: the 1x1 conv output's channel a * no + k is
    # raw[a, y, x, k] (YOLOv5's view + permute), whichever memory format the features come in.
    detect = _detect_with_strides(nc=2)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        features = [torch.randn(2, 4, 3, 5), torch.randn(2, 8, 2, 2)]
        features = [f.contiguous(memory_format=memory_format) for f in features]
        maps = [conv(f) for conv, f in zip(detect.m, features, strict=True)]
        assert all(m.is_contiguous(memory_format=memory_format) for m in maps)
        expected = [m.reshape(2, 2, 7, *m.shape[2:]).permute(0, 1, 3, 4, 2) for m in maps]
        raw = detect(features)
        assert all(r.is_contiguous() for r in raw)
        for a, b in zip(expected, raw, strict=True):
            assert torch.equal(a, b)


def test_bf16_raw_maps_decode_in_fp32() -> None:
    """bf16 autocast inference (--half on CPU): the raw maps arrive in bf16, the boxes are decoded in fp32, so a box
    at x ~ 600 px keeps sub-pixel precision (bf16 alone rounds there to steps of 4 px)."""
    detect = _detect_with_strides(nc=2)
    raw = [torch.zeros(1, 2, 80, 80, 7), torch.zeros(1, 2, 2, 2, 7)]
    raw[0][0, 0, 2, 75, :2] = torch.tensor([0.3, -0.2])
    as_bf16 = [r.to(torch.bfloat16) for r in raw]
    decoded = detect.decode(as_bf16)
    assert decoded.dtype == torch.float32
    expected = detect.decode([r.float() for r in as_bf16])  # the same bf16 inputs, decoded in fp32 by hand
    torch.testing.assert_close(decoded, expected)
    x = decoded[0, 2 * 80 + 75, 0]  # level 0, anchor 0, y 2, x 75: (2 * sigmoid(0.3) - 0.5 + 75) * 8
    assert abs(float(x) - (2 * torch.sigmoid(torch.tensor(0.3)).item() + 74.5) * 8) < 0.05


def test_grid_cache_follows_the_input_shape() -> None:
    detect = _detect_with_strides()
    for height, width in ((3, 4), (5, 2), (3, 4)):
        raw = [torch.randn(1, 2, height, width, 7), torch.randn(1, 2, 2, 3, 7)]
        cached = detect.decode(raw)
        detect.export = True
        fresh = detect.decode(raw)
        detect.export = False
        assert torch.equal(cached, fresh)


def test_traced_model_follows_new_input_shapes(yolov5n: DetectionModel) -> None:
    """Tracing with Detect.export records the grid computation in the graph, so other input sizes still decode."""
    model = copy.deepcopy(yolov5n).fuse()
    model.detect.export = True
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.rand(1, 3, 64, 64), check_trace=False)
        other = torch.rand(2, 3, 96, 64)
        assert torch.allclose(traced(other), model(other), atol=1e-4)


def test_onnx_export_with_dynamic_axes_matches_pytorch(yolov5n: DetectionModel, tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    model = copy.deepcopy(yolov5n).fuse()
    model.detect.export = True
    path = tmp_path / "model.onnx"
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, "output": {0: "batch", 1: "anchors"}}
    with torch.no_grad():
        torch.onnx.export(
            model, (torch.zeros(1, 3, 64, 64),), str(path), input_names=["images"], output_names=["output"],
            dynamic_axes=axes, opset_version=17, dynamo=False,
        )  # fmt: skip
        other = torch.rand(1, 3, 96, 128)
        expected = model(other).numpy()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (result,) = session.run(None, {"images": other.numpy()})
    assert result.shape == expected.shape == (1, 3 * (12 * 16 + 6 * 8 + 3 * 4), 85)
    assert abs(result - expected).max() < 1e-3


# -- test-time augmentation -------------------------------------------------------------------------------------------


def test_tta_merges_three_scales_as_yolov5(yolov5n: DetectionModel) -> None:
    image = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        plain = yolov5n(image)
        augmented = yolov5n(image, augment=True)
    # Rows per level at 64x96: 3*8*12=288, 3*4*6=72, 3*2*3=18. Scale 0.83 gives 53x79, padded to 64x96 (all 378
    # rows); 0.67 gives 42x64, padded to multiples of 32 of 42.88x64.32 = 64x96. Scale 1 drops its P5 rows and
    # scale 0.67 its P3 rows.
    assert augmented.shape == (1, (288 + 72) + 378 + (72 + 18), 85)
    assert torch.equal(augmented[:, :360], plain[:, :360])  # scale 1 is the plain prediction
    assert yolov5n.training is False


def test_tta_is_ignored_in_training_mode() -> None:
    model = DetectionModel(tiny_yaml()).train()
    raw = model(torch.zeros(1, 3, 64, 64), augment=True)
    assert isinstance(raw, list) and len(raw) == 2
