"""Sparsity training (``--sparsity LAMBDA``), the first half of network slimming (Liu et al., 2017, "Learning
Efficient Convolutional Networks through Network Slimming"): an L1 penalty on every BatchNorm scale (gamma) pushes
the scales of unneeded channels towards zero, so that ``python -m detector.prune`` (:mod:`detector.prune`) can
remove those channels afterwards at little cost.

The penalty ``lambda_t * sum |gamma|`` enters as its subgradient: right before each optimizer step the hook adds
``lambda_t * sign(gamma)`` to the gradient of every BatchNorm scale (``nn.BatchNorm2d`` and its subclasses) that
trains. It runs on the trainer's ``on_before_optimizer_step`` event, which fires once per optimizer step, after
the accumulated gradients are complete, unscaled (AMP) and clipped, so:

- gradient accumulation adds it once per step, not once per batch; AMP's loss scale never multiplies it;
- it is not clipped, like weight decay (the BatchNorm group has none, YOLOv5's optimizer groups);
- under DDP it is added after the gradients are averaged, from gammas that are identical on every rank, so every
  rank adds the same amount and the replicas stay equal;
- the EMA follows the stepped weights as always; a resumed run recomputes ``lambda_t`` from its epoch (no state).

``lambda_t = lambda * (1 - 0.9 * epoch / epochs)`` decays linearly to a tenth at the end, so the last epochs can
settle the remaining weights with a weak penalty. ``lambda`` is in the units of our gradients: the summed loss
over the ``nbs`` (64) images of an optimizer step, YOLOv5's scale; 1e-4 to 1e-3 suits fine-tuning yolov5n/s.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from detector.engine.callbacks import Callback

if TYPE_CHECKING:
    from detector.engine.trainer import Trainer

LOGGER = logging.getLogger(__name__)

FINAL_FRACTION = 0.1  # lambda at the end of the run, as a fraction of --sparsity
SMALL_GAMMA = 0.01  # |gamma| below this counts as "near zero" in the epoch summary


def batchnorm_scales(model: nn.Module) -> list[nn.Parameter]:
    """The scale (gamma) of every affine BatchNorm of ``model`` (subclasses included), in module order."""
    return [m.weight for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]


@torch.no_grad()
def add_l1_subgradient(model: nn.Module, strength: float) -> int:
    """Add ``strength * sign(gamma)`` to the gradient of every BatchNorm scale that has one (frozen layers have
    none); the subgradient of ``strength * sum |gamma|``, 0 at gamma = 0. Returns the number of scales changed."""
    changed = 0
    for gamma in batchnorm_scales(model):
        if gamma.grad is not None:
            gamma.grad.add_(torch.sign(gamma), alpha=strength)
            changed += 1
    return changed


def sparsity_strength(strength: float, epoch: int, epochs: int) -> float:
    """``lambda_t``: ``strength`` at epoch 0, decaying linearly to ``FINAL_FRACTION * strength`` at ``epochs``."""
    return strength * (1.0 - (1.0 - FINAL_FRACTION) * epoch / max(epochs, 1))


class SparsityPenalty(Callback):
    """``--sparsity``: the L1 subgradient on BatchNorm scales before every optimizer step, and a one-line summary
    of how many scales are near zero after every epoch (what pruning will find)."""

    def __init__(self, strength: float) -> None:
        if strength < 0:
            raise ValueError(f"sparsity strength must be >= 0, got {strength}")
        self.strength = strength

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        state = trainer.state
        add_l1_subgradient(trainer.model, sparsity_strength(self.strength, state.epoch, state.epochs))

    def on_epoch_end(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        gammas = torch.cat([g.detach().abs().float().flatten() for g in batchnorm_scales(trainer.model)])
        if gammas.numel():
            LOGGER.info(
                "Sparsity (lambda %.3g): %.1f%% of %s BatchNorm scales below %g, median |gamma| %.3g",
                sparsity_strength(self.strength, trainer.state.epoch, trainer.state.epochs),
                100 * float((gammas < SMALL_GAMMA).float().mean()),
                f"{gammas.numel():,}",
                SMALL_GAMMA,
                float(gammas.median()),
            )
