"""Regularisation that changes the model only while it trains: stochastic depth and dropout before the head.

Both are modules swapped into slots the blocks keep for them (``Bottleneck.drop_path``, ``Detect.dropout``, an
``nn.Identity`` by default); they hold no weights, are the identity in eval mode, and are not saved in checkpoints:
validation, export and a later ``load_model`` see the plain model. The trainer sets them from the hyp keys
``drop_path`` and ``dropout`` (a resumed run sets them again from its saved hyp).
"""

from __future__ import annotations

from torch import nn

from detector.models.blocks import Bottleneck


def set_stochastic_depth(model: nn.Module, rate: float) -> list[float]:
    """Stochastic depth (Huang et al. 2016) on every residual bottleneck of ``model``.

    In training, each bottleneck drops its residual branch for a whole sample with a probability rising linearly
    with its depth, from ``rate / n`` for the first of the ``n`` to ``rate`` for the last, and scales the kept
    branch by ``1 / (1 - p)`` (torchvision's ``StochasticDepth``, "row" mode); deep blocks refine, shallow ones
    build the features every later block needs. Returns the rates in model order (0 everywhere undoes it).
    """
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"stochastic depth rate must be in [0, 1), got {rate}")
    from torchvision.ops import StochasticDepth  # here: importing torchvision costs ~1.4 s (ops.torchvision_kernels)

    blocks = [module for module in model.modules() if isinstance(module, Bottleneck) and module.add]
    rates = [rate * (index + 1) / len(blocks) for index in range(len(blocks))]
    for block, probability in zip(blocks, rates, strict=True):
        block.drop_path = StochasticDepth(probability, "row") if probability > 0 else nn.Identity()
    return rates


def set_head_dropout(model: nn.Module, probability: float) -> None:
    """Dropout with ``probability`` on the features entering the detection head (``model.detect``), in training."""
    if not 0.0 <= probability < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {probability}")
    model.detect.dropout = nn.Dropout(probability) if probability > 0 else nn.Identity()
