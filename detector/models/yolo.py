"""``DetectionModel``: a YOLOv5-style detector built from a model YAML through the layer registry (no ``eval``).

The YAML schema is YOLOv5's: ``nc``, ``depth_multiple``, ``width_multiple``, ``anchors`` (pixels, one list of
w,h pairs per level, or a count per level), optional ``activation`` (e.g. ``nn.SiLU()``), ``ch``, ``norm`` (a
name in :data:`detector.models.norms.NORMS`, e.g. ``ghost``; BatchNorm by default) with its ``norm_args`` and
``acnet`` (true: ACNet branches on every 3x3 Conv, :mod:`detector.models.acnet`), and
``backbone`` + ``head`` lists of rows ``[from, number, module, args]``. ``from`` is -1 (previous layer), an
earlier layer index, or a list of them; ``number`` repeats are scaled by ``depth_multiple``; channel args are
scaled by ``width_multiple`` and rounded up to multiples of 8, following each block's own rules
(:mod:`detector.models.registry`). The strings ``nc`` and ``anchors`` in args are symbols taken from the YAML's
top level (``None`` means Python's None); any other string is an error unless the block takes string literals.

Explicit widths (what ``python -m detector.prune`` writes): the first arg of a width-scaled block may be a list
``[out_channels, *inner]`` instead of a number. Its counts are exact (no ``width_multiple``, no rounding); the
inner ones, when given, go to the block as ``hidden_channels`` (C3: cv1, cv2, then each bottleneck's cv1 and cv2;
Bottleneck, SPPF, SPP: cv1). ``[-1, 3, C3, [[64, 24, 32, 16, 24, 16, 24, 8, 24]]]`` is a C3 with pruned widths.
"""

from __future__ import annotations

import copy
import difflib
import functools
import logging
import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from detector.config import MODEL_CONFIG_DIR, load_yaml, resolve_config_path
from detector.errors import ConfigError
from detector.models.acnet import convert_to_acnet
from detector.models.blocks import Conv, Hardswish, Mish, SiLU
from detector.models.head import Detect
from detector.models.norms import NormSpec, parse_norm
from detector.models.registry import get_layer, layer_rule
from detector.utils.torch_utils import buffers_kept, unwrap_model

LOGGER = logging.getLogger(__name__)

REQUIRED_KEYS = ("nc", "depth_multiple", "width_multiple", "backbone", "head")
OPTIONAL_KEYS = ("anchors", "activation", "ch", "norm", "norm_args", "acnet")
STRIDE_PROBE_SIZES = (64, 128, 256, 512)  # sides of the dry pass that measures strides, tried until maps are >= 2x2
TTA_SCALES = (1.0, 0.83, 0.67)  # test-time augmentation as YOLOv5: image scales ...
TTA_FLIPS = (None, "lr", None)  # ... and the flip applied at each scale
TTA_PAD_VALUE = 0.447  # grey (ImageNet mean) fill for the padding of scaled TTA images, as YOLOv5

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "SiLU": SiLU,  # these three: in place in inference only (their gradients need the input)
    "ReLU": nn.ReLU,
    "ReLU6": nn.ReLU6,
    "LeakyReLU": nn.LeakyReLU,
    "Hardswish": Hardswish,
    "Mish": Mish,
    "GELU": nn.GELU,
    "Sigmoid": nn.Sigmoid,
    "Identity": nn.Identity,
}
_INPLACE_ACTIVATIONS = {"SiLU", "ReLU", "ReLU6", "LeakyReLU", "Hardswish", "Mish"}


@dataclass(frozen=True)
class LayerSpec:
    """What the YAML row of one layer resolved to; kept beside ``DetectionModel.model`` (same index).

    ``sources``: -1 for the previous layer's output (the image for layer 0), otherwise absolute indices of earlier
    layers; an int means the layer takes one tensor, a tuple means it takes a list of tensors.
    """

    index: int
    sources: int | tuple[int, ...]
    module_name: str
    repeats: int  # after depth scaling (1 for blocks that take their repeats as an argument)
    args: tuple[Any, ...]  # the resolved positional arguments the module was built with
    out_channels: int
    parameters: int


