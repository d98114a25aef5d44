"""Optimiser and gradient accumulation with YOLOv5's conventions.

- Three parameter groups, named in ``group["name"]``: ``bias`` (no weight decay), ``weight`` (decay) and
  ``norm`` (BatchNorm and other normalisation weights, no decay: decaying a scale only fights the next layer).
- A nominal batch (TrainConfig ``nbs``, YOLOv5's 64): smaller batches accumulate gradients over
  ``accumulate_steps(batch_size, nbs)`` steps and the weight decay is rescaled by the effective batch, so one
  hyperparameter file fits every batch size. The nominal batch has no default here: the caller passes the config's.
- Gradient clipping before each step (:func:`clip_gradients`): each element to ``[-clip_value, clip_value]``,
  then the total L2 norm to ``clip_grad`` (TrainConfig; YOLOv5 clips the norm at 10).
- Learning-rate schedules and warmup live in :mod:`detector.engine.schedules`; SAM in :mod:`detector.engine.sam`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from detector.errors import ConfigError

LOGGER = logging.getLogger(__name__)

MIN_WARMUP_ITERATIONS = 100
OPTIMIZER_NAMES = ("SGD", "Adam", "AdamW")
ADAM_BETA2 = 0.999

# Every normalisation layer with a learnable scale; their weights are not decayed.
NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.LayerNorm,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

LrLambda = Callable[[float], float]


def parameter_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Parameters split into {"bias": [...], "weight": [...], "norm": [...]}.

    ``bias``: every parameter named ``bias``; ``norm``: weights of :data:`NORM_LAYERS`; ``weight``: all other
    parameters (conv/linear weights and any other learnable tensor). Frozen parameters are included (they receive
    no gradient and the optimiser skips them), so unfreezing later needs no new optimiser.
    """
    groups: dict[str, list[nn.Parameter]] = {"bias": [], "weight": [], "norm": []}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if name == "bias":
                groups["bias"].append(parameter)
            elif name == "weight" and isinstance(module, NORM_LAYERS):
                groups["norm"].append(parameter)
            else:
                groups["weight"].append(parameter)
    return groups


def build_optimizer(
    model: nn.Module,
    name: str = "SGD",
    lr: float = 0.01,
    momentum: float = 0.937,
    weight_decay: float = 5e-4,
) -> torch.optim.Optimizer:
    """SGD (Nesterov), Adam or AdamW (betas = (momentum, 0.999)) over the groups of :func:`parameter_groups`, in
    the order bias, weight, norm; only ``weight`` has ``weight_decay``. Uses the fused implementation where torch
    has one for the parameters' device (same results, one kernel for all tensors: much faster on CPU too).
    """
    if name not in OPTIMIZER_NAMES:
        raise ConfigError(f"--optimizer {name!r}: expected one of {', '.join(OPTIMIZER_NAMES)}")
    groups = parameter_groups(model)
    param_groups = [
        {"name": "bias", "params": groups["bias"], "weight_decay": 0.0},
        {"name": "weight", "params": groups["weight"], "weight_decay": weight_decay},
        {"name": "norm", "params": groups["norm"], "weight_decay": 0.0},
    ]
    if name == "SGD":
        optimizer_class, options = torch.optim.SGD, {"momentum": momentum, "nesterov": True}
    else:
        optimizer_class = torch.optim.Adam if name == "Adam" else torch.optim.AdamW
        options = {"betas": (momentum, ADAM_BETA2)}
    optimizer = _construct(optimizer_class, param_groups, lr=lr, **options)
    LOGGER.info(
        "optimizer: %s(lr=%g) with parameter groups %d weight (decay=%g), %d norm weight (no decay), %d bias",
        name,
        lr,
        len(groups["weight"]),
        weight_decay,
        len(groups["norm"]),
        len(groups["bias"]),
    )
    return optimizer


def _construct(
    optimizer_class: type[torch.optim.Optimizer], param_groups: list[dict], **options
) -> torch.optim.Optimizer:
    """The optimiser with ``fused=True`` when every parameter is a float tensor on a device torch fuses for."""
    parameters = [p for group in param_groups for p in group["params"]]
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters)
    if fusable:
        try:
            return optimizer_class(param_groups, fused=True, **options)
        except (RuntimeError, TypeError, ValueError) as error:  # older torch: no fused kernel for this device
            LOGGER.debug("fused %s unavailable (%s); using the default implementation", optimizer_class.__name__, error)
    return optimizer_class(param_groups, **options)


def accumulate_steps(batch_size: int, nominal_batch_size: int) -> int:
    """Optimiser steps happen every ``max(round(nominal / batch_size), 1)`` batches (gradient accumulation)."""
    return max(round(nominal_batch_size / batch_size), 1)


def scaled_weight_decay(weight_decay: float, batch_size: int, accumulate: int, nominal_batch_size: int) -> float:
    """Weight decay for an effective batch of ``batch_size * accumulate`` (hyp files state it for the nominal batch)."""
    return weight_decay * batch_size * accumulate / nominal_batch_size


def gradient_norm(gradients: Sequence[Tensor]) -> Tensor:
    """The L2 norm of all ``gradients`` together (non-finite when any element is); 0 when there are none."""
    if not gradients:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in gradients]))


def clip_gradients(parameters: Iterable[nn.Parameter], max_norm: float, max_value: float) -> Tensor:
    """Clip the parameters' gradients before an optimizer step; returns their total L2 norm as they came.

    ``max_value`` > 0: each element clipped to ``[-max_value, max_value]`` (``clip_grad_value_``); then ``max_norm``
    > 0: the whole rescaled to a norm of at most ``max_norm`` (``clip_grad_norm_``), so both bounds hold. 0 turns
    either off. The norm returned is taken before any clipping, so an inf or NaN gradient shows in it even when
    value clipping would have hidden the inf.
    """
    parameters = [p for p in parameters if p.grad is not None]
    if max_value <= 0 and max_norm > 0:
        return nn.utils.clip_grad_norm_(parameters, max_norm=max_norm)
    norm = gradient_norm([p.grad for p in parameters])
    if max_value > 0:
        nn.utils.clip_grad_value_(parameters, clip_value=max_value)
    if max_norm > 0:
        nn.utils.clip_grad_norm_(parameters, max_norm=max_norm)
    return norm
