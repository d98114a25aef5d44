"""Channel pruning by BatchNorm scales, the second half of network slimming (Liu et al., 2017, "Learning Efficient
Convolutional Networks through Network Slimming"): after sparsity training (``train.py --sparsity``,
:mod:`detector.engine.sparsity`) many BatchNorm scales (gammas) are near zero, and their channels can go.

``python -m detector.prune --weights best.pt --ratio 0.5`` (or ``detector prune ...``) ranks every prunable
channel of the model by ``|gamma|`` and removes the ``ratio`` smallest over the whole model (one global
threshold), keeping at least ``--min-channels`` (and ``--min-fraction``) per layer. What it writes is an ordinary
model: ``pruned.yaml`` (our model YAML, with explicit widths: :mod:`detector.models.yolo`) and ``pruned.pt`` (our
checkpoint, weights_only-loadable) that train.py (``--weights pruned.pt``), val.py, detect.py and export.py take
like any other. A removed channel (scale near 0) still output a constant, ``act(beta)``: rather than dropped, as
in the paper, that constant is folded into what read it (the next BatchNorm's running mean, or Detect's bias), exact
for 1x1 convolutions and inside the image for larger kernels. Fine-tune the pruned model afterwards.

Which channels may go, and what else changes with them:

- ``Conv`` (plain, groups 1): its output channels; the layers that read them lose the matching input channels.
- ``C3`` (with ``Bottleneck`` inner blocks): cv1, cv2, cv3 and each bottleneck's cv1 and cv2. A bottleneck with
  a shortcut adds its output to its input, so cv1 and those bottlenecks' cv2 form one residual stream whose
  channels are pruned jointly (a channel goes only when its largest ``|gamma|`` over the stream is small).
- ``SPPF``/``SPP``: cv1 (read four times by cv2, through the pooled copies) and cv2; a stand-alone
  ``Bottleneck``: cv1, and cv2 when it has no shortcut.
- ``Concat`` maps each input's kept channels to their offsets in the next layer's input, ``nn.Upsample`` passes
  them through, and ``Detect``'s convolutions keep their outputs and lose the removed input channels.
- Any other block (DWConv, GhostConv, C3TR, Focus, a stacked row...) is kept whole, and so are the channels it
  reads. Norm layers that subclass ``nn.BatchNorm2d`` (``--norm ghost|brn|cbn``) count as BatchNorm. A fused model
  (no BatchNorm left) and one with ACNet branches (whose folding folds the BatchNorms too) are refused.

The Python API: :func:`prune_model` ``(model, ratio) -> (pruned_model, yaml_dict)``; :func:`prune_weights` does
the CLI's work (load, prune, report, write).
"""

from __future__ import annotations

import copy
import datetime
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor, nn

from detector.errors import ConfigError
from detector.models.blocks import C3, SPP, SPPF, Bottleneck, Concat, Conv
from detector.models.head import Detect
from detector.models.loading import checkpoint_model_entries, load_model
from detector.models.registry import get_layer, layer_rule
from detector.models.yolo import DetectionModel
from detector.utils.checkpoint import save_checkpoint
from detector.utils.files import increment_path

LOGGER = logging.getLogger(__name__)

MIN_CHANNELS = 8  # default: a layer keeps at least this many channels (or all it has, when fewer)
MIN_FRACTION = 0.1  # default: ... and at least this fraction of them


@dataclass(eq=False)
class ChannelGroup:
    """Output channels kept or removed together: the BatchNorm'd outputs of ``convs`` (several when a residual add
    ties them), or a fixed block (the image, an opaque block's output) when ``convs`` is empty."""

    size: int
    convs: list[str] = field(default_factory=list)  # names of the Conv modules that produce these channels
    prunable: bool = True
    keep: Tensor | None = None  # the kept channel indices, ascending (set by the selection)

    def kept(self) -> Tensor:
        return torch.arange(self.size) if self.keep is None else self.keep


