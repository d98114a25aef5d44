"""Building blocks of YOLOv5-style models, each registered under the name that model YAML files use.

All tensors are NCHW float feature maps. Submodule attribute names (``conv``, ``bn``, ``act``, ``cv1``, ``m``...)
deliberately follow YOLOv5's so that state-dict keys line up with YOLOv5 checkpoints (``model.2.cv1.conv.weight``)
and its weights load by name; everything else (arguments, variables) uses full names.

Adding a block is one class here with ``@register`` and, when it has channel arguments, the class attributes
described in :mod:`detector.models.registry` (``scales_width``, ``takes_repeats``, ...). Nothing else changes.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from detector.models.norms import conv_norm
from detector.models.registry import register

ActivationFactory = Callable[[], nn.Module]

BN_EPS = 1e-3  # YOLOv5's BatchNorm settings: the released weights were trained (and must be run) with these
BN_MOMENTUM = 0.03


def _in_place(module: nn.Module, x: Tensor) -> bool:
    """Whether an activation built with ``inplace=True`` may overwrite ``x``: only where autograd records nothing.

    SiLU's, Hardswish's and Mish's gradients need their input, so in place under autograd PyTorch first copies the
    input for backward: no memory saved, one more pass over the map (about 3% of a yolov5n training step on a CPU).
    """
    return module.inplace and not (torch.is_grad_enabled() and x.requires_grad)


class SiLU(nn.SiLU):
    """``nn.SiLU`` that works in place (``inplace=True``) in inference only; see :func:`_in_place`."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.silu(x, inplace=_in_place(self, x))


class Hardswish(nn.Hardswish):
    """``nn.Hardswish`` that works in place (``inplace=True``) in inference only; see :func:`_in_place`."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.hardswish(x, inplace=_in_place(self, x))


class Mish(nn.Mish):
    """``nn.Mish`` that works in place (``inplace=True``) in inference only; see :func:`_in_place`."""

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.mish(x, inplace=_in_place(self, x))


def default_activation() -> nn.Module:
    """SiLU, YOLOv5's activation since v4.0; in place in inference, where no map is needed twice."""
    return SiLU(inplace=True)


