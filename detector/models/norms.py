"""Normalisation layers for small per-GPU batches, chosen by name (``--norm``, or a model YAML's ``norm`` key).

High-resolution images leave room for 1-2 images per GPU, where BatchNorm's batch statistics are noisy. Each
layer here is a :class:`torch.nn.BatchNorm2d` subclass that differs from it **only in training mode**:

- ``ghost``: Ghost BatchNorm (Hoffer et al. 2017): each virtual batch of ``virtual_batch_size`` images is
  normalised by its own statistics; the running statistics are updated from the whole batch, as BatchNorm does.
- ``brn``: Batch Renormalization (Ioffe 2017): the batch-normalised value is corrected towards the running
  statistics, ``x_hat * r + d`` with ``r = clip(sigma_B / sigma, 1/rmax, rmax)`` and ``d = clip((mu_B - mu) /
  sigma, -dmax, dmax)``, r and d without gradient; the bounds open linearly from (1, 0) (plain BatchNorm) to
  (``rmax``, ``dmax``) over the first ``renorm_warmup`` training batches.
- ``cbn``: Cross-Iteration BatchNorm (Yao et al. 2021): the statistics of the last ``window`` iterations are
  averaged, the earlier ones compensated to the current weights of the preceding convolution by a first-order
  Taylor step (see :class:`CrossIterationBatchNorm2d` for exactly what is computed).

In eval mode every one is plain BatchNorm with its running mean and variance, and their state dicts have
BatchNorm2d's keys: they fold into the convolutions like BatchNorm2d (``DetectionModel.fuse``, hence val.py,
detect.py and every export format), the EMA averages their buffers, and checkpoints load by name. Training
progress (the warm-up of ``brn``, the burn-in of ``cbn``) is counted by BatchNorm's own ``num_batches_tracked``
buffer, so it is saved in checkpoints and a resumed run continues it. SyncBatchNorm would replace them with plain
BatchNorm: ``--sync-bn`` is refused with any of them (:func:`check_norm_options`).

Models get a norm through :meth:`NormSpec.convert`, which the model builder (:func:`detector.models.yolo.parse_model`)
applies to each layer it builds: every plain BatchNorm2d is replaced, keeping its eps and momentum. A new norm is
one BatchNorm2d subclass registered with :func:`register_norm`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detector.errors import ConfigError

NormType = TypeVar("NormType", bound=type[nn.BatchNorm2d])

NORMS: dict[str, type[nn.BatchNorm2d]] = {"bn": nn.BatchNorm2d}


def register_norm(name: str) -> Callable[[NormType], NormType]:
    """Class decorator adding a BatchNorm2d subclass to :data:`NORMS` under ``name`` (twice is an error)."""

    def add(cls: NormType) -> NormType:
        if name in NORMS:
            raise ValueError(f"norm {name!r} is registered twice ({NORMS[name]!r} and {cls!r})")
        NORMS[name] = cls
        return cls

    return add


def get_norm(name: str) -> type[nn.BatchNorm2d]:
    """The norm class registered as ``name``; KeyError with the closest names when there is none."""
    if name not in NORMS:
        hint = difflib.get_close_matches(name, NORMS, n=1, cutoff=0.5)
        suggestion = f"did you mean {hint[0]!r}? " if hint else ""
        raise KeyError(f"unknown norm {name!r}; {suggestion}known: {', '.join(NORMS)}")
    return NORMS[name]


def norm_option_names(cls: type[nn.BatchNorm2d]) -> tuple[str, ...]:
    """The keyword options a norm class takes (its ``option_names``; none for plain BatchNorm2d)."""
    return tuple(getattr(cls, "option_names", ()))


class SmallBatchNorm2d(nn.BatchNorm2d):
    """Base of the norms here: BatchNorm2d in eval mode, its running statistics updated as BatchNorm2d updates them.

    Subclasses implement :meth:`forward_train` (CrossIterationBatchNorm2d overrides ``forward``, which also takes
    the conv weight) and list their keyword options in ``option_names`` (the keys of ``norm_args`` in a model YAML
    and of ``norm_options`` in a TrainConfig).
    """

    option_names: ClassVar[tuple[str, ...]] = ()
    recomputable: ClassVar[bool] = True  # the training forward may run twice per batch (--grad-checkpoint)
    compilable: ClassVar[bool] = True  # torch.compile can trace the training forward (--compile)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return super().forward(x)
        return self.forward_train(x)

    def forward_train(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def track(self, mean: Tensor, unbiased_var: Tensor) -> None:
        """Fold one batch's per-channel mean and unbiased variance into the running statistics (BatchNorm's rule)."""
        self.num_batches_tracked.add_(1)
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)

    def affine_parameters(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(weight, bias) as ``dtype``, ones and zeros when the norm is not affine."""
        if self.affine:
            return self.weight.to(dtype), self.bias.to(dtype)
        ones = torch.ones(self.num_features, dtype=dtype, device=self.running_mean.device)
        return ones, torch.zeros_like(ones)


