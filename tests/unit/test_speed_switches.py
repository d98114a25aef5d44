"""Speed and memory switches: --grad-checkpoint gives the gradients and BatchNorm statistics of the plain model (and
really recomputes), --channels-last trains the same step in NHWC as in NCHW, and --compile trains the same step
compiled, or eagerly after a one-line warning where compilation fails."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import yaml
from tiny_models import yolov5_blocks_yaml
from tiny_runs import tiny_config
from torch import nn

from detector.data.builtin import ensure_builtin_dataset
from detector.engine.trainer import Trainer, resolve_memory_format
from detector.models.regularization import set_stochastic_depth
from detector.models.yolo import DetectionModel

NUM_CLASSES = 8  # the built-in dataset's


def count_batchnorm_calls(model: nn.Module) -> list[int]:
    """A counter that each BatchNorm forward of ``model`` increments (the recomputation in backward included)."""
    calls = [0]

    def count(*_: object) -> None:
        calls[0] += 1

    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.register_forward_hook(count)
    return calls


def test_grad_checkpointing_gives_the_same_gradients_and_batchnorm_statistics():
    torch.manual_seed(0)
    plain = DetectionModel(yolov5_blocks_yaml())
    set_stochastic_depth(plain, 0.5)  # random draws inside checkpointed layers: the recomputation must repeat them
    checkpointed = copy.deepcopy(plain).set_grad_checkpointing(True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    calls, weights = {}, None
    for model in (plain, checkpointed):
        calls[model] = count_batchnorm_calls(model)
        torch.manual_seed(2)
        outputs = model.train()(images)
        if weights is None:  # a fixed random linear function of the outputs as the loss
            generator = torch.Generator().manual_seed(3)
            weights = [torch.randn(output.shape, generator=generator) for output in outputs]
        sum((output * weight).sum() for output, weight in zip(outputs, weights, strict=True)).backward()

    # Every BatchNorm lies in a checkpointed layer: each ran again in backward, yet counted the batch once.
    assert calls[checkpointed][0] == 2 * calls[plain][0] > 0
    for (name, expected), actual in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-6, atol=1e-6, msg=name)
    for (name, expected), actual in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        assert torch.equal(actual, expected), name  # running means, variances and batch counts
    assert plain.model[4].cv1.bn.num_batches_tracked.item() == 1
    with torch.no_grad():  # eval mode is untouched by the switch
        assert torch.equal(checkpointed.eval()(images), plain.eval()(images))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """4 built-in images (one batch) and YOLOv5's blocks at 1/8 width."""
    root = tmp_path_factory.mktemp("speed")
    data = ensure_builtin_dataset(root / "data", num_train=4, num_val=1, progress=False)
    (root / "model.yaml").write_text(yaml.safe_dump(yolov5_blocks_yaml(nc=NUM_CLASSES)))
    return {"data": str(data), "cfg": str(root / "model.yaml")}


def train_one_batch(trainer_class: type[Trainer], tiny: dict, tmp_path, **changes) -> Trainer:
    """A trainer of the tiny run after its one-batch epoch (forward, loss, backward and an optimizer step)."""
    trainer = trainer_class(tiny_config(tiny, tmp_path, batch_size=4, epochs=1, logger=(), **changes))
    trainer.train_one_epoch()
    assert trainer.state.stepped
    return trainer


@pytest.fixture(scope="module")
def eager(tiny, tmp_path_factory) -> Trainer:
    """The reference: the tiny run's step with the defaults (on the CPU: NHWC, uncompiled, no checkpointing)."""
    return train_one_batch(Trainer, tiny, tmp_path_factory.mktemp("eager"))


def assert_same_step(trainer: Trainer, reference: Trainer, tolerance: float) -> None:
    """The same loss terms, weights and BatchNorm statistics after the step (up to float rounding)."""
    losses, expected = trainer.step_record.mean_losses, reference.step_record.mean_losses
    assert losses.keys() == expected.keys()
    for name in losses:
        assert losses[name] == pytest.approx(expected[name], rel=tolerance), name
    state, expected_state = trainer.model.state_dict(), reference.model.state_dict()
    for name, value in state.items():
        torch.testing.assert_close(value, expected_state[name], rtol=tolerance, atol=tolerance, msg=name)


def test_channels_last_on_and_off_train_the_same_step(tiny, eager, tmp_path):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_memory_format("auto", cpu) == resolve_memory_format("on", cuda) == torch.channels_last
    assert resolve_memory_format("auto", cuda) == resolve_memory_format("off", cpu) == torch.contiguous_format
    nhwc, nchw = eager, train_one_batch(Trainer, tiny, tmp_path, channels_last="off")  # auto: NHWC on the CPU
    weight = nhwc.model.model[1].conv.weight  # a 3x3 conv: the two formats differ in memory
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert nchw.model.model[1].conv.weight.is_contiguous()
    assert_same_step(nhwc, nchw, tolerance=1e-4)


@pytest.fixture
def fresh_dynamo():
    """Compiled code is cached per function: each test compiles anew, and leaves nothing for the next."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class AotEagerTrainer(Trainer):
    """TorchDynamo's graph capture and AOTAutograd's joint forward-backward graph without inductor's C++ build,
    which takes about a minute on two cores; inductor runs the same captured graphs."""

    compile_backend = "aot_eager"


def test_compile_with_grad_checkpointing_trains_the_same_step_as_eager(tiny, eager, tmp_path, fresh_dynamo):
    compiled = train_one_batch(AotEagerTrainer, tiny, tmp_path, compile=True, grad_checkpoint=True)
    assert isinstance(compiled.train_model, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.train_model._orig_mod is compiled.model and compiled.model.grad_checkpointing
    # The compile probe's forward left the BatchNorm statistics as they were, and the compiled recomputation
    # updates none: they match eager's after the step.
    assert_same_step(compiled, eager, tolerance=1e-4)


def failing_backend(graph_module: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
    raise RuntimeError("no compiler here\nsecond line of a long report")


class FailingCompileTrainer(Trainer):
    compile_backend = staticmethod(failing_backend)


def test_compile_falls_back_to_eager_with_one_line(tiny, eager, tmp_path, fresh_dynamo, caplog):
    with caplog.at_level(logging.WARNING, logger="detector.engine.trainer"):
        trainer = train_one_batch(FailingCompileTrainer, tiny, tmp_path, compile=True)
    warnings = [record.getMessage() for record in caplog.records if "--compile" in record.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0], warnings
    assert warnings[0].startswith("WARNING: --compile: compilation failed (")
    assert "no compiler here" in warnings[0] and warnings[0].endswith("; training without torch.compile")
    assert trainer.train_model is trainer.model
    assert_same_step(trainer, eager, tolerance=0.0)
