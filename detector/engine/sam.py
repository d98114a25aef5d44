"""Sharpness-aware minimisation around whatever optimizer a run builds: SAM (Foret et al. 2021,
https://arxiv.org/abs/2010.01412) and its adaptive variant ASAM (Kwon et al. 2021, https://arxiv.org/abs/2102.11600).

SAM minimises the worst loss in a small neighbourhood of the weights rather than the loss at the weights. Each step
has two forward/backward passes:

1. the gradient ``g`` at the weights ``w``;
2. the weights moved to the (first-order) worst point nearby, ``w + e(w)`` with ``e = rho * g / ||g||`` (ASAM:
   ``e = rho * |w|^2 * g / || |w| * g ||``, element-wise ``|w|``, so the radius is relative to each weight's size and
   a typical ``rho`` is ~10x SAM's); the gradient there is the one the optimizer uses;
3. the weights put back to ``w`` (copied, not ``w + e - e``, so they are bit-exact), then the optimizer steps.

``||g||`` is the L2 norm over all parameters together. Twice the compute per step; one extra copy of the weights.

Plain PyTorch use: ``SAM(optimizer, rho=0.05).step(closure)`` with a closure that returns the loss (forward only).
The trainer uses the pieces (:meth:`SAM.perturb`, :meth:`SAM.restore`) around its own forward/backward, so that
gradient accumulation, the GradScaler, clipping, the EMA and DDP work as without SAM (see
:meth:`detector.engine.trainer.Trainer.train_step`):

- the first pass's gradient is returned by ``torch.autograd.grad``, never accumulated into ``.grad``: gradients
  already accumulated for the coming optimizer step stay as they are, and under DDP the first pass runs in
  ``no_sync`` (no all-reduce), so each rank perturbs with its own batch's gradient - SAM's "m-sharpness", which
  Foret et al. found generalises as well or better than the whole batch's and costs no communication;
- with gradient accumulation, each batch gets its own two passes and the second-pass gradients accumulate: the
  common practical scheme (no batch is kept or recomputed; the perturbation of a batch is its own m-sharpness);
- with a GradScaler (fp16) the first pass's gradients are scaled: the scale cancels in ``g / ||g||`` (and in
  ASAM's ratio), so they need no unscaling; non-finite ones (an fp16 overflow, a NaN loss) leave the weights
  unperturbed, so the second pass repeats the first and the step is skipped by the usual rule (the GradScaler,
  or the trainer's non-finite check);
- SAM has no state between steps: nothing is checkpointed, and ``--resume`` continues as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from detector.engine.optim import gradient_norm
from detector.errors import ConfigError

EPSILON = 1e-12  # keeps e(w) finite (zero) when the gradient is zero


@torch.no_grad()
def sam_perturbation(
    weights: Sequence[Tensor], gradients: Sequence[Tensor], rho: float, adaptive: bool = False
) -> list[Tensor] | None:
    """SAM's ``e(w)`` per tensor: ``rho * g / ||g||``, or with ``adaptive`` ASAM's ``rho * w^2 * g / || |w| g ||``,
    the norm taken over all tensors together. None when a gradient is not finite (nothing should move then)."""
    scaled = [weight.abs() * grad for weight, grad in zip(weights, gradients, strict=True)] if adaptive else gradients
    norm = gradient_norm(scaled)
    if not torch.isfinite(norm):
        return None
    factor = rho / (norm + EPSILON)
    if adaptive:
        return [weight.abs() * scale * factor for weight, scale in zip(weights, scaled, strict=True)]
    return [grad * factor for grad in gradients]


class SAM:
    """SAM (or ASAM with ``adaptive``) around ``optimizer``: its parameters are perturbed, its ``step`` makes the
    update. ``rho`` is the neighbourhood radius (SAM 0.05; ASAM ~0.5)."""

    def __init__(self, optimizer: torch.optim.Optimizer, rho: float = 0.05, adaptive: bool = False) -> None:
        if rho <= 0:
            raise ConfigError(f"--sam: the neighbourhood radius rho must be > 0, got {rho}")
        self.optimizer = optimizer
        self.rho = rho
        self.adaptive = adaptive
        self.saved: list[tuple[nn.Parameter, Tensor]] = []  # (parameter, its weights before the perturbation)

    def parameters(self) -> list[nn.Parameter]:
        """The optimizer's parameters that take gradients (frozen layers are neither perturbed nor updated)."""
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.requires_grad]

    def perturb(self, loss: Tensor) -> bool:
        """The first pass's backward and the move to ``w + e(w)``: the gradient of ``loss`` (possibly scaled by a
        GradScaler) is computed with ``torch.autograd.grad``, leaving ``.grad`` untouched. False (weights unchanged)
        when that gradient is not finite."""
        if self.saved:
            raise RuntimeError("SAM.perturb: the weights are already perturbed; call restore() first")
        parameters = self.parameters()
        gradients = torch.autograd.grad(loss, parameters, allow_unused=True)
        used = [(p, g) for p, g in zip(parameters, gradients, strict=True) if g is not None]
        perturbation = sam_perturbation([p for p, _ in used], [g for _, g in used], self.rho, self.adaptive)
        if perturbation is None:
            return False
        with torch.no_grad():
            for (parameter, _), step in zip(used, perturbation, strict=True):
                self.saved.append((parameter, parameter.detach().clone()))
                parameter.add_(step)
        return True

    def restore(self) -> None:
        """Put the weights back exactly as they were before :meth:`perturb` (a no-op when it did not move them)."""
        with torch.no_grad():
            for parameter, weights in self.saved:
                parameter.copy_(weights)
        self.saved = []

    @contextmanager
    def perturbed(self, loss: Tensor) -> Iterator[bool]:
        """``perturb(loss)`` for the block (the second pass), then ``restore()`` even if the block raises."""
        try:
            yield self.perturb(loss)
        finally:
            self.restore()

    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        """One SAM step for plain PyTorch: ``closure()`` runs the forward pass and returns the loss (no backward);
        it is called twice. The second pass's gradient is accumulated into ``.grad`` (zero it before, as for any
        step) and the optimizer steps with it at the restored weights. Returns the first pass's loss."""
        loss = closure()
        with self.perturbed(loss):
            closure().backward()
        self.optimizer.step()
        return loss.detach()
