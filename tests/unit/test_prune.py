"""Network slimming: channel pruning by BatchNorm scales (detector.prune) and the sparsity penalty
(detector.engine.sparsity).

Pruning's references are independent of its code: the channels zeroed by hand (gamma = beta = 0, so the channel
outputs SiLU(0) = 0 and removing it changes nothing) must be exactly the ones removed, and the pruned model must
give the unpruned model's outputs (also with beta != 0 where only 1x1 convolutions read the channel, which pruning
folds in); onnxruntime checks the export. The penalty's reference is lambda * sign(gamma), computed here, against
the gradients recorded before and after its hook in one real training step.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from tiny_models import yolov5_blocks_yaml
from torch import nn

from detector.config import TrainConfig, load_hyp
from detector.data.builtin import BUILTIN_CLASSES, ensure_builtin_dataset
from detector.engine.callbacks import Callback
from detector.engine.sparsity import add_l1_subgradient, sparsity_strength
from detector.engine.trainer import Trainer
from detector.errors import ConfigError
from detector.models.acnet import convert_to_acnet
from detector.models.loading import checkpoint_model_entries, load_model
from detector.models.yolo import DetectionModel
from detector.prune import main, prune_model, prune_weights
from detector.utils.checkpoint import save_checkpoint


def tiny_model(nc: int = len(BUILTIN_CLASSES)) -> DetectionModel:
    """Conv, a C3 of 2 shortcut bottlenecks (one residual stream), SPPF, Upsample, Concat, a C3 of 2 plain
    bottlenecks, Detect; BatchNorms with random statistics so every channel matters."""
    config = yolov5_blocks_yaml(depth_multiple=0.67, nc=nc)
    config["head"][2][1] = 3  # the head's C3: 2 bottlenecks without shortcut
    torch.manual_seed(0)
    model = DetectionModel(config)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


STREAM = ("model.2.cv1", "model.2.m.0.cv2", "model.2.m.1.cv2")  # the backbone C3's residual stream


def zero_channels(model: DetectionModel) -> dict[str, list[int]]:
    """Zero gamma and beta of about a quarter of the channels of every prunable BatchNorm (the stream's together);
    returns the zeroed channels per Conv name."""
    modules = dict(model.named_modules())
    zeroed: dict[str, list[int]] = {}
    for name, module in modules.items():
        if isinstance(module, nn.BatchNorm2d) and name.endswith(".bn"):
            conv = name[: -len(".bn")]
            size = module.num_features
            zeroed[conv] = [1] if conv in STREAM else sorted({(3 * i + 2) % size for i in range(size // 4)})
    with torch.no_grad():
        for conv, channels in zeroed.items():
            modules[f"{conv}.bn"].weight[channels] = 0.0
            modules[f"{conv}.bn"].bias[channels] = 0.0
        modules["model.2.cv1.bn"].weight[5] = 0.0  # only one side of the residual adds: the channel must stay
    return zeroed


def test_pruning_removes_exactly_the_zeroed_channels_and_keeps_the_outputs() -> None:
    model = tiny_model()
    zeroed = zero_channels(model)
    modules = dict(model.named_modules())
    convs = [c for c in zeroed if c not in STREAM[1:]]
    total = sum(modules[f"{c}.bn"].num_features for c in convs)  # prunable channels: the stream once
    count = sum(len(zeroed[c]) for c in convs)
    pruned, config = prune_model(model, (count + 0.5) / total, min_channels=1, min_fraction=0.0)

    pruned_modules = dict(pruned.named_modules())
    for conv, channels in zeroed.items():
        original = modules[f"{conv}.bn"]
        kept = [i for i in range(original.num_features) if i not in channels]
        assert torch.equal(pruned_modules[f"{conv}.bn"].weight, original.weight[kept]), conv
        assert torch.equal(pruned_modules[f"{conv}.bn"].running_var, original.running_var[kept]), conv
    assert pruned_modules["model.2.cv1.bn"].weight[4] == 0.0  # channel 5 (zero in cv1 only) stayed: index 4 now
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        expected, actual = model(images), pruned(images)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    widths = [16 - len(zeroed["model.2.cv3"]), 8 - 1, 8 - len(zeroed["model.2.cv2"])]  # out, cv1 (the stream), cv2
    widths += [8 - len(zeroed["model.2.m.0.cv1"]), 8 - 1, 8 - len(zeroed["model.2.m.1.cv1"]), 8 - 1]
    assert config["backbone"][2] == [-1, 2, "C3", [widths]] and config["depth_multiple"] == 1.0
    assert DetectionModel(config).state_dict().keys() == model.state_dict().keys()


def test_removed_channels_constant_output_is_folded_into_the_next_layers() -> None:
    """gamma = 0 but beta != 0: a removed channel still sent act(beta) everywhere. Where only 1x1 convolutions read
    it (exact there; a 3x3 one differs at the zero-padded border) the pruned model must give the same outputs."""
    model = tiny_model()
    read_by_1x1 = {  # Conv -> channels to zero; the stream's channel in all three of its BatchNorms
        "model.2.cv1": [2], "model.2.m.0.cv2": [2], "model.2.m.1.cv2": [2], "model.2.cv2": [0, 3],
        "model.4.cv1": [1, 6, 7], "model.4.cv2": [0, 9, 30], "model.7.cv1": [4], "model.7.cv2": [5],
        "model.7.m.0.cv2": [1, 2], "model.7.m.1.cv2": [6], "model.7.cv3": [3, 11],
    }  # fmt: skip
    modules = dict(model.named_modules())
    with torch.no_grad():
        for conv, channels in read_by_1x1.items():
            modules[f"{conv}.bn"].weight[channels] = 0.0
            assert modules[f"{conv}.act"](modules[f"{conv}.bn"].bias[channels].clone()).abs().min() > 1e-3
    removed = sum(len(c) for conv, c in read_by_1x1.items() if conv not in STREAM[1:])
    pruned, _ = prune_model(model, (removed + 0.5) / 216, min_channels=1, min_fraction=0.0)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(pruned(images), model(images), rtol=1e-4, atol=1e-4)


def test_global_threshold_with_a_minimum_per_layer() -> None:
    model = tiny_model()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.fill_(1.0)
        model.model[1].bn.weight.copy_(0.01 * torch.arange(1, 17))  # 16 channels, all below every other scale
    # 12 removals asked: all fall in layer 1, which keeps its minimum of 8, its largest scales (channels 8-15).
    total = 216  # prunable channels of tiny_model(): 8 + 16 + (8 + 8 + 8 + 8 + 16) + 32 + (16 + 32) + (6 x 8 + 16)
    pruned, _ = prune_model(model, 12.5 / total, min_channels=8, min_fraction=0.0)
    assert torch.equal(pruned.model[1].bn.weight, 0.01 * torch.arange(9, 17))
    assert pruned.model[1].conv.weight.shape == (8, 8, 3, 3) and pruned.model[2].cv1.conv.weight.shape[1] == 8
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with pytest.raises(ConfigError, match="ratio"):
        prune_model(model, 1.0)
    with pytest.raises(ConfigError, match=r"--ratio must be in \[0, 1\), got 1.5"):  # before the weights are read
        prune_weights("no/such/weights.pt", 1.5)


def test_opaque_blocks_keep_their_channels_and_inputs() -> None:
    config = yolov5_blocks_yaml()
    config["backbone"].insert(2, [-1, 1, "GhostConv", [128, 3, 1]])  # opaque: its input and output stay whole
    config["head"][1][0] = [-1, 3]
    config["head"][3][0] = [8, 5]
    model = DetectionModel(config).eval()
    with torch.no_grad():
        model.model[1].bn.weight[:4] = 0.0
        model.model[1].bn.bias[:4] = 0.0
        model.model[0].bn.weight[:2] = 0.0  # layer 0 feeds a plain Conv: prunable
        model.model[0].bn.bias[:2] = 0.0
    # 176 prunable channels (layer 1 feeds GhostConv: not prunable): remove 2, the zeroed ones of layer 0.
    pruned, _ = prune_model(model, 2.5 / 176, min_channels=1, min_fraction=0.0)
    assert pruned.model[1].conv.weight.shape == (16, 6, 3, 3)  # its zeroed outputs kept; its input pruned
    assert pruned.model[2].cv1.conv.weight.shape == model.model[2].cv1.conv.weight.shape
    with torch.no_grad():
        images = torch.rand(1, 3, 64, 64)
        torch.testing.assert_close(pruned(images), model(images), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ([-1, 1, "C3", [[16, 8, 8, 4, 6]]], "residual add"),  # a shortcut bottleneck must keep its input's width
        ([-1, 1, "C3", [[16, 8, 8, 4]]], "needs 4 positive inner"),
        ([-1, 1, "Conv", [[16, 8], 3, 1]], "hidden_channels"),  # a Conv has no inner widths
        ([-1, 1, "C3", [[16, 0, 8, 4, 8]]], "positive integers"),
    ],
)
def test_explicit_width_lists_are_checked(row: list, message: str) -> None:
    config = yolov5_blocks_yaml()
    config["backbone"][2] = row
    with pytest.raises(ConfigError, match=message):
        DetectionModel(config)
    config["backbone"][2] = [-1, 1, "C3", [[24, 8, 5, 3, 8]]]  # exact widths: no width_multiple, no rounding
    block = DetectionModel(config).model[2]
    assert [block.cv1.conv.out_channels, block.cv2.conv.out_channels, block.cv3.conv.out_channels] == [8, 5, 24]
    assert block.m[0].cv1.conv.out_channels == 3 and block.cv3.conv.in_channels == 13


def test_fused_and_acnet_models_are_refused() -> None:
    with pytest.raises(ConfigError, match="fused"):
        prune_model(tiny_model().fuse(), 0.3)
    model = tiny_model()
    model.model[1] = convert_to_acnet(model.model[1])
    with pytest.raises(ConfigError, match="ACNet"):
        prune_model(model, 0.3)


def test_cli_writes_a_checkpoint_that_reloads_weights_only_and_exports_to_onnx(tmp_path: Path) -> None:
    onnxruntime = pytest.importorskip("onnxruntime")
    from detector.config import ExportConfig
    from detector.export import Exporter

    model = tiny_model()
    zero_channels(model)
    model.names = list(BUILTIN_CLASSES)
    save_checkpoint({**checkpoint_model_entries(model), "ema": None}, tmp_path / "best.pt")
    out = tmp_path / "pruned"
    flags = ["--ratio", "0.1", "--out", str(out), "--img", "64", "--latency-runs", "2"]
    assert main(["--weights", str(tmp_path / "best.pt"), *flags]) == 0

    checkpoint = torch.load(out / "pruned.pt", weights_only=True)
    assert checkpoint["model_yaml"] == yaml.safe_load((out / "pruned.yaml").read_text())
    pruned = load_model(out / "pruned.pt")
    assert pruned.names == list(BUILTIN_CLASSES)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = pruned(images)
        torch.testing.assert_close(expected, model(images), rtol=1e-5, atol=1e-5)  # only zeroed channels went

    config = ExportConfig(weights=str(out / "pruned.pt"), include=("onnx",), imgsz=(64, 64), project=str(tmp_path))
    (result,) = Exporter(config).run()
    session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    np.testing.assert_allclose(output, expected.numpy(), rtol=1e-3, atol=1e-3)


class GammaGradients(Callback):
    """Records every BatchNorm scale and its gradient at the first optimizer step; counts steps and batches."""

    def __init__(self) -> None:
        self.gradients: list[torch.Tensor] = []
        self.gammas: list[torch.Tensor] = []
        self.steps = self.batches = 0

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        self.steps += 1
        if not self.gradients:
            norms = [m for m in trainer.model.modules() if isinstance(m, nn.BatchNorm2d)]
            self.gradients = [m.weight.grad.clone() for m in norms]
            self.gammas = [m.weight.detach().clone() for m in norms]

    def on_step_end(self, trainer: Trainer) -> None:
        self.batches += 1


class RecordingTrainer(Trainer):
    """Records the gradients before the --sparsity hook (the defaults run first, then the option's hook, then the
    caller's callbacks, which see them after)."""

    def build_hooks(self):
        hooks = super().build_hooks()
        self.before_penalty = GammaGradients()
        hooks.add(self.before_penalty)
        return hooks


def test_pruned_checkpoint_fine_tunes_and_sparsity_adds_lambda_sign_gamma_per_step(tmp_path: Path) -> None:
    """train.py --weights pruned.pt builds the pruned architecture with every weight and trains with --sparsity;
    at the optimizer step the scales' gradients gain exactly lambda * sign(gamma), once per step."""
    data = ensure_builtin_dataset(tmp_path / "data", num_train=8, num_val=4, progress=False)
    model = tiny_model()
    zero_channels(model)
    model.names = list(BUILTIN_CLASSES)
    pruned, _ = prune_model(model, 0.1, min_channels=1, min_fraction=0.0)
    with torch.no_grad():
        pruned.model[0].bn.weight[0] = 0.0  # sign(0) = 0: no penalty
        pruned.model[1].bn.weight[0] = -0.5  # a negative scale is pushed up
    save_checkpoint({**checkpoint_model_entries(pruned), "ema": None}, tmp_path / "pruned.pt")
    hyp = dataclasses.replace(load_hyp("hyp.no-augmentation.yaml"), warmup_epochs=0.0)
    strength = 0.25
    config = TrainConfig(
        data=str(data), weights=str(tmp_path / "pruned.pt"), imgsz=64, batch_size=4, nbs=8, epochs=1, workers=0,
        noautoanchor=True, noplots=True, noval=True, project=str(tmp_path / "runs"), hyp=hyp, logger=(),
        sparsity=strength,
    )  # fmt: skip
    after_penalty = GammaGradients()
    trainer = RecordingTrainer(config, callbacks=[after_penalty])
    assert trainer.model.yaml == pruned.yaml  # --weights alone brings the pruned architecture ...
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    assert all(torch.equal(start[k], v) for k, v in pruned.state_dict().items())  # ... and all its weights
    trainer.train_one_epoch()
    trained = trainer.model.state_dict()
    weight = "model.2.m.0.cv1.conv.weight"
    assert not torch.equal(trained[weight], start[weight]) and all(torch.isfinite(v).all() for v in trained.values())

    before_penalty = trainer.before_penalty
    assert after_penalty.batches == 2 and after_penalty.steps == 1  # 2 batches of 4 accumulate to one step of 8
    assert sparsity_strength(strength, 0, 1) == strength  # epoch 0 of 1: the full strength
    gammas = before_penalty.gammas
    assert gammas[0][0] == 0 and gammas[1][0] < 0 and len(gammas) == len(after_penalty.gradients)
    for gamma, without, with_penalty in zip(gammas, before_penalty.gradients, after_penalty.gradients, strict=True):
        torch.testing.assert_close(with_penalty - without, strength * torch.sign(gamma), rtol=0, atol=1e-6)


def test_l1_subgradient_skips_frozen_scales_and_decays() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([0.5, -2.0, 0.0, 1.0]))
    model[2].weight.requires_grad_(False)
    model(torch.rand(2, 3, 4, 4)).square().sum().backward()
    before = model[1].weight.grad.clone()
    assert add_l1_subgradient(model, 0.1) == 1  # the frozen BatchNorm has no gradient: left alone
    torch.testing.assert_close(model[1].weight.grad - before, torch.tensor([0.1, -0.1, 0.0, 0.1]))
    assert model[2].weight.grad is None
    assert sparsity_strength(1e-3, 5, 10) == pytest.approx(1e-3 * 0.55)
    assert sparsity_strength(1e-3, 10, 10) == pytest.approx(1e-4)