def _per_channel(values: Tensor) -> Tensor:
    """(C,) -> (1, C, 1, 1), to broadcast over an NCHW batch."""
    return values.view(1, -1, 1, 1)


def _unbiased(var: Tensor, x: Tensor) -> Tensor:
    """The unbiased variance from the biased one over the N*H*W values per channel of ``x`` (BatchNorm's rule)."""
    count = x.numel() // x.shape[1]
    return var * (count / max(count - 1, 1))


@register_norm("ghost")
class GhostBatchNorm2d(SmallBatchNorm2d):
    """Ghost BatchNorm (Hoffer et al. 2017): in training, each run of ``virtual_batch_size`` images in the batch
    (the last may be shorter) is normalised by its own mean and variance. A batch no larger than that is plain
    BatchNorm. The running statistics are BatchNorm's, from the whole batch."""

    option_names = ("virtual_batch_size",)

    def __init__(self, num_features: int, *args: Any, virtual_batch_size: int = 16, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be a positive integer, got {virtual_batch_size!r}")
        self.virtual_batch_size = virtual_batch_size

    def forward_train(self, x: Tensor) -> Tensor:
        if x.shape[0] <= self.virtual_batch_size:
            return nn.BatchNorm2d.forward(self, x)  # BatchNorm2d's own training step
        weight, bias = (self.weight, self.bias) if self.affine else (None, None)
        ghosts = [
            F.batch_norm(chunk, None, None, weight, bias, True, 0.0, self.eps)
            for chunk in x.split(self.virtual_batch_size)
        ]
        var, mean = torch.var_mean(x.detach().float(), dim=(0, 2, 3), correction=1)
        self.track(mean, var)
        return torch.cat(ghosts)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"


@register_norm("brn")
class BatchRenorm2d(SmallBatchNorm2d):
    """Batch Renormalization (Ioffe 2017). In training, with batch mean mu_B and sigma_B = sqrt(var_B + eps) and
    the running sigma = sqrt(running_var + eps)::

        r = clip(sigma_B / sigma, 1 / rmax_t, rmax_t)          d = clip((mu_B - running_mean) / sigma, -dmax_t, dmax_t)
        y = weight * ((x - mu_B) / sigma_B * r + d) + bias     (r, d: no gradient)

    where the bounds open linearly with the training batches seen (``num_batches_tracked``, t):
    ``rmax_t = 1 + (rmax - 1) * min(t / renorm_warmup, 1)``, ``dmax_t = dmax * min(t / renorm_warmup, 1)``;
    at t = 0 (or rmax 1, dmax 0) this is BatchNorm. The running statistics are then updated as BatchNorm does.
    """

    option_names = ("rmax", "dmax", "renorm_warmup")

    def __init__(
        self,
        num_features: int,
        *args: Any,
        rmax: float = 3.0,
        dmax: float = 5.0,
        renorm_warmup: int = 5000,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_features, *args, **kwargs)
        if not (rmax >= 1.0 and dmax >= 0.0 and renorm_warmup >= 0):
            raise ValueError(f"need rmax >= 1, dmax >= 0, renorm_warmup >= 0; got {rmax}, {dmax}, {renorm_warmup}")
        self.rmax, self.dmax, self.renorm_warmup = float(rmax), float(dmax), int(renorm_warmup)

    def bounds(self) -> tuple[Tensor, Tensor]:
        """(rmax_t, dmax_t) at the current step, as tensors (no host-device sync)."""
        steps = self.num_batches_tracked.float()
        progress = (steps / self.renorm_warmup).clamp(max=1.0) if self.renorm_warmup else torch.ones_like(steps)
        return 1.0 + (self.rmax - 1.0) * progress, self.dmax * progress

    def forward_train(self, x: Tensor) -> Tensor:
        values = x.float()
        var, mean = torch.var_mean(values, dim=(0, 2, 3), correction=0)
        std = (var + self.eps).sqrt()
        running_std = (self.running_var.float() + self.eps).sqrt()
        rmax, dmax = self.bounds()
        r = torch.clamp(std.detach() / running_std, min=1.0 / rmax, max=rmax)
        d = torch.clamp((mean.detach() - self.running_mean.float()) / running_std, min=-dmax, max=dmax)
        weight, bias = self.affine_parameters(values.dtype)
        scale = weight * r / std  # y = x * scale + shift, the formula above in one multiply-add
        shift = bias + weight * d - mean * scale
        self.track(mean.detach(), _unbiased(var.detach(), x))
        return (values * _per_channel(scale) + _per_channel(shift)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, renorm_warmup={self.renorm_warmup}"


@dataclass
class _History:
    """The statistics of the last ``slots`` iterations of one CrossIterationBatchNorm2d, as a ring buffer.

    For a statistic s (mean or mean of squares) of iteration j, with weights W_j and derivative g_j = ds/dW at
    W_j, the compensated value at the current weights W is ``s_j + g_j . (W - W_j) = offset_j + g_j . W`` with
    ``offset_j = s_j - g_j . W_j``: storing the offset instead of W_j saves a copy of the weights per slot.
    """

    offset_mean: Tensor  # (slots, C)
    offset_meansq: Tensor  # (slots, C)
    grad_mean: Tensor  # (slots, C, K): d mean / d W, K = the weights of one output channel
    grad_meansq: Tensor  # (slots, C, K)
    filled: Tensor  # (slots,) bool
    next_slot: int = 0

    @classmethod
    def empty(cls, slots: int, weight: Tensor) -> _History:
        channels, per_channel = weight.shape[0], weight[0].numel()
        options = {"dtype": torch.float32, "device": weight.device}
        return cls(
            offset_mean=torch.zeros(slots, channels, **options),
            offset_meansq=torch.zeros(slots, channels, **options),
            grad_mean=torch.zeros(slots, channels, per_channel, **options),
            grad_meansq=torch.zeros(slots, channels, per_channel, **options),
            filled=torch.zeros(slots, dtype=torch.bool, device=weight.device),
        )

    def fits(self, weight: Tensor) -> bool:
        return self.grad_mean.shape[1:] == (weight.shape[0], weight[0].numel()) and self.filled.device == weight.device

    @torch.no_grad()
    def push(self, mean: Tensor, meansq: Tensor, grad_mean: Tensor, grad_meansq: Tensor, weight: Tensor) -> None:
        slot = self.next_slot
        self.grad_mean[slot] = grad_mean
        self.grad_meansq[slot] = grad_meansq
        self.offset_mean[slot] = mean - (grad_mean * weight).sum(-1)
        self.offset_meansq[slot] = meansq - (grad_meansq * weight).sum(-1)
        self.filled[slot] = True
        self.next_slot = (slot + 1) % len(self.filled)


@register_norm("cbn")
class CrossIterationBatchNorm2d(SmallBatchNorm2d):
    """Cross-Iteration BatchNorm (Yao et al. 2021), following the authors' reference code, in training:

    1. This batch's per-channel mean m_t and mean of squares q_t = var_t + m_t^2, and their derivatives with
       respect to the weight W of the convolution just before (``conv_weight``; autograd, two extra weight-gradient
       passes of that convolution). As in the paper only that convolution is compensated.
    2. For each of the previous ``window - 1`` iterations j: m_j(W_t) ~ m_j + dm_j/dW . (W_t - W_j) and
       q_j(W_t) likewise (first-order Taylor); a compensated pair with q < m^2 (a negative variance) is left out,
       per channel, as in the reference code.
    3. m = mean of m_t and the kept m_j(W_t); q likewise; var = max(q - m^2, 0); y = weight * (x - m) /
       sqrt(var + eps) + bias (eps inside the root, as BatchNorm). Gradients flow through this batch's statistics
       only; the earlier ones and their compensation are constants.

    The running statistics are BatchNorm's, from this batch alone. Plain BatchNorm is used for the first
    ``burnin`` training batches (weights change too fast then for a first-order step), with ``window`` 1, for
    a frozen or gradient-free forward, and when no ``conv_weight`` is passed. The window's statistics are kept in
    memory only (not in the state dict): a resumed run refills it over ``window - 1`` iterations. Extra memory:
    two copies of the convolution's weights per remembered iteration.
    """

    option_names = ("window", "burnin")
    recomputable = False  # a second forward of one batch would enter it in the window twice
    compilable = False  # autograd.grad and a Python step count inside forward; TorchDynamo fails on them

    def __init__(self, num_features: int, *args: Any, window: int = 8, burnin: int = 1000, **kwargs: Any) -> None:
        super().__init__(num_features, *args, **kwargs)
        for name, value, least in (("window", window, 1), ("burnin", burnin, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        self.window, self.burnin = window, burnin
        self._steps: int | None = None  # num_batches_tracked as a Python int, read once (one device sync)
        self._history: _History | None = None

    def forward(self, x: Tensor, conv_weight: Tensor | None = None) -> Tensor:
        if not self.training:
            return nn.BatchNorm2d.forward(self, x)
        if self._steps is None:
            self._steps = int(self.num_batches_tracked)
        compensate = (
            self.window > 1
            and self._steps >= self.burnin
            and conv_weight is not None
            and conv_weight.requires_grad
            and torch.is_grad_enabled()
        )
        self._steps += 1
        values = x.float()
        var, mean = torch.var_mean(values, dim=(0, 2, 3), correction=0)
        self.track(mean.detach(), _unbiased(var.detach(), x))
        if compensate:
            mean, var = self._window_statistics(mean, var + mean.square(), conv_weight)
        weight, bias = self.affine_parameters(values.dtype)
        scale = weight / (var + self.eps).sqrt()
        return (values * _per_channel(scale) + _per_channel(bias - mean * scale)).to(x.dtype)

    def _window_statistics(self, mean: Tensor, meansq: Tensor, conv_weight: Tensor) -> tuple[Tensor, Tensor]:
        """(mean, variance) over this iteration and the compensated earlier ones; remembers this iteration's."""
        grad_mean = torch.autograd.grad(mean.sum(), conv_weight, retain_graph=True)[0].float().flatten(1)
        grad_meansq = torch.autograd.grad(meansq.sum(), conv_weight, retain_graph=True)[0].float().flatten(1)
        weight = conv_weight.detach().float().flatten(1)  # (C, K)
        if self._history is None or not self._history.fits(conv_weight):
            self._history = _History.empty(self.window - 1, conv_weight)
        history = self._history
        past_mean = history.offset_mean + (history.grad_mean * weight).sum(-1)  # (slots, C)
        past_meansq = history.offset_meansq + (history.grad_meansq * weight).sum(-1)
        # NaN compares False: a non-finite remembered statistic is left out like a negative variance.
        kept = history.filled[:, None] & (past_meansq >= past_mean.square())
        count = 1 + kept.sum(0)
        window_mean = (mean + torch.where(kept, past_mean, 0.0).sum(0)) / count
        window_meansq = (meansq + torch.where(kept, past_meansq, 0.0).sum(0)) / count
        history.push(mean.detach(), meansq.detach(), grad_mean, grad_meansq, weight)
        return window_mean, (window_meansq - window_mean.square()).clamp(min=0.0)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._steps, self._history = None, None  # new weights and step count: the window starts again

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, window={self.window}, burnin={self.burnin}"


def conv_norm(conv: nn.Module, norm: nn.Module, x: Tensor) -> Tensor:
    """``norm(conv(x))``; a CrossIterationBatchNorm2d also gets the convolution's weight, which it compensates for."""
    if isinstance(norm, CrossIterationBatchNorm2d):
        return norm(conv(x), conv.weight)
    return norm(conv(x))


# --------------------------------------------------------------------------------------------------------------------
# Choosing a norm for a model


@dataclass(frozen=True)
class NormSpec:
    """A norm by name with its options: a model YAML's ``norm`` and ``norm_args`` keys, checked."""

    name: str = "bn"
    options: Mapping[str, Any] = field(default_factory=dict)

    def convert(self, module: nn.Module) -> None:
        """Replace every plain, affine, tracking BatchNorm2d inside ``module`` by this norm, keeping its eps,
        momentum, weights and statistics (nothing to do for ``bn``)."""
        cls = get_norm(self.name)
        if cls is nn.BatchNorm2d:
            return
        for parent in list(module.modules()):
            for child_name, child in parent.named_children():
                if type(child) is nn.BatchNorm2d and child.affine and child.track_running_stats:
                    norm = cls(child.num_features, eps=child.eps, momentum=child.momentum, **self.options)
                    norm.load_state_dict(child.state_dict())
                    setattr(parent, child_name, norm.to(child.weight.device, child.weight.dtype))


def parse_norm(name: Any, options: Any, source: str) -> NormSpec:
    """A model YAML's ``norm`` (a name in :data:`NORMS`) and ``norm_args`` (that norm's options) -> NormSpec;
    ConfigError naming ``source`` for an unknown name, option or a bad value."""
    try:
        cls = get_norm(str(name))
    except KeyError as e:
        raise ConfigError(f"{source}: norm: {e.args[0]}") from None
    options = {} if options is None else options
    if not isinstance(options, Mapping):
        raise ConfigError(f"{source}: norm_args must be a mapping of options, got {options!r}")
    known = norm_option_names(cls)
    for key in options:
        if key not in known:
            takes = f"takes {', '.join(known)}" if known else "takes no options"
            raise ConfigError(f"{source}: norm_args: {name!r} has no option {key!r} (it {takes})")
    try:
        cls(1, **options)  # the constructor checks the values
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: norm_args for {name!r}: {e}") from e
    return NormSpec(str(name), dict(options))


def norm_overrides(name: str, options: Any) -> dict[str, Any]:
    """TrainConfig's ``norm`` and ``norm_options`` -> DetectionModel keyword overrides: none for ``bn`` (the model
    YAML's own ``norm``, BatchNorm when it names none), else ``norm`` and the options that norm takes."""
    if name == "bn":
        return {}
    try:
        cls = get_norm(name)
    except KeyError as e:
        raise ConfigError(f"--norm: {e.args[0]}") from None
    return {"norm": name, "norm_args": {key: getattr(options, key) for key in norm_option_names(cls)}}


def check_norm_options(model: nn.Module, sync_bn: bool, grad_checkpoint: bool, torch_compile: bool = False) -> None:
    """One-line ConfigError for training options that would break ``model``'s norm: ``--sync-bn`` (SyncBatchNorm
    would silently make it plain BatchNorm) with any norm of this module, ``--grad-checkpoint`` (its recomputation
    in backward runs the forward again) with a norm whose training forward cannot run twice (``recomputable``),
    ``--compile`` with one torch.compile cannot trace (``compilable``)."""
    for module in model.modules():
        if not isinstance(module, SmallBatchNorm2d):
            continue
        name = next((key for key, cls in NORMS.items() if cls is type(module)), type(module).__name__)
        if sync_bn:
            raise ConfigError(
                f"--sync-bn would replace the model's {name!r} norm by plain SyncBatchNorm; train without --sync-bn"
            )
        if grad_checkpoint and not module.recomputable:
            raise ConfigError(
                f"--grad-checkpoint recomputes layers in backward, which the {name!r} norm cannot follow (it "
                "remembers each forward); train without one of them"
            )
        if torch_compile and not module.compilable:
            raise ConfigError(
                f"--compile cannot compile the {name!r} norm (autograd and Python state in its forward); train "
                "without one of them"
            )