@dataclass(eq=False)
class Segment:
    """A group's channels where a feature map holds them, with what each would output with a zero BatchNorm scale:
    ``act(beta)`` for a Conv's output, summed along a residual stream (a removed channel's constant value)."""

    group: ChannelGroup
    values: Tensor  # (group.size,) float32


Layout = list[Segment]  # a feature map's channels: its segments' channels, concatenated in this order


def layout_indices(layout: Layout) -> Tensor:
    """The kept channel indices of a feature map made of ``layout`` (offsets added per segment)."""
    indices, offset = [], 0
    for segment in layout:
        indices.append(segment.group.kept() + offset)
        offset += segment.group.size
    return torch.cat(indices)


def removed_constants(layout: Layout) -> tuple[Tensor, Tensor]:
    """The removed channel indices of a feature map made of ``layout`` and their constant values."""
    indices, values, offset = [], [], 0
    for segment in layout:
        removed = torch.ones(segment.group.size, dtype=torch.bool)
        removed[segment.group.kept()] = False
        indices.append(torch.nonzero(removed).flatten() + offset)
        values.append(segment.values[removed])
        offset += segment.group.size
    return torch.cat(indices), torch.cat(values)


@dataclass
class PruneReport:
    """What a pruning did: channels and the threshold, parameters and GFLOPs before and after."""

    ratio: float
    channels: int  # prunable channels before
    removed: int  # channels removed (fewer than ratio x channels when per-layer minimums kept some)
    threshold: float  # largest |gamma| removed (0.0 when none)
    parameters: tuple[int, int] = (0, 0)  # before, after
    gflops: tuple[float | None, float | None] = (None, None)
    latency_ms: tuple[float | None, float | None] = (None, None)  # CPU, batch 1, fused, median
    imgsz: int = 640

    def lines(self) -> list[str]:
        """The summary table, one line each."""

        def change(before: float | None, after: float | None, decimals: int, unit: str = "") -> str:
            if before is None or after is None:
                return "-"
            relative = f" ({after / before - 1:+.1%})" if before else ""
            return f"{before:,.{decimals}f}{unit} -> {after:,.{decimals}f}{unit}{relative}"

        return [
            f"channels:   {self.removed:,}/{self.channels:,} removed ({self.removed / max(self.channels, 1):.1%}, "
            f"asked {self.ratio:.1%}), |gamma| threshold {self.threshold:.4g}",
            f"parameters: {change(*self.parameters, 0)}",
            f"GFLOPs:     {change(*self.gflops, 2)} at {self.imgsz}",
            f"latency:    {change(*self.latency_ms, 1, ' ms')} (CPU, batch 1, fused, {self.imgsz}x{self.imgsz})",
        ]


