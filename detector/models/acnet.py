"""ACNet (Ding et al. 2019): asymmetric convolution blocks that train with more weights and infer as one 3x3 conv.

In training, a 3x3 :class:`~detector.models.blocks.Conv` becomes :class:`ACConv`: the 3x3 conv and BatchNorm, plus
a 1x3 and a 3x1 conv, each with its own BatchNorm, on the same input with the same stride, summed before the
activation. The 1x3 kernel sees exactly the middle row of the 3x3 window and the 3x1 kernel its middle column, so
for inference (:meth:`ACConv.fuse`, called by ``DetectionModel.fuse`` and so by val.py, detect.py and export) each
branch's BatchNorm is folded into its conv, the 1x3 and 3x1 kernels are added into the middle row and column of the
3x3 kernel, and the three biases are summed: one 3x3 conv with a bias, the same outputs (to float rounding).

A model gets it through the model YAML key ``acnet: true`` (or ``--acnet``), which the model builder applies to
each layer (:func:`convert_to_acnet`). The 3x3 branch keeps the names ``conv`` and ``bn``, so weights of a plain
model (a YOLOv5 release) transfer into it by name; the new branches are ``conv_h``/``bn_h`` (1x3) and
``conv_v``/``bn_v`` (3x1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from detector.models.blocks import BN_EPS, BN_MOMENTUM, ActivationFactory, Conv, DWConv, default_activation
from detector.models.norms import conv_norm


def _is_square_3x3(conv: nn.Conv2d) -> bool:
    """A 3x3 conv with 'same' padding 1 and no dilation: the case whose asymmetric branches line up with it."""
    return conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.dilation == (1, 1)


class ACConv(Conv):
    """A 3x3 Conv with ACNet's parallel 1x3 and 3x1 branches in training: act(bn(3x3) + bn_h(1x3) + bn_v(3x1)).

    (B, C_in, H, W) -> (B, C_out, H/s, W/s), like the Conv it replaces (same stride and groups). After :meth:`fuse`
    it is one 3x3 conv with a bias and no BatchNorm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int = 1,
        padding: int | Sequence[int] | None = None,
        groups: int = 1,
        dilation: int = 1,
        act: bool | nn.Module = True,
        *,
        activation: ActivationFactory = default_activation,
    ) -> None:
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, groups, dilation, act, activation=activation
        )
        if not _is_square_3x3(self.conv):
            raise ValueError(
                f"ACConv needs a 3x3 kernel with padding 1 and dilation 1, got kernel {self.conv.kernel_size}, "
                f"padding {self.conv.padding}, dilation {self.conv.dilation}"
            )
        options = {"stride": stride, "groups": groups, "bias": False}
        self.conv_h: nn.Conv2d | None = nn.Conv2d(in_channels, out_channels, (1, 3), padding=(0, 1), **options)
        self.bn_h: nn.Module | None = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.conv_v: nn.Conv2d | None = nn.Conv2d(in_channels, out_channels, (3, 1), padding=(1, 0), **options)
        self.bn_v: nn.Module | None = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        # The asymmetric branches start silent (BatchNorm scales 0, as for the last BN of a residual branch, Goyal et
        # al. 2017): the block starts as its 3x3 conv, so converting a trained model (--acnet --weights yolov5n.pt)
        # keeps what it knows, and the scales grow from their gradients. Measured: with scales 1 a 2-epoch fine-tune
        # of yolov5n.pt on coco128 fell from mAP50-95 0.13 to 0.00.
        nn.init.zeros_(self.bn_h.weight)
        nn.init.zeros_(self.bn_v.weight)

    @classmethod
    def from_conv(cls, conv: Conv) -> ACConv:
        """An ACConv in place of ``conv`` (a 3x3 Conv or DWConv): its 3x3 branch and activation are ``conv``'s own
        (weights included), the asymmetric branches newly initialised."""
        square = conv.conv
        block = cls(square.in_channels, square.out_channels, 3, square.stride[0], 1, square.groups, 1, act=conv.act)
        block.conv.load_state_dict(square.state_dict())
        block.bn.load_state_dict(conv.bn.state_dict())
        return block.to(square.weight.device, square.weight.dtype)

    @property
    def folded(self) -> bool:
        """Whether :meth:`fuse` has made this one 3x3 conv."""
        return self.conv_h is None

    def forward(self, x: Tensor) -> Tensor:
        if self.folded:
            return self.act(self.conv(x))
        square = conv_norm(self.conv, self.bn, x)
        return self.act(square + conv_norm(self.conv_h, self.bn_h, x) + conv_norm(self.conv_v, self.bn_v, x))

    @torch.no_grad()
    def fuse(self) -> None:
        """Fold the three branches and their BatchNorms (eval statistics) into one 3x3 conv with a bias."""
        if self.folded:
            return
        weight, bias = self._folded_branch(self.conv, self.bn)
        weight_h, bias_h = self._folded_branch(self.conv_h, self.bn_h)
        weight_v, bias_v = self._folded_branch(self.conv_v, self.bn_v)
        weight[:, :, 1:2, :] += weight_h  # the 1x3 kernel is the middle row of the 3x3 window
        weight[:, :, :, 1:2] += weight_v  # the 3x1 kernel its middle column
        fused = nn.Conv2d(
            self.conv.in_channels,
            self.conv.out_channels,
            3,
            self.conv.stride,
            1,
            groups=self.conv.groups,
            bias=True,
        ).to(weight.device, weight.dtype)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias + bias_h + bias_v)
        self.conv, self.bn = fused, nn.Identity()
        self.conv_h = self.bn_h = self.conv_v = self.bn_v = None

    @staticmethod
    def _folded_branch(conv: nn.Conv2d, norm: nn.Module) -> tuple[Tensor, Tensor]:
        """(weight, bias) of ``conv`` with the BatchNorm ``norm`` (its running statistics) folded in."""
        weight, bias = fuse_conv_bn_weights(
            conv.weight, conv.bias, norm.running_mean, norm.running_var, norm.eps, norm.weight, norm.bias
        )
        return weight.detach().clone(), bias.detach().clone()


def convert_to_acnet(module: nn.Module) -> nn.Module:
    """``module`` with every 3x3 Conv/DWConv (padding 1, no dilation) inside it, or itself, replaced by an ACConv
    built from it (:meth:`ACConv.from_conv`). Returns the module, or the ACConv when ``module`` is such a Conv."""
    if _convertible(module):
        return ACConv.from_conv(module)
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if _convertible(child):
                setattr(parent, name, ACConv.from_conv(child))
    return module


def _convertible(module: nn.Module) -> bool:
    return (
        type(module) in (Conv, DWConv)
        and isinstance(module.conv, nn.Conv2d)
        and isinstance(module.bn, nn.BatchNorm2d)
        and _is_square_3x3(module.conv)
    )
