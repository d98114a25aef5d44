"""SAM / ASAM (detector.engine.sam) against updates computed by hand on a quadratic and against a trainer step composed
by hand; gradient clipping (detector.engine.optim.clip_gradients) against torch's own clipping functions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tiny_runs import make_tiny, tiny_config
from torch import nn

from detector.config import TrainConfig, check_train_config
from detector.engine.optim import build_optimizer, clip_gradients
from detector.engine.sam import SAM
from detector.engine.trainer import Trainer
from detector.errors import ConfigError
from detector.utils.torch_utils import buffers_kept

# f(a, b) = 0.5 a^T A a + 0.5 b^T B b: two parameter tensors, so the norm must be taken over both together.
A = np.array([[3.0, 1.0], [1.0, 2.0]])
B = np.diag([0.5, 4.0, 1.5])
A0, B0 = np.array([1.0, -2.0]), np.array([0.5, 0.25, -1.0])
LR, RHO = 0.1, 0.05


def quadratic():
    """The two parameters (float64), an SGD without momentum over them, and the closure f (forward only)."""
    a, b = nn.Parameter(torch.tensor(A0)), nn.Parameter(torch.tensor(B0))
    matrix_a, matrix_b = torch.tensor(A), torch.tensor(B)
    calls = []

    def closure():
        calls.append(1)
        return 0.5 * a @ matrix_a @ a + 0.5 * b @ matrix_b @ b

    return a, b, torch.optim.SGD([a, b], lr=LR), closure, calls


def sam_update_by_hand(adaptive: bool, pending=(0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """w1 = w0 - lr * (pending + grad f(w0 + e)), e = rho g / ||g|| or rho w^2 g / || |w| g ||, with numpy."""
    grads = [A @ A0, B @ B0]
    weights = [A0, B0]
    if adaptive:
        norm = np.sqrt(sum(np.sum((np.abs(w) * g) ** 2) for w, g in zip(weights, grads, strict=True)))
        e = [RHO * w**2 * g / norm for w, g in zip(weights, grads, strict=True)]
    else:
        norm = np.sqrt(sum(np.sum(g**2) for g in grads))
        e = [RHO * g / norm for g in grads]
    second = [A @ (A0 + e[0]), B @ (B0 + e[1])]
    return A0 - LR * (pending[0] + second[0]), B0 - LR * (pending[1] + second[1])


@pytest.mark.parametrize("adaptive", [False, True], ids=["sam", "asam"])
def test_sam_step_runs_two_passes_and_equals_the_update_by_hand(adaptive):
    a, b, optimizer, closure, calls = quadratic()
    loss = SAM(optimizer, rho=RHO, adaptive=adaptive).step(closure)
    expected_a, expected_b = sam_update_by_hand(adaptive)
    assert len(calls) == 2  # one forward (and backward) at w, one at w + e(w)
    np.testing.assert_allclose(a.detach().numpy(), expected_a, rtol=1e-12)
    np.testing.assert_allclose(b.detach().numpy(), expected_b, rtol=1e-12)
    assert loss.item() == pytest.approx(0.5 * A0 @ A @ A0 + 0.5 * B0 @ B @ B0)  # the loss at the real weights


def test_the_first_pass_leaves_accumulated_gradients_alone():
    """Gradient accumulation: gradients already in .grad join the second pass's, untouched by the first."""
    a, b, optimizer, closure, _ = quadratic()
    pending = (np.array([0.3, -0.1]), np.array([1.0, 0.0, 2.0]))
    a.grad, b.grad = torch.tensor(pending[0]), torch.tensor(pending[1])
    SAM(optimizer, rho=RHO).step(closure)
    expected_a, expected_b = sam_update_by_hand(False, pending)
    np.testing.assert_allclose(a.detach().numpy(), expected_a, rtol=1e-12)
    np.testing.assert_allclose(b.detach().numpy(), expected_b, rtol=1e-12)


def test_a_gradscaler_scale_cancels_and_a_non_finite_gradient_perturbs_nothing():
    a, b, optimizer, closure, _ = quadratic()
    sam = SAM(optimizer, rho=RHO)
    assert sam.perturb(closure())
    unscaled = [a.detach().clone(), b.detach().clone()]
    sam.restore()
    assert torch.equal(a.detach(), torch.tensor(A0)) and torch.equal(b.detach(), torch.tensor(B0))  # bit-exact
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with sam.perturbed(scaler.scale(closure())) as moved:
        assert moved
        torch.testing.assert_close([a.detach(), b.detach()], unscaled, rtol=1e-12, atol=0)
    assert not sam.perturb(closure() * float("nan"))  # e.g. an fp16 overflow: the weights stay where they are
    assert torch.equal(a.detach(), torch.tensor(A0)) and sam.saved == []


def test_running_statistics_are_restored_after_the_block():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = copy.deepcopy(model.state_dict())
    with buffers_kept(model):
        model(torch.randn(2, 3, 8, 8))
        assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)


def test_sam_and_clipping_options_are_checked():
    for changes, flag in (
        ({"sam": -0.1}, "--sam"),
        ({"clip_value": -1.0}, "--clip-value"),
        ({"sam_adaptive": True}, "--sam-adaptive"),
    ):
        with pytest.raises(ConfigError, match=flag):
            check_train_config(TrainConfig(**changes))