@dataclass(frozen=True)
class ModelInfo:
    """Summary of a model: module count, parameter and trainable-parameter counts, GFLOPs at ``imgsz``."""

    layers: int
    parameters: int
    gradients: int
    gflops: float | None
    imgsz: int


def make_divisible(value: float, divisor: int = 8) -> int:
    """The smallest multiple of ``divisor`` that is >= ``value`` (YOLOv5's channel rounding)."""
    return int(math.ceil(value / divisor) * divisor)


def parse_activation(spec: str, source: str) -> Callable[[], nn.Module]:
    """An activation factory from YOLOv5's ``activation`` key (``nn.SiLU()``, ``nn.LeakyReLU(0.1)``, ``ReLU``)."""
    match = re.fullmatch(r"\s*(?:nn\.)?(\w+)\s*(?:\((.*)\))?\s*", str(spec))
    name = match.group(1) if match else ""
    if name not in ACTIVATIONS:
        raise ConfigError(f"{source}: activation {spec!r} is not one of {', '.join(sorted(ACTIVATIONS))}")
    args: list[float] = []
    for text in (match.group(2) or "").split(","):
        if text.strip():
            try:
                args.append(float(text))
            except ValueError:
                raise ConfigError(f"{source}: activation {spec!r}: arguments must be numbers") from None
    kwargs = {"inplace": True} if name in _INPLACE_ACTIVATIONS else {}
    factory = functools.partial(ACTIVATIONS[name], *args, **kwargs)
    try:
        factory()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: activation {spec!r}: {e}") from e
    return factory


def read_model_yaml(cfg: Mapping[str, Any] | str | Path) -> tuple[dict[str, Any], str]:
    """A deep copy of the model YAML dict and a name for it in error messages (its path, when read from a file)."""
    if isinstance(cfg, Mapping):
        return copy.deepcopy(dict(cfg)), str(cfg.get("yaml_file", "model YAML"))
    path = resolve_config_path(cfg, MODEL_CONFIG_DIR)
    return load_yaml(path), str(path)