def autopad(kernel_size: int | Sequence[int], padding: int | Sequence[int] | None = None, dilation: int = 1):
    """'Same' padding for odd kernels at stride 1: half the (dilated) kernel size, unless given explicitly."""
    if padding is not None:
        return padding
    if isinstance(kernel_size, int):
        return (dilation * (kernel_size - 1) + 1) // 2
    return [(dilation * (k - 1) + 1) // 2 for k in kernel_size]


def _activation_module(act: bool | nn.Module, activation: ActivationFactory) -> nn.Module:
    if isinstance(act, nn.Module):
        return act
    return activation() if act else nn.Identity()


def explicit_widths(hidden_channels: Sequence[int], count: int, block: str) -> list[int]:
    """Check a block's explicit inner widths (``hidden_channels``, written by pruning): ``count`` positive ints."""
    widths = list(hidden_channels)
    if len(widths) != count or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ValueError(f"{block} needs {count} positive inner channel counts, got {widths}")
    return widths


@register
class Conv(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d(eps=1e-3, momentum=0.03) -> activation. (B, C_in, H, W) -> (B, C_out, H/s, W/s).

    ``act``: True for the model's activation, False for none, or a module to use as is. The model builder may
    replace ``bn`` by a BatchNorm2d subclass of :mod:`detector.models.norms` (the model's ``norm``).
    """

    scales_width = True
    takes_activation = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 1,
        stride: int = 1,
        padding: int | Sequence[int] | None = None,
        groups: int = 1,
        dilation: int = 1,
        act: bool | nn.Module = True,
        *,
        activation: ActivationFactory = default_activation,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            autopad(kernel_size, padding, dilation),
            groups=groups,
            dilation=dilation,
            bias=False,
        )
        self.bn: nn.Module = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act = _activation_module(act, activation)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(conv_norm(self.conv, self.bn, x))

    def fuse(self) -> None:
        """Fold the BatchNorm into the conv's weight and bias (inference only: BN statistics stop updating)."""
        if not isinstance(self.bn, nn.BatchNorm2d):
            return
        fused = copy.deepcopy(self.conv)
        fused.weight, fused.bias = fuse_conv_bn_weights(
            self.conv.weight,
            self.conv.bias,
            self.bn.running_mean,
            self.bn.running_var,
            self.bn.eps,
            self.bn.weight,
            self.bn.bias,
        )
        self.conv = fused
        self.bn = nn.Identity()


@register
class DWConv(Conv):
    """Depth-wise convolution: a Conv whose groups are gcd(C_in, C_out) (= C for C_in == C_out)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        dilation: int = 1,
        act: bool | nn.Module = True,
        *,
        activation: ActivationFactory = default_activation,
    ) -> None:
        groups = math.gcd(in_channels, out_channels)
        super().__init__(
            in_channels, out_channels, kernel_size, stride, None, groups, dilation, act, activation=activation
        )


@register
class Bottleneck(nn.Module):
    """1x1 Conv -> 3x3 Conv, plus the input when ``shortcut`` and the channel counts agree.

    ``hidden_channels``: ``[cv1's width]`` instead of ``out_channels * expansion`` (pruned models).
    """

    scales_width = True
    takes_activation = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        shortcut: bool = True,
        groups: int = 1,
        expansion: float = 0.5,
        *,
        activation: ActivationFactory = default_activation,
        hidden_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        hidden = int(out_channels * expansion)
        if hidden_channels is not None:
            (hidden,) = explicit_widths(hidden_channels, 1, "Bottleneck")
        self.cv1 = Conv(in_channels, hidden, 1, 1, activation=activation)
        self.cv2 = Conv(hidden, out_channels, 3, 1, groups=groups, activation=activation)
        self.add = shortcut and in_channels == out_channels
        self.drop_path: nn.Module = nn.Identity()  # stochastic depth (detector.models.regularization); no weights

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv2(self.cv1(x))
        return x + self.drop_path(y) if self.add else y


@register
class C3(nn.Module):
    """CSP block with 3 convs: two 1x1 branches, one through ``repeats`` bottlenecks, concatenated and mixed by a 1x1.

    (B, C_in, H, W) -> (B, C_out, H, W); the branches have ``int(C_out * expansion)`` channels.

    ``hidden_channels`` (pruned models, plain C3 only) gives every inner width instead: cv1, cv2, then each
    bottleneck's cv1 and cv2 (``2 + 2 * repeats`` numbers); with ``shortcut`` a bottleneck's output must keep its
    input's width (the residual add).
    """

    scales_width = True
    takes_repeats = True
    takes_activation = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        repeats: int = 1,
        shortcut: bool = True,
        groups: int = 1,
        expansion: float = 0.5,
        *,
        activation: ActivationFactory = default_activation,
        hidden_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if hidden_channels is not None:
            self._explicit_blocks(in_channels, out_channels, repeats, shortcut, groups, activation, hidden_channels)
            return
        hidden = int(out_channels * expansion)
        self.cv1 = Conv(in_channels, hidden, 1, 1, activation=activation)
        self.cv2 = Conv(in_channels, hidden, 1, 1, activation=activation)
        self.cv3 = Conv(2 * hidden, out_channels, 1, activation=activation)
        self.m = self._inner_blocks(hidden, repeats, shortcut, groups, activation)

    def _explicit_blocks(
        self,
        in_channels: int,
        out_channels: int,
        repeats: int,
        shortcut: bool,
        groups: int,
        activation: ActivationFactory,
        hidden_channels: Sequence[int],
    ) -> None:
        """The same modules (same state-dict names) with the inner widths ``hidden_channels`` lists."""
        if type(self)._inner_blocks is not C3._inner_blocks:
            raise ValueError(f"{type(self).__name__} takes no explicit inner channel counts (only plain C3 does)")
        widths = explicit_widths(hidden_channels, 2 + 2 * repeats, type(self).__name__)
        self.cv1 = Conv(in_channels, widths[0], 1, 1, activation=activation)
        self.cv2 = Conv(in_channels, widths[1], 1, 1, activation=activation)
        blocks, channels = [], widths[0]
        for index in range(repeats):
            hidden, block_out = widths[2 + 2 * index], widths[3 + 2 * index]
            if shortcut and block_out != channels:
                raise ValueError(
                    f"C3 bottleneck {index}: with a shortcut its output must keep its input's {channels} channels "
                    f"(residual add), got {block_out}"
                )
            blocks.append(
                Bottleneck(channels, block_out, shortcut, groups, activation=activation, hidden_channels=[hidden])
            )
            channels = block_out
        self.cv3 = Conv(channels + widths[1], out_channels, 1, activation=activation)
        self.m = nn.Sequential(*blocks)  # after cv3, as in __init__: the state dict keeps its usual order

    def _inner_blocks(
        self, hidden: int, repeats: int, shortcut: bool, groups: int, activation: ActivationFactory
    ) -> nn.Module:
        """The repeated part of the main branch; C3 variants override only this."""
        blocks = (Bottleneck(hidden, hidden, shortcut, groups, 1.0, activation=activation) for _ in range(repeats))
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.cv3(torch.cat((self.m(self.cv1(x)), self.cv2(x)), 1))


@register
class SPPF(nn.Module):
    """Spatial pyramid pooling, fast: three chained k x k max-pools (same result as SPP with k, 2k-1, 3k-2).

    ``hidden_channels``: ``[cv1's width]`` instead of ``C_in // 2`` (pruned models).
    """

    scales_width = True
    takes_activation = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 5,
        *,
        activation: ActivationFactory = default_activation,
        hidden_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        hidden = in_channels // 2
        if hidden_channels is not None:
            (hidden,) = explicit_widths(hidden_channels, 1, type(self).__name__)
        self.cv1 = Conv(in_channels, hidden, 1, 1, activation=activation)
        self.cv2 = Conv(hidden * 4, out_channels, 1, 1, activation=activation)
        self.m = nn.MaxPool2d(kernel_size=kernel_size, stride=1, padding=kernel_size // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        pooled1 = self.m(x)
        pooled2 = self.m(pooled1)
        return self.cv2(torch.cat((x, pooled1, pooled2, self.m(pooled2)), 1))


@register
class SPP(nn.Module):
    """Spatial pyramid pooling (YOLOv3-SPP): parallel max-pools of the given kernel sizes, concatenated.

    ``hidden_channels``: ``[cv1's width]`` instead of ``C_in // 2`` (pruned models).
    """

    scales_width = True
    takes_activation = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_sizes: Sequence[int] = (5, 9, 13),
        *,
        activation: ActivationFactory = default_activation,
        hidden_channels: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        hidden = in_channels // 2
        if hidden_channels is not None:
            (hidden,) = explicit_widths(hidden_channels, 1, type(self).__name__)
        self.cv1 = Conv(in_channels, hidden, 1, 1, activation=activation)
        self.cv2 = Conv(hidden * (len(kernel_sizes) + 1), out_channels, 1, 1, activation=activation)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2) for k in kernel_sizes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.cv1(x)
        return self.cv2(torch.cat([x, *(pool(x) for pool in self.m)], 1))


@register
class Focus(nn.Module):
    """Space-to-depth (each 2x2 pixel block becomes 4 channels) then a Conv: (B, C, H, W) -> (B, C_out, H/2, W/2)."""

    scales_width = True
    takes_activation = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        act: bool | nn.Module = True,
        *,
        activation: ActivationFactory = default_activation,
    ) -> None:
        super().__init__()
        self.conv = Conv(
            4 * in_channels, out_channels, kernel_size, stride, padding, groups, act=act, activation=activation
        )

    def forward(self, x: Tensor) -> Tensor:
        # Channel order (even-even, odd-even, even-odd, odd-odd rows/cols) is the one YOLOv5's weights expect.
        return self.conv(torch.cat((x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]), 1))


@register
class Concat(nn.Module):
    """Concatenate a list of feature maps along ``dimension`` (channels by default)."""

    concatenates_inputs = True

    def __init__(self, dimension: int = 1) -> None:
        super().__init__()
        self.d = dimension

    def forward(self, x: list[Tensor]) -> Tensor:
        return torch.cat(x, self.d)


_UPSAMPLE_MODES = ("nearest", "linear", "bilinear", "bicubic", "trilinear", "nearest-exact")


@register(names=("nn.Upsample",))
class Upsample(nn.Upsample):
    """torch's nn.Upsample under its YAML name ``nn.Upsample``; YAML args are ``[size, scale_factor, mode]``."""

    accepts_strings = True  # the interpolation mode, e.g. 'nearest'

    def __init__(
        self, size: int | None = None, scale_factor: float | None = None, mode: str = "nearest", *args, **kwargs
    ) -> None:
        if mode not in _UPSAMPLE_MODES:
            raise ValueError(f"Upsample mode must be one of {list(_UPSAMPLE_MODES)}, got {mode!r}")
        super().__init__(size, scale_factor, mode, *args, **kwargs)


@register
class GhostConv(nn.Module):
    """Ghost convolution (Han et al., 2020): half the channels from a Conv, the other half from a cheap 5x5 depth-wise
    Conv of those, concatenated. (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    scales_width = True
    takes_activation = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: bool | nn.Module = True,
        *,
        activation: ActivationFactory = default_activation,
    ) -> None:
        super().__init__()
        hidden = out_channels // 2
        self.cv1 = Conv(in_channels, hidden, kernel_size, stride, None, groups, act=act, activation=activation)
        self.cv2 = Conv(hidden, hidden, 5, 1, None, hidden, act=act, activation=activation)

    def forward(self, x: Tensor) -> Tensor:
        y = self.cv1(x)
        return torch.cat((y, self.cv2(y)), 1)


@register
class GhostBottleneck(nn.Module):
    """GhostNet bottleneck: GhostConv -> (depth-wise stride-2 Conv) -> GhostConv, plus a shortcut."""

    scales_width = True
    takes_activation = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        activation: ActivationFactory = default_activation,
    ) -> None:
        super().__init__()
        hidden = out_channels // 2
        self.conv = nn.Sequential(
            GhostConv(in_channels, hidden, 1, 1, activation=activation),
            DWConv(hidden, hidden, kernel_size, stride, act=False) if stride == 2 else nn.Identity(),
            GhostConv(hidden, out_channels, 1, 1, act=False),
        )
        self.shortcut = (
            nn.Sequential(
                DWConv(in_channels, in_channels, kernel_size, stride, act=False),
                Conv(in_channels, out_channels, 1, 1, act=False),
            )
            if stride == 2
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.shortcut(x)


@register
class C3Ghost(C3):
    """C3 whose repeated blocks are GhostBottlenecks."""

    def _inner_blocks(
        self, hidden: int, repeats: int, shortcut: bool, groups: int, activation: ActivationFactory
    ) -> nn.Module:
        return nn.Sequential(*(GhostBottleneck(hidden, hidden, activation=activation) for _ in range(repeats)))


class TransformerLayer(nn.Module):
    """Transformer encoder layer without LayerNorm (as in YOLOv5's C3TR): self-attention and a 2-layer MLP, both
    residual. x: (sequence, batch, channels) -> same shape."""

    def __init__(self, channels: int, num_heads: int) -> None:
        super().__init__()
        self.q = nn.Linear(channels, channels, bias=False)
        self.k = nn.Linear(channels, channels, bias=False)
        self.v = nn.Linear(channels, channels, bias=False)
        self.ma = nn.MultiheadAttention(embed_dim=channels, num_heads=num_heads)
        self.fc1 = nn.Linear(channels, channels, bias=False)
        self.fc2 = nn.Linear(channels, channels, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        x = self.ma(self.q(x), self.k(x), self.v(x))[0] + x
        return self.fc2(self.fc1(x)) + x


class TransformerBlock(nn.Module):
    """Vision transformer over the pixels of a feature map: (B, C_in, H, W) -> (B, C_out, H, W).

    Each pixel is a token; a learned linear position embedding is added before ``num_layers`` TransformerLayers.
    """

    def __init__(self, in_channels: int, out_channels: int, num_heads: int, num_layers: int) -> None:
        super().__init__()
        self.conv = Conv(in_channels, out_channels) if in_channels != out_channels else None
        self.linear = nn.Linear(out_channels, out_channels)
        self.tr = nn.Sequential(*(TransformerLayer(out_channels, num_heads) for _ in range(num_layers)))
        self.c2 = out_channels

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None:
            x = self.conv(x)
        batch, _, height, width = x.shape
        tokens = x.flatten(2).permute(2, 0, 1)  # (H*W, B, C)
        tokens = self.tr(tokens + self.linear(tokens))
        return tokens.permute(1, 2, 0).reshape(batch, self.c2, height, width)


@register
class C3TR(C3):
    """C3 whose repeated part is a 4-head TransformerBlock of ``repeats`` layers."""

    def _inner_blocks(
        self, hidden: int, repeats: int, shortcut: bool, groups: int, activation: ActivationFactory
    ) -> nn.Module:
        return TransformerBlock(hidden, hidden, num_heads=4, num_layers=repeats)
