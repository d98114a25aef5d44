"""Exponential moving average of a model's weights, evaluated and saved instead of the raw weights.

The average smooths the noise of the last optimiser steps. Its decay ramps up from 0 (``decay * (1 -
exp(-updates / tau))``) so the average follows the fast-changing weights early in training and settles later.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from detector.utils.torch_utils import unwrap_model


class ModelEMA:
    """Moving average of every floating-point parameter and buffer of a model; call :meth:`update` after each
    optimiser step. Integer buffers (BatchNorm ``num_batches_tracked``) are copied.

    ``ema`` is a frozen copy of the model in eval mode. ``updates`` counts the updates so far and sets the decay;
    save it with the average (:meth:`state_dict`) so a resumed run continues the same ramp.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0) -> None:
        self.ema = copy.deepcopy(unwrap_model(model)).eval()
        self.max_decay = decay
        self.tau = tau
        self.updates = updates
        for parameter in self.ema.parameters():
            parameter.requires_grad_(False)

    def decay(self, updates: int | None = None) -> float:
        """Decay after ``updates`` updates (default: the current count): ``max_decay * (1 - exp(-updates / tau))``."""
        updates = self.updates if updates is None else updates
        return self.max_decay * (1.0 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema = d * ema + (1 - d) * model for floating-point tensors, with d the decay after this update."""
        self.updates += 1
        decay = self.decay()
        model_state = unwrap_model(model).state_dict()
        averaged, current = [], []
        for name, ema_tensor in self.ema.state_dict().items():
            model_tensor = model_state[name].detach()
            if ema_tensor.dtype.is_floating_point:
                averaged.append(ema_tensor)
                current.append(model_tensor.to(ema_tensor))
            else:
                ema_tensor.copy_(model_tensor)
        # One fused kernel per group instead of two per tensor; lerp(a, b, w) = a + w * (b - a).
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - decay)

    def state_dict(self) -> dict[str, Any]:
        """{"ema": the averaged model's state dict, "updates": int}; the checkpoint's ``ema``/``ema_updates``."""
        return {"ema": self.ema.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (or a checkpoint's ``{"ema": ..., "updates": ...}``)."""
        self.ema.load_state_dict(state["ema"])
        self.updates = int(state["updates"])