class _Plan:
    """The channel groups of a model and, for every convolution to slice, where its inputs come from."""

    def __init__(self, model: DetectionModel) -> None:
        self.modules = dict(model.named_modules())
        self.groups: list[ChannelGroup] = []
        self.convs: dict[str, tuple[ChannelGroup, Layout]] = {}  # Conv name -> (output group, input layout)
        self.heads: dict[str, Layout] = {}  # Detect conv name -> input layout
        self.widths: dict[int, tuple[str, list[str]]] = {}  # layer index -> (output conv, inner convs) names
        outputs: list[Layout] = []
        image = [self._fixed(model.yaml["ch"])]
        for spec, layer in zip(model.layers, model.model, strict=True):
            sources = spec.sources if isinstance(spec.sources, tuple) else (spec.sources,)
            inputs = [(outputs[-1] if outputs else image) if s == -1 else outputs[s] for s in sources]
            outputs.append(self._layer(f"model.{spec.index}", spec.index, layer, inputs, spec.out_channels))

    def _fixed(self, size: int) -> Segment:
        """Channels nothing prunes (the image, an opaque block's output)."""
        group = ChannelGroup(size, prunable=False)
        self.groups.append(group)
        return Segment(group, torch.zeros(size))

    def _conv(self, name: str, layout: Layout, stream: Segment | None = None) -> Segment:
        """Register the Conv ``name`` reading ``layout``; its outputs are a new group, or are added to ``stream``
        (a residual add: the same group, and the constant values add up)."""
        module = self.modules[name]
        with torch.no_grad():  # a channel whose BatchNorm scale is 0 outputs act(beta) everywhere
            values = module.act(module.bn.bias.detach().float().cpu().clone())
        if stream is None:
            group = ChannelGroup(module.conv.out_channels)
            self.groups.append(group)
        else:
            group, values = stream.group, stream.values + values
        group.convs.append(name)
        self.convs[name] = (group, layout)
        return Segment(group, values)

    def _layer(self, name: str, index: int, layer: nn.Module, inputs: list[Layout], out_channels: int) -> Layout:
        """The output layout of one top-level layer, registering its convolutions."""
        kind = type(layer)
        if kind is Conv and _plain(layer):
            self.widths[index] = (name, [])
            return [self._conv(name, inputs[0])]
        if kind is C3 and all(type(b) is Bottleneck and _plain(b.cv1) and _plain(b.cv2) for b in layer.m):
            return self._c3(name, index, layer, inputs[0])
        if kind in (SPPF, SPP) and _plain(layer.cv1) and _plain(layer.cv2):
            pooled = len(layer.m) + 1 if isinstance(layer.m, nn.ModuleList) else 4  # cv1's output, then each pool
            hidden = self._conv(f"{name}.cv1", inputs[0])
            self.widths[index] = (f"{name}.cv2", [f"{name}.cv1"])
            return [self._conv(f"{name}.cv2", [hidden] * pooled)]
        if kind is Bottleneck and _plain(layer.cv1) and _plain(layer.cv2):
            hidden = self._conv(f"{name}.cv1", inputs[0])
            self.widths[index] = (f"{name}.cv2", [f"{name}.cv1"])
            output = self._conv(f"{name}.cv2", [hidden])
            if layer.add:  # the output adds to the input: both keep every channel
                _freeze(inputs[0] + [output])
            return [output]
        if isinstance(layer, Concat) and layer.d == 1:
            return [segment for layout in inputs for segment in layout]
        if isinstance(layer, nn.Upsample):
            return inputs[0]
        if isinstance(layer, Detect):
            for level, layout in enumerate(inputs):
                self.heads[f"{name}.m.{level}"] = layout
            return []
        for layout in inputs:  # an opaque block reads every channel and its output is fixed
            _freeze(layout)
        return [self._fixed(out_channels)]

    def _c3(self, name: str, index: int, layer: C3, layout: Layout) -> Layout:
        stream = self._conv(f"{name}.cv1", layout)
        side = self._conv(f"{name}.cv2", layout)
        inner = [f"{name}.cv1", f"{name}.cv2"]
        for i, block in enumerate(layer.m):
            hidden = self._conv(f"{name}.m.{i}.cv1", [stream])
            # A shortcut adds the bottleneck's output to its input: the same channels on both sides of the add.
            stream = self._conv(f"{name}.m.{i}.cv2", [hidden], stream if block.add else None)
            inner += [f"{name}.m.{i}.cv1", f"{name}.m.{i}.cv2"]
        self.widths[index] = (f"{name}.cv3", inner)
        return [self._conv(f"{name}.cv3", [stream, side])]

    def scores(self, group: ChannelGroup) -> Tensor:
        """Per channel, the largest ``|gamma|`` over the group's BatchNorms (a joint group prunes a channel only
        when it is small in all of them)."""
        gammas = torch.stack([self.modules[name].bn.weight.detach().abs().float().cpu() for name in group.convs])
        return gammas.amax(0)

    def width(self, name: str) -> int:
        return len(self.convs[name][0].kept())


def _plain(conv: nn.Module) -> bool:
    """A Conv whose output channels can be sliced: an ungrouped nn.Conv2d then a BatchNorm (subclasses count)."""
    return (
        type(conv) is Conv
        and type(conv.conv) is nn.Conv2d
        and conv.conv.groups == 1
        and isinstance(conv.bn, nn.BatchNorm2d)
        and conv.bn.affine
    )


