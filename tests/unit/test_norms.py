"""detector.models.norms: Ghost BatchNorm, Batch Renormalization and Cross-Iteration BatchNorm against hand-computed
cases and torch's BatchNorm2d; their models fold, export and train like BatchNorm models."""

from __future__ import annotations

import copy

import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from tiny_models import strided_convs_yaml, yolov5_blocks_yaml
from torch import nn

from detector.config import NormConfig, TrainConfig, build_config
from detector.errors import ConfigError
from detector.export import export
from detector.models.loss import DetectionLoss
from detector.models.norms import (
    NORMS,
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    GhostBatchNorm2d,
    check_norm_options,
    norm_overrides,
)
from detector.models.yolo import DetectionModel

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

CHANNELS = 3
# Options under which each norm's training step differs from BatchNorm's from the first batch on.
ACTIVE_OPTIONS = {
    "ghost": {"virtual_batch_size": 2},
    "brn": {"renorm_warmup": 0},
    "cbn": {"window": 3, "burnin": 0},
}


def _batches(count: int, shape: tuple[int, ...] = (4, CHANNELS, 5, 6), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * 2 + 1 for _ in range(count)]


def _randomised(norm: nn.BatchNorm2d, seed: int = 0) -> nn.BatchNorm2d:
    """``norm`` with random affine weights and running statistics (a trained-looking state)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
        norm.bias.copy_(torch.randn(norm.num_features, generator=generator))
        norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator))
        norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
    return norm


def _norm(name: str, **options) -> nn.BatchNorm2d:
    return NORMS[name](CHANNELS, eps=1e-3, momentum=0.1, **{**ACTIVE_OPTIONS[name], **options})


# -- every norm: BatchNorm's running statistics, BatchNorm in eval mode ----------------------------------------------


@pytest.mark.parametrize("name", ["ghost", "brn", "cbn"])
def test_running_statistics_and_eval_mode_are_batchnorms(name: str) -> None:
    """Trained on the same batches, the running statistics equal BatchNorm2d's; then eval outputs are BatchNorm's."""
    reference = _randomised(nn.BatchNorm2d(CHANNELS, eps=1e-3, momentum=0.1))
    norm = _norm(name)
    norm.load_state_dict(reference.state_dict())
    for batch in _batches(3):
        reference(batch)
        norm(batch)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(norm.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    reference.eval(), norm.eval()
    batch = _batches(1, seed=1)[0]
    torch.testing.assert_close(norm(batch), reference(batch))


# -- Ghost BatchNorm --------------------------------------------------------------------------------------------------


def test_ghost_batchnorm_normalises_each_virtual_batch_alone() -> None:
    """A batch of 5 with virtual batches of 2: BatchNorm applied to images 0-1, 2-3 and 4 alone; gradients too."""
    ghost = _randomised(_norm("ghost", virtual_batch_size=2))
    batch = _batches(1, shape=(5, CHANNELS, 4, 4))[0].requires_grad_()
    reference = batch.detach().clone().requires_grad_()
    parts = [
        F.batch_norm(part, None, None, ghost.weight, ghost.bias, training=True, eps=ghost.eps)
        for part in (reference[:2], reference[2:4], reference[4:])
    ]
    output = ghost(batch)
    torch.testing.assert_close(output, torch.cat(parts))
    upstream = torch.randn_like(output)
    (output * upstream).sum().backward()
    (torch.cat(parts) * upstream).sum().backward()
    torch.testing.assert_close(batch.grad, reference.grad)


def test_ghost_batchnorm_with_a_batch_within_one_virtual_batch_is_batchnorm() -> None:
    ghost, reference = _norm("ghost", virtual_batch_size=8), nn.BatchNorm2d(CHANNELS, eps=1e-3, momentum=0.1)
    batch = _batches(1)[0]
    torch.testing.assert_close(ghost(batch), reference(batch))


# -- Batch Renormalization --------------------------------------------------------------------------------------------


def test_batch_renorm_with_rmax_1_dmax_0_is_batchnorm() -> None:
    renorm = _randomised(_norm("brn", rmax=1.0, dmax=0.0))
    reference = copy.deepcopy(renorm)
    reference.__class__ = nn.BatchNorm2d  # the same parameters and buffers under BatchNorm2d's forward
    for batch in _batches(2):
        torch.testing.assert_close(renorm(batch), reference(batch), rtol=1e-5, atol=1e-5)


def test_batch_renorm_matches_the_hand_formula_with_known_running_statistics() -> None:
    """Running statistics chosen so r is clipped low (channel 0), inside (1), and d clipped high (2); the gradient is
    the formula's with r and d held constant."""
    renorm = _randomised(_norm("brn", rmax=3.0, dmax=5.0))
    with torch.no_grad():
        renorm.running_mean.copy_(torch.tensor([1.0, 1.5, -40.0]))
        renorm.running_var.copy_(torch.tensor([100.0, 3.0, 1.0]))
    running_mean, running_var = renorm.running_mean.clone(), renorm.running_var.clone()
    batch = _batches(1)[0].requires_grad_()
    values = batch.detach().clone().requires_grad_()

    mean = values.mean((0, 2, 3))
    std = (values.var((0, 2, 3), unbiased=False) + renorm.eps).sqrt()
    sigma = (running_var + renorm.eps).sqrt()
    r = (std / sigma).clamp(1 / 3, 3).detach()
    d = ((mean - running_mean) / sigma).clamp(-5, 5).detach()
    assert r[0] == pytest.approx(1 / 3) and 1 / 3 < r[1] < 3 and d[2] == 5  # the three cases above
    expected = (values - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1) * r.view(1, -1, 1, 1) + d.view(1, -1, 1, 1)
    expected = expected * renorm.weight.view(1, -1, 1, 1) + renorm.bias.view(1, -1, 1, 1)

    output = renorm(batch)
    torch.testing.assert_close(output, expected)
    upstream = torch.randn_like(output)
    (output * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(batch.grad, values.grad, rtol=1e-4, atol=1e-5)
    count = batch[:, 0].numel()
    torch.testing.assert_close(renorm.running_mean, 0.9 * running_mean + 0.1 * mean.detach())
    unbiased = values.detach().var((0, 2, 3), unbiased=False) * count / (count - 1)
    torch.testing.assert_close(renorm.running_var, 0.9 * running_var + 0.1 * unbiased)


def test_batch_renorm_bounds_open_over_the_warmup_and_resume_from_the_state_dict() -> None:
    renorm = _norm("brn", rmax=3.0, dmax=5.0, renorm_warmup=100)
    assert [float(b) for b in renorm.bounds()] == [1.0, 0.0]  # plain BatchNorm at the start
    renorm.num_batches_tracked.fill_(50)
    resumed = _norm("brn", rmax=3.0, dmax=5.0, renorm_warmup=100)
    resumed.load_state_dict(renorm.state_dict())
    assert [float(b) for b in resumed.bounds()] == [2.0, 2.5]
    resumed.num_batches_tracked.fill_(1000)
    assert [float(b) for b in resumed.bounds()] == [3.0, 5.0]


# -- Cross-Iteration BatchNorm ----------------------------------------------------------------------------------------


def test_cross_iteration_batchnorm_with_window_1_or_in_burnin_is_batchnorm() -> None:
    conv = nn.Conv2d(2, CHANNELS, 3, padding=1, bias=False)
    inputs = _batches(3, shape=(2, 2, 5, 5))
    for options in ({"window": 1}, {"window": 4, "burnin": 10}):
        cross = _randomised(_norm("cbn", **options))
        reference = copy.deepcopy(cross)
        reference.__class__ = nn.BatchNorm2d
        for x in inputs:
            torch.testing.assert_close(cross(conv(x), conv.weight), reference(conv(x)), rtol=1e-5, atol=1e-5)


def _statistics(weight: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and mean of squares of conv2d(x, weight)."""
    y = F.conv2d(x, weight, padding=1)
    return y.mean((0, 2, 3)), y.square().mean((0, 2, 3))


def test_cross_iteration_batchnorm_compensates_the_previous_iteration_to_first_order() -> None:
    """Window 2: the previous batch's statistics moved to the current weights by their Jacobian-vector product in
    the weight change (torch.func.jvp), averaged with this batch's; then BatchNorm's formula."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, CHANNELS, 3, padding=1, bias=False)
    cross = _randomised(_norm("cbn", window=2))
    previous_x, current_x = _batches(2, shape=(2, 2, 5, 5))
    previous_weight = conv.weight.detach().clone()
    cross(conv(previous_x), conv.weight)
    with torch.no_grad():
        conv.weight.add_(0.05 * torch.randn_like(conv.weight))
    current_weight = conv.weight.detach().clone()

    output = cross(conv(current_x), conv.weight)

    (past_mean, past_meansq), (step_mean, step_meansq) = torch.func.jvp(
        lambda w: _statistics(w, previous_x), (previous_weight,), (current_weight - previous_weight,)
    )
    mean_now, meansq_now = _statistics(current_weight, current_x)
    mean = (mean_now + past_mean + step_mean) / 2
    var = (meansq_now + past_meansq + step_meansq) / 2 - mean.square()
    y = F.conv2d(current_x, current_weight, padding=1)
    expected = F.batch_norm(y, mean, var, cross.weight, cross.bias, training=False, eps=cross.eps)
    torch.testing.assert_close(output, expected, rtol=1e-4, atol=1e-5)
    # The mean is linear in the weights: compensated, the old batch's mean is exactly its mean under the new weights.
    torch.testing.assert_close(past_mean + step_mean, _statistics(current_weight, previous_x)[0])


def test_cross_iteration_batchnorm_gradients_flow_through_this_batch_only() -> None:
    """The compensated earlier statistics are constants: the input gradient equals that of BatchNorm's formula with
    (this batch's statistics + the earlier ones held fixed) averaged."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, CHANNELS, 3, padding=1, bias=False)
    cross = _norm("cbn", window=2)
    first, second = _batches(2, shape=(2, 2, 5, 5))
    cross(conv(first), conv.weight)
    y = conv(second).detach().requires_grad_()
    reference = y.detach().clone().requires_grad_()
    past_mean, past_meansq = (s.detach() for s in _statistics(conv.weight, first))
    output = cross(conv(second) - conv(second).detach() + y, conv.weight)  # y with conv.weight in its graph
    mean = (reference.mean((0, 2, 3)) + past_mean) / 2
    var = (reference.square().mean((0, 2, 3)) + past_meansq) / 2 - mean.square()
    scale = (cross.weight / (var + cross.eps).sqrt()).view(1, -1, 1, 1)
    expected = (reference - mean.view(1, -1, 1, 1)) * scale + cross.bias.view(1, -1, 1, 1)
    upstream = torch.randn_like(expected)
    (output * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(y.grad, reference.grad, rtol=1e-4, atol=1e-5)


# -- models: fuse, export, a training step, the options ---------------------------------------------------------------


def _model(norm: str, acnet: bool = False, yaml: dict | None = None) -> DetectionModel:
    torch.manual_seed(0)
    return DetectionModel(yaml or yolov5_blocks_yaml(), norm=norm, norm_args=ACTIVE_OPTIONS.get(norm), acnet=acnet)


def _train_steps(model: DetectionModel, steps: int = 2, size: int = 32) -> None:
    """A few SGD steps on random images and boxes (non-trivial running statistics and weights)."""
    loss_fn = DetectionLoss(model, TrainConfig().hyp)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 0, 0.3, 0.6, 0.2, 0.2], [2, 1, 0.6, 0.4, 0.5, 0.5]])
    model.train()
    for step in range(steps):
        images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(step))
        loss = sum(loss_fn(model(images), targets).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


@pytest.mark.parametrize("name", ["ghost", "brn", "cbn"])
def test_a_model_with_each_norm_trains_and_its_fused_model_equals_it(name: str) -> None:
    model = _model(name)
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    assert kinds == {NORMS[name]}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train_steps(model)
    after = model.state_dict()
    assert all(torch.isfinite(v.float()).all() for v in after.values())
    assert not torch.equal(before["model.0.conv.weight"], after["model.0.conv.weight"])
    assert int(after["model.0.bn.num_batches_tracked"]) == 2
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        unfused = model.forward_raw(images)
        fused = model.fuse().forward_raw(images)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for a, b in zip(unfused, fused, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("name", "acnet"), [("ghost", False), ("brn", False), ("cbn", True)])
def test_onnx_export_of_each_norm_equals_the_unfused_pytorch_model(name: str, acnet: bool, tmp_path) -> None:
    model = _model(name, acnet, yaml=strided_convs_yaml(nc=2))
    _train_steps(model, steps=1)
    onnx_path = export(model, include=("onnx",), imgsz=(64, 64), project=str(tmp_path))["onnx"]
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(images)  # the unfused eval model: BatchNorm with running statistics
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    torch.testing.assert_close(got[..., 4:], expected[..., 4:], rtol=0, atol=1e-4)  # scores
    torch.testing.assert_close(got[..., :4], expected[..., :4], rtol=1e-4, atol=1e-3)  # boxes in pixels


def test_norm_options_reach_the_model_yaml_and_bad_ones_are_config_errors() -> None:
    config = build_config(TrainConfig, ("flags", {"norm": "ghost", "norm_options.virtual_batch_size": 4}))
    overrides = norm_overrides(config.norm, config.norm_options)
    assert overrides == {"norm": "ghost", "norm_args": {"virtual_batch_size": 4}}
    model = DetectionModel(strided_convs_yaml(nc=2), **overrides)
    assert model.yaml["norm"] == "ghost" and model.yaml["norm_args"] == {"virtual_batch_size": 4}
    assert model.model[0].bn.virtual_batch_size == 4
    assert norm_overrides("bn", NormConfig()) == {}  # bn: the model YAML decides
    assert DetectionModel(model.yaml).model[0].bn.virtual_batch_size == 4  # a checkpoint's YAML rebuilds it
    with pytest.raises(ConfigError, match="--norm: unknown norm 'gost'; did you mean 'ghost'"):
        norm_overrides("gost", NormConfig())
    with pytest.raises(ConfigError, match="norm_args: 'brn' has no option 'window'"):
        DetectionModel({**strided_convs_yaml(nc=2), "norm": "brn", "norm_args": {"window": 2}})
    with pytest.raises(ConfigError, match="virtual_batch_size must be a positive integer"):
        DetectionModel({**strided_convs_yaml(nc=2), "norm": "ghost", "norm_args": {"virtual_batch_size": 0}})
    with pytest.raises(ConfigError, match="--sync-bn would replace the model's 'brn' norm"):
        check_norm_options(_model("brn", yaml=strided_convs_yaml(nc=2)), sync_bn=True, grad_checkpoint=False)
    with pytest.raises(ConfigError, match="--grad-checkpoint recomputes layers in backward, which the 'cbn' norm"):
        check_norm_options(_model("cbn", yaml=strided_convs_yaml(nc=2)), sync_bn=False, grad_checkpoint=True)
    with pytest.raises(ConfigError, match="--compile cannot compile the 'cbn' norm"):
        check_norm_options(_model("cbn", yaml=strided_convs_yaml(nc=2)), False, False, torch_compile=True)
    check_norm_options(
        _model("bn", yaml=strided_convs_yaml(nc=2)), sync_bn=True, grad_checkpoint=True, torch_compile=True
    )
    check_norm_options(_model("ghost", yaml=strided_convs_yaml(nc=2)), sync_bn=False, grad_checkpoint=True)


def test_norm_flags_map_to_the_train_config() -> None:
    from detector.cli.common import given_flags
    from detector.cli.train import build_parser

    flags = given_flags(build_parser(), ["--norm", "cbn", "--virtual-batch-size", "8", "--acnet"])
    config = build_config(TrainConfig, ("command line", flags))
    assert (config.norm, config.norm_options.virtual_batch_size, config.acnet) == ("cbn", 8, True)
    assert isinstance(NORMS["cbn"](4), CrossIterationBatchNorm2d)
    assert NORMS["ghost"] is GhostBatchNorm2d and NORMS["brn"] is BatchRenorm2d