# -- gradient clipping ----------------------------------------------------------------------------------------------


def parameters_with_gradients(seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    parameters = [nn.Parameter(torch.zeros(shape)) for shape in ((4, 3), (5,), (2, 2, 2))]
    for p in parameters:
        p.grad = torch.randn(p.shape, generator=generator) * 3
    return parameters


@pytest.mark.parametrize(("max_norm", "max_value"), [(2.0, 0.0), (0.0, 0.5), (2.0, 0.5), (0.0, 0.0), (1e3, 0.0)])
def test_clip_gradients_equals_torchs_functions(max_norm, max_value):
    ours, theirs = parameters_with_gradients(), parameters_with_gradients()
    norm = clip_gradients(ours, max_norm, max_value)
    expected_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in theirs]))
    if max_value > 0:
        nn.utils.clip_grad_value_(theirs, max_value)
    if max_norm > 0:
        nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close([p.grad for p in ours], [p.grad for p in theirs], rtol=0, atol=0)
    torch.testing.assert_close(norm, expected_norm)


def test_an_infinite_gradient_shows_in_the_norm_even_under_value_clipping():
    parameters = parameters_with_gradients()
    parameters[1].grad[2] = float("inf")
    assert not torch.isfinite(clip_gradients(parameters, 0.0, 0.5))
    assert parameters[1].grad[2] == 0.5


# -- the trainer --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Built-in images and a yolov5n at 1/8 width; one torch thread (two crawl when other processes share the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sam")
    tiny = make_tiny(root, num_train=4, num_val=2)
    yield tiny
    torch.set_num_threads(threads)


def trainer_and_reference(tiny, tmp_path, **changes):
    """A trainer of one optimizer step per batch, and a copy of its model and optimizer to step by hand."""
    trainer = Trainer(tiny_config(tiny, tmp_path, batch_size=4, nbs=4, **changes))
    model = copy.deepcopy(trainer.model)
    hyp = trainer.config.hyp
    optimizer = build_optimizer(model, "SGD", hyp.lr0, hyp.momentum, hyp.weight_decay)
    optimizer.load_state_dict(trainer.optimizer.state_dict())
    trainer.model.train()
    return trainer, model.train(), optimizer


def test_a_trainer_step_with_sam_equals_the_step_composed_by_hand(tiny, tmp_path):
    trainer, model, optimizer = trainer_and_reference(tiny, tmp_path, sam=RHO, clip_grad=0.0)
    images_uint8, targets = next(iter(trainer.train_loader))[:2]
    forwards = []
    trainer.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    trainer.train_step((images_uint8, targets, ()))
    assert trainer.state.stepped and len(forwards) == 2

    images = images_uint8.to(memory_format=trainer.memory_format).float() / 255

    def loss():
        return sum(trainer.loss_fn(model(images), targets).values()) * images.shape[0]

    parameters = [p for p in model.parameters() if p.requires_grad]
    gradients = torch.autograd.grad(loss(), parameters)
    statistics = {name: value.clone() for name, value in model.named_buffers()}  # after the first pass only
    norm = torch.sqrt(sum((g**2).sum() for g in gradients))
    weights = [p.detach().clone() for p in parameters]
    with torch.no_grad():
        for p, g in zip(parameters, gradients, strict=True):
            p.add_(RHO * g / norm)
    optimizer.zero_grad()
    loss().backward()
    with torch.no_grad():
        for p, w in zip(parameters, weights, strict=True):
            p.copy_(w)
    optimizer.step()

    torch.testing.assert_close(dict(trainer.model.named_parameters()), dict(model.named_parameters()))
    torch.testing.assert_close(dict(trainer.model.named_buffers()), statistics)
    first_pass = trainer.loss_fn(model(images), targets)  # logged losses: those at the real weights
    assert set(trainer.loss_sums) == set(first_pass)


def test_a_trainer_step_with_asam_under_bf16_autocast_is_finite_and_moves_the_weights(tiny, tmp_path):
    trainer, _, _ = trainer_and_reference(tiny, tmp_path, sam=0.5, sam_adaptive=True, amp="bf16")
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train_step(next(iter(trainer.train_loader)))
    assert trainer.state.stepped
    after = list(trainer.model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(p, q) for p, q in zip(after, before, strict=True))


@pytest.mark.parametrize(("clip_grad", "clip_value"), [(10.0, 0.0), (0.05, 1e-3)])
def test_the_trainer_clips_as_configured(tiny, tmp_path, clip_grad, clip_value):
    trainer, model, optimizer = trainer_and_reference(tiny, tmp_path, clip_grad=clip_grad, clip_value=clip_value)
    generator = torch.Generator().manual_seed(0)
    for ours, theirs in zip(trainer.model.parameters(), model.parameters(), strict=True):
        ours.grad = torch.randn(ours.shape, generator=generator).to(memory_format=torch.contiguous_format)
        theirs.grad = ours.grad.clone()
    assert trainer._optimizer_step()
    if clip_value:
        nn.utils.clip_grad_value_(model.parameters(), clip_value)
    nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    torch.testing.assert_close(dict(trainer.model.named_parameters()), dict(model.named_parameters()))