def _freeze(layout: Layout) -> None:
    for segment in layout:
        segment.group.prunable = False


def check_prunable(model: nn.Module) -> None:
    """Refuse what pruning cannot read: a non-DetectionModel, a fused model (its gammas are folded away) or one
    with extra convolution branches (ACNet, whose folding also folds the BatchNorms away)."""
    if not isinstance(model, DetectionModel):
        raise ConfigError(f"pruning needs a DetectionModel, got {type(model).__name__}")
    for name, module in model.named_modules():
        if not isinstance(module, Conv):
            continue
        if not isinstance(module.bn, nn.BatchNorm2d):
            raise ConfigError(f"cannot prune a fused model ({name} has no BatchNorm left): prune the unfused weights")
        extra = [child for child, _ in module.named_children() if child not in ("conv", "bn", "act")]
        if extra or not isinstance(module.conv, nn.Conv2d):
            raise ConfigError(
                f"cannot prune {name}: it has extra convolution branches ({', '.join(extra) or 'conv'}: ACNet), and "
                "folding them also folds its BatchNorm away; prune a model without ACNet, then fine-tune with --acnet"
            )


def select_channels(
    plan: _Plan, ratio: float, min_channels: int = MIN_CHANNELS, min_fraction: float = MIN_FRACTION
) -> tuple[int, int, float]:
    """Mark the kept channels of every prunable group: the ``ratio`` smallest scores over all of them go, then each
    group gets back its best channels up to its minimum. Returns (prunable channels, removed, threshold)."""
    groups = [g for g in plan.groups if g.prunable and g.convs]
    if not groups:
        return 0, 0, 0.0
    scores = [plan.scores(g) for g in groups]
    flat = torch.cat(scores)
    order = torch.argsort(flat, stable=True)
    remove_count = int(ratio * len(flat))
    removed = torch.zeros(len(flat), dtype=torch.bool)
    removed[order[:remove_count]] = True
    threshold = float(flat[order[remove_count - 1]]) if remove_count else 0.0
    total_removed = 0
    for group, score, group_removed in zip(groups, scores, removed.split([g.size for g in groups]), strict=True):
        minimum = min(group.size, max(min_channels, math.ceil(min_fraction * group.size)))
        keep_count = max(int((~group_removed).sum()), minimum)
        # Channels the global ranking kept come first; a group under its minimum gets back its best removed ones.
        priority = torch.where(group_removed, score, torch.full_like(score, math.inf))
        group.keep = torch.argsort(priority, descending=True, stable=True)[:keep_count].sort().values
        total_removed += group.size - keep_count
    return len(flat), total_removed, threshold


def removed_input_shift(weight: Tensor, layout: Layout) -> Tensor:
    """(C_out,) what the removed input channels added to a convolution's output: each outputs a constant (its
    ``act(beta)``, see :class:`Segment`), so its share is the kernel's sum times that constant (exact wherever the
    kernel window lies inside the image; a 1x1 convolution everywhere)."""
    removed, values = removed_constants(layout)
    if not len(removed):
        return torch.zeros(weight.shape[0])
    return weight[:, removed].detach().float().cpu().sum((2, 3)) @ values