def _check_keys(config: dict[str, Any], source: str) -> None:
    for key in REQUIRED_KEYS:
        if key not in config:
            raise ConfigError(f"{source}: missing key '{key}' (a model YAML needs {', '.join(REQUIRED_KEYS)})")
    known = set(REQUIRED_KEYS) | set(OPTIONAL_KEYS) | {"yaml_file"}
    for key in config:
        if key not in known:
            hint = difflib.get_close_matches(str(key), sorted(known), n=1)
            suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
            raise ConfigError(f"{source}: unknown key '{key}'{suggestion} (valid keys: {', '.join(sorted(known))})")
    nc = config["nc"]
    if isinstance(nc, bool) or not isinstance(nc, int) or nc < 1:
        raise ConfigError(f"{source}: 'nc' must be a positive integer, got {nc!r}")
    for key in ("depth_multiple", "width_multiple"):
        value = config[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{source}: '{key}' must be a positive number, got {value!r}")
    for key in ("backbone", "head"):
        if not isinstance(config[key], list) or not config[key]:
            raise ConfigError(f"{source}: '{key}' must be a non-empty list of [from, number, module, args] rows")


def _normalise_sources(raw_from: Any, index: int, where: str) -> int | tuple[int, ...]:
    """YAML ``from`` -> -1 (previous output) or absolute indices of earlier layers; errors name the row."""

    def one(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: 'from' entries must be integers, got {value!r}")
        if value == -1:
            return -1
        absolute = index + value if value < 0 else value
        if not 0 <= absolute < index:
            raise ConfigError(f"{where}: 'from' {value} does not name an earlier layer (this is layer {index})")
        return absolute

    if isinstance(raw_from, list):
        if not raw_from:
            raise ConfigError(f"{where}: 'from' is an empty list")
        return tuple(one(v) for v in raw_from)
    return one(raw_from)


def _resolve_args(args: list[Any], symbols: Mapping[str, Any], accepts_strings: bool, where: str) -> list[Any]:
    resolved = []
    for arg in args:
        if isinstance(arg, str):
            if arg in symbols:
                arg = symbols[arg]
            elif not accepts_strings:
                raise ConfigError(f"{where}: unknown symbol {arg!r} in args (known symbols: {', '.join(symbols)})")
        resolved.append(arg)
    return resolved


def _explicit_channels(widths: list[Any], where: str) -> list[int]:
    """An explicit width list ``[out_channels, *inner]``: positive integers, taken as they are."""
    if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ConfigError(f"{where}: an explicit width list must hold positive integers, got {widths!r}")
    return list(widths)


def parse_model(
    config: Mapping[str, Any],
    in_channels: int,
    source: str = "model YAML",
    activation: Callable[[], nn.Module] | None = None,
    norm: NormSpec | None = None,
    acnet: bool = False,
) -> tuple[nn.ModuleList, tuple[LayerSpec, ...]]:
    """Build the layers of a model YAML dict (already key-checked). Returns the modules and their specs.

    Each layer is built with BatchNorm, then its 3x3 Convs become ACNet blocks (``acnet``) and its BatchNorms
    become ``norm``: one place for every block, including those whose inner Convs take no options.
    """
    depth_multiple, width_multiple = config["depth_multiple"], config["width_multiple"]
    symbols = {"nc": config["nc"], "anchors": config.get("anchors"), "None": None}
    rows = [("backbone", i, row) for i, row in enumerate(config["backbone"])]
    rows += [("head", i, row) for i, row in enumerate(config["head"])]

    layers: list[nn.Module] = []
    specs: list[LayerSpec] = []
    channels: list[int] = []  # output channels by layer index

    def channels_of(source_index: int, index: int) -> int:
        if source_index == -1:
            return channels[index - 1] if index > 0 else in_channels
        return channels[source_index]

    for index, (section, row_number, row) in enumerate(rows):
        where = f"{source}: {section} row {row_number} (layer {index}) {row!r}"
        if not isinstance(row, list) or len(row) != 4:
            raise ConfigError(f"{where}: expected [from, number, module, args]")
        raw_from, number, module_name, raw_args = row
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ConfigError(f"{where}: 'number' must be a positive integer, got {number!r}")
        if not isinstance(raw_args, list):
            raise ConfigError(f"{where}: 'args' must be a list, got {raw_args!r}")
        try:
            layer_cls = get_layer(str(module_name))
        except KeyError as e:
            raise ConfigError(f"{where}: {e.args[0]}") from None
        sources = _normalise_sources(raw_from, index, where)
        source_list = sources if isinstance(sources, tuple) else (sources,)
        args = _resolve_args(raw_args, symbols, layer_rule(layer_cls, "accepts_strings"), where)
        repeats = max(round(number * depth_multiple), 1) if number > 1 else number

        explicit: dict[str, list[int]] = {}  # hidden_channels of an explicit width list
        if layer_rule(layer_cls, "scales_width"):
            if args and isinstance(args[0], list):
                out_channels, *inner = _explicit_channels(args[0], where)
                explicit = {"hidden_channels": inner} if inner else {}
            elif not args or isinstance(args[0], bool) or not isinstance(args[0], (int, float)):
                raise ConfigError(
                    f"{where}: the first arg of {module_name} must be its output channel count (or a list of widths)"
                )
            else:
                out_channels = make_divisible(args[0] * width_multiple, 8)
            args = [channels_of(source_list[0], index), out_channels, *args[1:]]
            if layer_rule(layer_cls, "takes_repeats"):
                args.insert(2, repeats)
                repeats = 1
        elif layer_rule(layer_cls, "concatenates_inputs"):
            out_channels = sum(channels_of(s, index) for s in source_list)
        elif layer_rule(layer_cls, "takes_input_channels"):
            args.append([channels_of(s, index) for s in source_list])
            out_channels = 0  # a head: nothing reads its output as a feature map
        else:
            out_channels = channels_of(source_list[0], index)

        kwargs = {"activation": activation} if activation and layer_rule(layer_cls, "takes_activation") else {}
        kwargs.update(explicit)
        try:
            built = [layer_cls(*args, **kwargs) for _ in range(repeats)]
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}: cannot build {module_name}{tuple(args)}: {e}") from e
        layer = built[0] if repeats == 1 else nn.Sequential(*built)
        if acnet:
            layer = convert_to_acnet(layer)
        if norm is not None:
            norm.convert(layer)
        layers.append(layer)
        channels.append(out_channels)
        parameters = sum(p.numel() for p in layer.parameters())
        specs.append(LayerSpec(index, sources, str(module_name), repeats, tuple(args), out_channels, parameters))
    return nn.ModuleList(layers), tuple(specs)


def checkpointed_call(layer: nn.Module, x: Tensor | list[Tensor]) -> Tensor:
    """``layer(x)`` keeping only ``x`` for backward, where the layer's inside is recomputed (non-reentrant
    ``torch.utils.checkpoint``: same RNG draws, autocast and gradients; BatchNorm statistics updated once, the
    recomputation restoring them with ``buffers_kept``: switching ``track_running_stats`` off instead would make it
    save fewer tensors than the forward did, which the checkpoint refuses)."""
    if torch.compiler.is_compiling():
        # Under torch.compile the recomputation is part of the compiled backward graph, which updates no buffers
        # (they are written once, by the forward graph); TorchDynamo also refuses a context_fn here.
        return checkpoint(layer, x, use_reentrant=False)
    return checkpoint(layer, x, use_reentrant=False, context_fn=lambda: (nullcontext(), buffers_kept(layer)))


class DetectionModel(nn.Module):
    """A YOLOv5-style detector from a model YAML (a dict, a path, or a name in configs/models).

    - training mode: ``model(x)`` -> raw maps, level i (B, na, H_i, W_i, 5 + nc)
    - eval mode: ``model(x)`` -> decoded (B, N, 5 + nc): xywh pixels of ``x``, objectness, class scores;
      ``model(x, augment=True)`` adds test-time augmentation (more rows N).
    ``x`` is (B, ch, H, W) float in [0, 1] with H and W multiples of the largest stride.

    ``nc`` and ``anchors`` (a count per level, e.g. from ``hyp.anchors``) override the YAML's values, and so do
    ``norm`` with ``norm_args`` and ``acnet`` (the YAML keys of the same names) when not None.
    """

    def __init__(
        self,
        cfg: Mapping[str, Any] | str | Path = "yolov5s.yaml",
        ch: int = 3,
        nc: int | None = None,
        anchors: int | None = None,
        norm: str | None = None,
        norm_args: Mapping[str, Any] | None = None,
        acnet: bool | None = None,
    ) -> None:
        super().__init__()
        self.yaml, source = read_model_yaml(cfg)
        self.yaml.pop("yaml_file", None)
        _check_keys(self.yaml, source)
        in_channels = self.yaml.setdefault("ch", ch)
        if nc is not None and nc != self.yaml["nc"]:
            LOGGER.info("Overriding %s nc=%s with nc=%s", source, self.yaml["nc"], nc)
            self.yaml["nc"] = nc
        if anchors:
            LOGGER.info("Overriding %s anchors with %d anchors per level", source, round(anchors))
            self.yaml["anchors"] = round(anchors)
        self._override_layer_options(norm, norm_args, acnet, source)
        activation = parse_activation(self.yaml["activation"], source) if "activation" in self.yaml else None
        norm_spec = parse_norm(self.yaml.get("norm", "bn"), self.yaml.get("norm_args"), source)
        if not isinstance(self.yaml.get("acnet", False), bool):
            raise ConfigError(f"{source}: 'acnet' must be true or false, got {self.yaml['acnet']!r}")

        self.model, self.layers = parse_model(
            self.yaml, in_channels, source, activation, norm_spec, self.yaml.get("acnet", False)
        )
        self._saved_indices = frozenset(
            s for spec in self.layers for s in (spec.sources if isinstance(spec.sources, tuple) else (spec.sources,))
        ) - {-1}
        if not isinstance(self.model[-1], Detect):
            raise ConfigError(f"{source}: the last layer must be Detect, got {self.layers[-1].module_name}")
        self.names = [str(i) for i in range(self.yaml["nc"])]
        self.grad_checkpointing = False  # set_grad_checkpointing(): recompute layer activations in backward
        self._set_strides(in_channels, source)
        self.detect.initialize_biases()
        LOGGER.debug("%s\n%s", source, self.layer_table())

    def _override_layer_options(
        self, norm: str | None, norm_args: Mapping[str, Any] | None, acnet: bool | None, source: str
    ) -> None:
        """Write the ``norm``/``norm_args``/``acnet`` arguments over the YAML's keys (None keeps the YAML's)."""
        if norm is not None:
            LOGGER.info("Building %s with norm %r %s", source, norm, dict(norm_args or {}))
            self.yaml.pop("norm_args", None)
            self.yaml["norm"] = norm
            if norm_args:
                self.yaml["norm_args"] = dict(norm_args)
        if acnet is not None:
            self.yaml["acnet"] = acnet

    # -- structure ------------------------------------------------------------------------------------------------

    @property
    def detect(self) -> Detect:
        """The detection head (the last layer)."""
        return self.model[-1]

    @property
    def stride(self) -> Tensor:
        """(nl,) strides of the output levels in pixels, e.g. tensor([8., 16., 32.])."""
        return self.detect.stride

    @property
    def nc(self) -> int:
        return self.detect.nc

    def _set_strides(self, in_channels: int, source: str) -> None:
        """Measure each output level's stride with a dry pass on a small all-zero image.

        The probe starts at 64 px (cheap) and doubles while some level comes out 1x1, since a 1x1 map cannot tell
        a stride equal to the probe from a larger one (P6 needs 128, a P7 model 256).
        """
        was_training = self.training
        self.eval()  # eval: the all-zero probe must not disturb BatchNorm running statistics
        try:
            for probe_size in STRIDE_PROBE_SIZES:
                probe = torch.zeros(1, in_channels, probe_size, probe_size)
                with torch.no_grad():
                    raw = self.forward_raw(probe)
                if min(level.shape[2] for level in raw) >= 2:
                    break
        except RuntimeError as e:
            raise ConfigError(f"{source}: the model does not run on a {tuple(probe.shape)} input: {e}") from e
        finally:
            self.train(was_training)
        self.detect.set_strides(torch.tensor([probe_size / level.shape[2] for level in raw]))

    def layer_table(self) -> str:
        """One line per layer: index, from, repeats, parameters, module and its resolved args."""
        lines = [f"{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<20}arguments"]
        for spec in self.layers:
            shown_args = [a for a in spec.args if not isinstance(a, list) or len(a) < 6]  # skip long anchor lists
            lines.append(
                f"{spec.index:>3}{spec.sources!s:>18}{spec.repeats:>3}{spec.parameters:>10}  "
                f"{spec.module_name:<20}{shown_args}"
            )
        return "\n".join(lines)

    def set_grad_checkpointing(self, enable: bool = True) -> DetectionModel:
        """Activation (gradient) checkpointing in training, as timm's ``set_grad_checkpointing``: every layer with
        parameters before the Detect head (backbone and neck) keeps only its input for backward and recomputes its
        inside there (:func:`checkpointed_call`). The same gradients and BatchNorm statistics as without; for yolov5n
        at 320 a training step's peak memory falls by ~45% and the step takes ~1/3 longer (CPU). Eval mode and
        ``torch.no_grad`` are unaffected. Returns self."""
        self.grad_checkpointing = enable
        return self

    # -- forward --------------------------------------------------------------------------------------------------

    def forward(self, x: Tensor, augment: bool = False) -> Tensor | list[Tensor]:
        """Raw maps in training mode, decoded (B, N, 5 + nc) in eval mode (see the class docstring)."""
        # The TorchScript ONNX exporter passes defaults as tensors; a tensor here must not become Python control flow.
        if isinstance(augment, bool) and augment and not self.training:
            return self._forward_augment(x)
        raw = self.forward_raw(x)
        return raw if self.training else self.detect.decode(raw)

    def forward_raw(self, x: Tensor) -> list[Tensor]:
        """Raw per-level maps (B, na, H_i, W_i, 5 + nc) in any mode (one pass gives both loss and predictions)."""
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        outputs: list[Tensor | None] = []
        for spec, layer in zip(self.layers, self.model, strict=True):
            if isinstance(spec.sources, tuple):
                x = [x if j == -1 else outputs[j] for j in spec.sources]
            elif spec.sources != -1:
                x = outputs[spec.sources]
            # Layers without parameters (Concat, Upsample) save nothing worth recomputing; Detect's 1x1 convs
            # save only their inputs, which are kept anyway.
            recompute = checkpointing and spec.parameters > 0 and layer is not self.detect
            x = checkpointed_call(layer, x) if recompute else layer(x)
            outputs.append(x if spec.index in self._saved_indices else None)  # keep only what later layers read
        return x

    def layer_outputs(self, x: Tensor) -> list[tuple[int, str, Tensor]]:
        """What every layer before Detect outputs for ``x``: (layer index, module name, tensor), in layer order
        (detect.py ``--visualize``)."""
        outputs: list[tuple[int, str, Tensor]] = []

        def record(spec: LayerSpec) -> Callable[..., None]:
            return lambda _module, _inputs, output: outputs.append((spec.index, spec.module_name, output))

        hooks = [
            layer.register_forward_hook(record(spec))
            for spec, layer in zip(self.layers, self.model, strict=True)
            if layer is not self.detect
        ]
        try:
            self.forward_raw(x)
        finally:
            for hook in hooks:
                hook.remove()
        return outputs

    def _forward_augment(self, x: Tensor) -> Tensor:
        """Test-time augmentation of the decoded eval forward: :func:`augmented_forward` (shared with every backend)."""
        strides = [int(s) for s in self.stride.tolist()]
        return augmented_forward(lambda images: self.detect.decode(self.forward_raw(images)), x, strides)

    # -- inference helpers ----------------------------------------------------------------------------------------

    def fuse(self) -> DetectionModel:
        """Fold every Conv's BatchNorm (any norm of detector.models.norms, by its running statistics) into its conv
        weights, and every ACNet block's branches into one 3x3 conv, for inference. Returns self."""
        count = 0
        for module in list(self.modules()):  # a list: ACNet blocks drop their branches while folding
            if isinstance(module, Conv) and isinstance(module.bn, nn.BatchNorm2d):
                module.fuse()
                count += 1
        LOGGER.debug("Fused %d Conv+BatchNorm pairs", count)
        return self

    def info(self, imgsz: int = 640, verbose: bool = False) -> ModelInfo:
        """Log and return the layer count, parameters, gradients and GFLOPs at ``imgsz`` x ``imgsz``."""
        parameters = sum(p.numel() for p in self.parameters())
        gradients = sum(p.numel() for p in self.parameters() if p.requires_grad)
        layers = sum(1 for _ in self.modules())
        gflops = count_gflops(self, imgsz)
        if verbose:
            LOGGER.info("%s", self.layer_table())
        flops_text = f", {gflops:.1f} GFLOPs at {imgsz}" if gflops is not None else ""
        LOGGER.info(
            "Model summary: %d layers, %s parameters, %s gradients%s",
            layers,
            f"{parameters:,}",
            f"{gradients:,}",
            flops_text,
        )
        return ModelInfo(layers, parameters, gradients, gflops, imgsz)


def detect_head(model: nn.Module) -> nn.Module:
    """The Detect head of a model: unwraps DDP/DataParallel, then ``model.detect``, or ``model`` itself."""
    model = unwrap_model(model)
    head = getattr(model, "detect", model)
    missing = [name for name in ("nl", "na", "nc", "anchors", "stride") if not hasattr(head, name)]
    if missing:
        raise TypeError(f"{type(model).__name__} has no Detect head: missing {', '.join(missing)}")
    return head


def scale_image(images: Tensor, ratio: float, multiple: int = 32) -> Tensor:
    """Resize (B, C, H, W) images by ``ratio`` (bilinear) and pad right/bottom with grey to multiples of ``multiple``.

    The content keeps its top-left origin, so boxes predicted on the result map back by dividing by ``ratio``.
    """
    if ratio == 1.0:
        return images
    height, width = images.shape[-2:]
    new_size = (int(height * ratio), int(width * ratio))
    resized = F.interpolate(images, size=new_size, mode="bilinear", align_corners=False)
    padded_height = math.ceil(height * ratio / multiple) * multiple
    padded_width = math.ceil(width * ratio / multiple) * multiple
    padding = [0, padded_width - new_size[1], 0, padded_height - new_size[0]]
    return F.pad(resized, padding, value=TTA_PAD_VALUE)


def augmented_forward(forward: Callable[[Tensor], Tensor], images: Tensor, strides: Sequence[int]) -> Tensor:
    """Test-time augmentation around any decoded forward: the one implementation behind ``model(x, augment=True)``
    and ``backend(images, augment=True)`` of every weight format.

    ``forward`` maps (B, 3, h, w) images to decoded (B, N, 5 + nc) predictions (xywh pixels, objectness, class
    scores), level by level in ``strides`` order. It runs at scales 1, 0.83 (flipped left-right) and 0.67
    (:func:`scale_image`, padded to multiples of the largest stride); each pass's boxes are mapped back to
    ``images``' pixels and the passes are concatenated along N. As YOLOv5 does, the largest-stride level is dropped
    at scale 1 and the smallest-stride level at the smallest scale, where objects are the wrong size for them.
    ``strides`` with one value (a single level, or a backend whose levels are unknown) keeps every row.
    """
    width = images.shape[-1]
    max_stride = max(int(s) for s in strides)
    outputs = []
    for i, (scale, flip) in enumerate(zip(TTA_SCALES, TTA_FLIPS, strict=True)):
        scaled = scale_image(images.flip(-1) if flip == "lr" else images, scale, multiple=max_stride)
        predictions = forward(scaled)
        boxes = predictions[..., :4] / scale
        if flip == "lr":
            boxes = torch.cat((width - boxes[..., :1], boxes[..., 1:]), -1)
        predictions = torch.cat((boxes, predictions[..., 4:]), -1)
        if len(strides) > 1 and i in (0, len(TTA_SCALES) - 1):
            level_rows = _rows_per_level(predictions.shape[1], scaled.shape[-2:], strides)
            predictions = predictions[:, : -level_rows[-1]] if i == 0 else predictions[:, level_rows[0] :]
        outputs.append(predictions)
    return torch.cat(outputs, 1)


def _rows_per_level(num_rows: int, size: Sequence[int], strides: Sequence[int]) -> list[int]:
    """Prediction rows of each output level for an input of ``size`` (h, w): anchors x grid cells of the level."""
    cells = [(int(size[0]) // int(s)) * (int(size[1]) // int(s)) for s in strides]
    anchors, remainder = divmod(num_rows, sum(cells))
    if remainder or anchors < 1:
        raise ValueError(f"{num_rows} prediction rows do not fit levels of strides {list(strides)} at {list(size)}")
    return [anchors * c for c in cells]


def count_gflops(model: DetectionModel, imgsz: int = 640) -> float | None:
    """Forward GFLOPs at (1, ch, imgsz, imgsz), as YOLOv5 reports them (2 x multiply-accumulates).

    Counted with torch's FlopCounterMode (convolutions and matrix products) on a small input of the largest
    stride and scaled by area, which is exact for convolutions. YOLOv5 counts with thop, which also charges each
    BatchNorm element 4 multiply-accumulates (8 FLOPs); that term is added so unfused figures agree with YOLOv5's
    (4.6 GFLOPs for yolov5n unfused, 4.5 fused, where the count is convolutions only).
    """
    from torch.utils.flop_counter import FlopCounterMode

    # Any multiple of the largest stride gives exact figures; a model on the meta device has no stride values.
    probe_size = STRIDE_PROBE_SIZES[-1] if model.stride.is_meta else max(int(model.stride.max()), 32)
    parameter = next(model.parameters())
    probe = torch.zeros(1, model.yaml["ch"], probe_size, probe_size, device=parameter.device, dtype=parameter.dtype)
    batchnorm_elements = 0

    def count_batchnorm(_module: nn.Module, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        nonlocal batchnorm_elements
        batchnorm_elements += inputs[0].numel()

    hooks = [m.register_forward_hook(count_batchnorm) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.forward_raw(probe)
    except RuntimeError as e:  # a summary must never stop training; report the count as unknown instead
        LOGGER.debug("GFLOPs not counted: %s", e)
        return None
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    flops = counter.get_total_flops() + 8 * batchnorm_elements
    return flops / 1e9 * (imgsz / probe_size) ** 2