def pruned_state_dict(model: DetectionModel, plan: _Plan) -> dict[str, Tensor]:
    """``model``'s state dict with every planned convolution sliced to its kept output and input channels.

    What the removed channels still fed the next layers, their constant ``act(beta)``, is folded in rather than
    dropped: into the BatchNorm running mean of a Conv that read them, into the bias of a Detect convolution.
    """
    state = model.state_dict()
    pruned = dict(state)
    for name, (group, layout) in plan.convs.items():
        outputs, inputs = group.kept(), layout_indices(layout)
        weight = state[f"{name}.conv.weight"]
        pruned[f"{name}.conv.weight"] = weight[outputs][:, inputs].clone()
        mean = f"{name}.bn.running_mean"
        shift = removed_input_shift(weight, layout).to(state[mean])
        for key, value in state.items():  # gamma, beta, running statistics (and a BatchNorm subclass's own)
            if key.startswith(f"{name}.bn.") and value.dim() > 0:
                if value.dim() != 1 or len(value) != group.size:
                    raise ConfigError(f"cannot prune {key}: shape {list(value.shape)} is not per channel")
                pruned[key] = (value - shift if key == mean else value)[outputs].clone()
    for name, layout in plan.heads.items():
        weight = state[f"{name}.weight"]
        pruned[f"{name}.weight"] = weight[:, layout_indices(layout)].clone()
        pruned[f"{name}.bias"] = state[f"{name}.bias"] + removed_input_shift(weight, layout).to(weight)
    return pruned


def pruned_yaml(model: DetectionModel, plan: _Plan) -> dict[str, Any]:
    """The model YAML of the pruned model: ``model.yaml`` with exact widths (``[out, *inner]`` lists) and the
    actual repeat counts (``depth_multiple`` and ``width_multiple`` 1)."""
    config = copy.deepcopy(model.yaml)
    config.update(depth_multiple=1.0, width_multiple=1.0)
    rows = [*config["backbone"], *config["head"]]
    for spec, row in zip(model.layers, rows, strict=True):
        layer_cls = get_layer(spec.module_name)
        row[1] = spec.repeats
        if not layer_rule(layer_cls, "scales_width"):
            continue
        if layer_rule(layer_cls, "takes_repeats"):
            row[1] = spec.args[2]
        if spec.index in plan.widths:
            output, inner = plan.widths[spec.index]
            widths = [plan.width(output), *(plan.width(name) for name in inner)]
        else:  # kept whole: its own width, exactly
            widths = [spec.out_channels]
        row[3] = [widths, *row[3][1:]]
    return config


def prune_model(
    model: DetectionModel,
    ratio: float,
    min_channels: int = MIN_CHANNELS,
    min_fraction: float = MIN_FRACTION,
) -> tuple[DetectionModel, dict[str, Any]]:
    """Network slimming's pruning: ``(pruned_model, yaml_dict)`` with the ``ratio`` of prunable channels of smallest
    ``|gamma|`` removed (one global threshold; each layer keeps ``max(min_channels, min_fraction x its channels)``,
    or all it has when fewer). ``model`` is left unchanged; the pruned model is a new DetectionModel built from
    ``yaml_dict``, on ``model``'s device and dtype, in its training mode, with its class names."""
    return _prune(model, ratio, min_channels, min_fraction)[:2]


def _check_options(ratio: float, min_channels: int, min_fraction: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise ConfigError(f"--ratio must be in [0, 1), got {ratio}")
    if min_channels < 1 or not 0.0 <= min_fraction <= 1.0:
        raise ConfigError(
            f"--min-channels must be >= 1 and --min-fraction in [0, 1], got {min_channels}, {min_fraction}"
        )


def _prune(
    model: DetectionModel, ratio: float, min_channels: int, min_fraction: float
) -> tuple[DetectionModel, dict[str, Any], tuple[int, int, float]]:
    _check_options(ratio, min_channels, min_fraction)
    check_prunable(model)
    plan = _Plan(model)
    selection = select_channels(plan, ratio, min_channels, min_fraction)
    config = pruned_yaml(model, plan)
    parameter = next(model.parameters())
    pruned = DetectionModel(config).to(parameter.device, parameter.dtype)
    pruned.load_state_dict(pruned_state_dict(model, plan))
    pruned.names = list(model.names)
    pruned.train(model.training)
    return pruned, config, selection


def cpu_latencies_ms(models: Sequence[DetectionModel], imgsz: int, runs: int) -> list[float | None]:
    """Median wall time of ``runs`` batch-1 forwards of each model (a fused eval copy, on the CPU), in ms. The models
    take turns, so a shared machine's changing load weighs on each alike. None for each when ``runs`` is 0."""
    if runs < 1:
        return [None] * len(models)
    fused = [copy.deepcopy(m).float().cpu().eval().fuse().to(memory_format=torch.channels_last) for m in models]
    image = torch.zeros(1, fused[0].yaml["ch"], imgsz, imgsz).to(memory_format=torch.channels_last)
    times: list[list[float]] = [[] for _ in fused]
    with torch.inference_mode():
        for model in fused:  # two untimed warm-up passes each
            model(image)
            model(image)
        for _ in range(runs):
            for model, model_times in zip(fused, times, strict=True):
                start = time.perf_counter()
                model(image)
                model_times.append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] * 1e3 for t in times]


def model_yaml_text(config: dict[str, Any]) -> str:
    """A model YAML dict as text in the layout of configs/models: one ``[from, number, module, args]`` row per line,
    with its layer index."""

    def flow(value: Any) -> str:
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()

    lines, index = [], 0
    for key, value in config.items():
        if key not in ("backbone", "head"):
            style = None if isinstance(value, list) else False  # anchors: one flow list per level
            lines.append(yaml.safe_dump({key: value}, default_flow_style=style, width=10**6).strip())
            continue
        lines.append(f"{key}:")
        for row in value:
            lines.append(f"  - {flow(row)}  # {index}")
            index += 1
    return "\n".join(lines) + "\n"


def prune_weights(
    weights: str | Path,
    ratio: float,
    out: str | Path = "",
    min_channels: int = MIN_CHANNELS,
    min_fraction: float = MIN_FRACTION,
    imgsz: int = 640,
    latency_runs: int = 10,
) -> tuple[Path, PruneReport]:
    """Prune ``weights`` (ours or YOLOv5's; EMA weights when present) and write ``pruned.pt`` and ``pruned.yaml``
    into ``out`` (default: a new runs/prune/exp*). Returns the checkpoint's path and the report (also logged)."""
    _check_options(ratio, min_channels, min_fraction)  # before the model loads (seconds for a big one)
    model = load_model(weights)
    pruned, config, (channels, removed, threshold) = _prune(model, ratio, min_channels, min_fraction)
    before, after = model.info(imgsz), pruned.info(imgsz)
    report = PruneReport(
        ratio=ratio,
        channels=channels,
        removed=removed,
        threshold=threshold,
        parameters=(before.parameters, after.parameters),
        gflops=(before.gflops, after.gflops),
        latency_ms=tuple(cpu_latencies_ms([model, pruned], imgsz, latency_runs)),
        imgsz=imgsz,
    )
    out_dir = Path(out) if out else increment_path(Path("runs/prune") / "exp")
    out_dir.mkdir(parents=True, exist_ok=True)
    yaml_path, checkpoint_path = out_dir / "pruned.yaml", out_dir / "pruned.pt"
    header = (
        f"# Pruned from {weights} by python -m detector.prune --ratio {ratio} (network slimming): exact widths,\n"
        "# [out, *inner] per block (see detector.models.yolo). Fine-tune: train.py --weights pruned.pt\n"
    )
    yaml_path.write_text(header + model_yaml_text(config), encoding="utf-8")
    checkpoint = {
        **checkpoint_model_entries(pruned),
        "ema": None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "pruning": {
            "weights": str(weights),
            "ratio": ratio,
            "min_channels": min_channels,
            "min_fraction": min_fraction,
            "threshold": threshold,
            "channels": channels,
            "removed": removed,
            "parameters": list(report.parameters),
        },
    }
    save_checkpoint(checkpoint, checkpoint_path)
    LOGGER.info("Pruned %s:\n  %s", weights, "\n  ".join(report.lines()))
    LOGGER.info(
        "Wrote %s and %s; fine-tune with: python train.py --weights %s", checkpoint_path, yaml_path, checkpoint_path
    )
    return checkpoint_path, report


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m detector.prune``: the command line of :mod:`detector.cli.prune`."""
    from detector.cli.prune import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
