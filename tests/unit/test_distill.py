"""Knowledge distillation (--teacher --distill): the term by hand on one level, zero for an identical teacher,
gradients to the student only, autocast, refusals, and a tiny real run whose teacher stays frozen and comes back on
--resume."""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import inspect
import math

import pytest
import tiny_models
import torch
import yaml
from tiny_runs import tiny_config

from detector.config import Hyperparameters, TrainConfig, check_train_config, resolve_train_config
from detector.data.builtin import ensure_builtin_dataset
from detector.engine.trainer import Trainer
from detector.errors import ConfigError
from detector.models.distill import (
    DistillationLoss,
    check_teacher,
    distillation_parts,
    load_teacher,
)
from detector.models.loading import checkpoint_model_entries
from detector.models.loss import DetectionLoss
from detector.models.yolo import DetectionModel
from detector.utils.checkpoint import load_checkpoint, save_checkpoint

NUM_CLASSES = 8  # the built-in dataset's


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def bernoulli_kl(p: float, q: float) -> float:
    """KL(Bernoulli(p) || Bernoulli(q)), the textbook formula."""
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_one_level_by_hand():
    """One level, one anchor, two cells, two classes, temperature 2, different anchors for student and teacher."""
    temperature = 2.0
    # [x, y, w, h, objectness, class 0, class 1] per cell
    student = [[0.2, -0.4, 0.1, 0.3, -1.0, 0.5, -0.5], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    teacher = [[0.6, -0.1, -0.2, 0.5, 2.0, 1.5, -2.0], [0.3, 0.2, 0.4, -0.1, -3.0, -1.0, 1.0]]
    student_anchor, teacher_anchor = (2.0, 3.0), (4.0, 3.0)
    to_map = lambda cells: torch.tensor(cells, dtype=torch.float64).view(1, 1, 1, 2, 7).float()  # noqa: E731
    parts = distillation_parts(
        [to_map(student)],
        [to_map(teacher)],
        torch.tensor([[student_anchor]]),
        torch.tensor([[teacher_anchor]]),
        temperature=temperature,
    )

    def kl(s: float, t: float) -> float:
        return temperature**2 * bernoulli_kl(sigmoid(t / temperature), sigmoid(s / temperature))

    def box(raw: list[float], anchor: tuple[float, float]) -> list[float]:
        xy = [2 * sigmoid(v) - 0.5 for v in raw[:2]]
        log_wh = [math.log((2 * sigmoid(v)) ** 2 * a) for v, a in zip(raw[2:4], anchor, strict=True)]
        return xy + log_wh

    weights = [sigmoid(cell[4]) for cell in teacher]  # the teacher's objectness at temperature 1
    objectness = 4.0 * sum(kl(s[4], t[4]) for s, t in zip(student, teacher, strict=True)) / 2  # level balance 4
    class_kl = [(kl(s[5], t[5]) + kl(s[6], t[6])) / 2 for s, t in zip(student, teacher, strict=True)]
    distance = [
        sum(abs(a - b) for a, b in zip(box(s, student_anchor), box(t, teacher_anchor), strict=True))
        for s, t in zip(student, teacher, strict=True)
    ]
    weighted = lambda values: sum(w * v for w, v in zip(weights, values, strict=True)) / sum(weights)  # noqa: E731
    assert parts.objectness.item() == pytest.approx(objectness, rel=1e-5)
    assert parts.classes.item() == pytest.approx(weighted(class_kl), rel=1e-5)
    assert parts.boxes.item() == pytest.approx(weighted(distance), rel=1e-5)


def values(terms, drop: str = "distill") -> dict[str, float]:
    """Loss terms as floats, without ``drop``."""
    return {name: float(term.detach()) for name, term in terms.items() if name != drop}


def tiny_detector(nc: int = 3, seed: int = 0, width_multiple: float = 1.0) -> DetectionModel:
    """A fresh copy of the strided-convs model initialised from ``seed`` (each built once: building probes the
    strides with forward passes)."""
    return copy.deepcopy(_built_detector(nc, seed, width_multiple))


@functools.cache
def _built_detector(nc: int, seed: int, width_multiple: float) -> DetectionModel:
    torch.manual_seed(seed)
    return DetectionModel({**tiny_models.strided_convs_yaml(nc), "width_multiple": width_multiple})


def test_zero_for_an_identical_teacher_positive_otherwise_and_gradients_reach_the_student_only():
    """The same weights in eval mode (the same BatchNorm statistics): exactly 0, the KL's minimum (BCE against the
    teacher's soft targets would bottom out at the teacher's entropy instead)."""
    student = tiny_detector().eval()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [1, 2, 0.3, 0.6, 0.2, 0.2]])
    base = DetectionLoss(student, Hyperparameters())
    same = DistillationLoss(base, copy.deepcopy(student), student, gain=1.0, temperature=2.0)
    raw = student.forward_raw(images)
    terms = same(raw, targets, images=images)
    assert terms["distill"].item() == 0.0
    assert values(terms) == values(base(raw, targets))

    other = tiny_detector(seed=1)  # other weights, same grid
    loss = DistillationLoss(base, other, student, gain=0.5, temperature=2.0, box_gain=0.1, obj_gain=2.0, cls_gain=3.0)
    parts = distillation_parts(
        raw, other.forward_raw(images), student.detect.anchors, other.detect.anchors, temperature=2.0
    )
    assert min(parts) > 0
    terms = loss(raw, targets, images=images)
    expected = 0.5 * (0.1 * parts.boxes + 2.0 * parts.objectness + 3.0 * parts.classes)
    assert terms["distill"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert not other.training and not any(p.requires_grad for p in other.parameters())

    terms["distill"].backward()
    assert all(p.grad is None for p in other.parameters())
    assert sum(float(p.grad.abs().sum()) for p in student.parameters() if p.grad is not None) > 0


def test_weights_pass_through_validation_gets_the_base_terms_alone_and_a_batch_runs_the_teacher_once():
    student = tiny_detector().eval()
    images = torch.rand(1, 3, 64, 64)
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.4], [0, 0, 0.3, 0.6, 0.2, 0.2]])
    weights = torch.tensor([1.0, 0.25])
    base = DetectionLoss(student, Hyperparameters())
    teacher = tiny_detector(seed=1)
    teacher_runs = []
    teacher.model[0].register_forward_hook(lambda *_: teacher_runs.append(1))
    loss = DistillationLoss(base, teacher, student)
    raw = student.forward_raw(images)
    inspect.signature(loss).bind(None, None, None)  # what --unlabeled's check asks of the loss
    weighted = loss(raw, targets, weights, images=images)
    assert values(weighted) == values(base(raw, targets, weights)) != values(base(raw, targets))
    assert values(loss(raw, targets), drop="") == values(base(raw, targets))  # no images (validation): no distill
    again = loss(raw, targets, images=images)  # the same batch again (--sam's second pass): the teacher's maps kept
    assert len(teacher_runs) == 1 and again["distill"].item() == weighted["distill"].item()
    loss(raw, targets, images=images.clone())
    assert len(teacher_runs) == 2


def test_autocast_gives_the_fp32_value_within_bf16_precision():
    student = tiny_detector().eval()
    loss = DistillationLoss(lambda raw, targets: {}, tiny_detector(seed=1), student, temperature=2.0)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    reference = loss(student.forward_raw(images), torch.zeros(0, 6), images=images)["distill"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss(student.forward_raw(images), torch.zeros(0, 6), images=images.clone())["distill"]
    assert mixed.dtype == torch.float32
    assert mixed.item() == pytest.approx(reference.item(), rel=0.05)


def test_teachers_of_other_classes_or_grids_are_refused(tmp_path):
    student = tiny_detector(nc=NUM_CLASSES)
    path = tmp_path / "three.pt"
    save_checkpoint(checkpoint_model_entries(tiny_detector(nc=3)), path)
    with pytest.raises(ConfigError, match=rf"--teacher {path}: predicts 3 classes, the model being trained 8"):
        load_teacher(path, student)
    two_levels = DetectionModel(tiny_models.yolov5_blocks_yaml(nc=NUM_CLASSES))
    with pytest.raises(
        ConfigError, match=r"predicts on strides \[4, 8\] with 3 anchors per cell, .* strides \[8, 16, 32\]"
    ):
        check_teacher(two_levels, student)
    check_teacher(tiny_detector(nc=NUM_CLASSES, width_multiple=2.0), student)  # wider is fine


@pytest.mark.parametrize(
    "options, message",
    [
        ({"teacher": "t.pt"}, r"--teacher labels the --unlabeled images or is distilled .* pass --unlabeled DIR or"),
        ({"hyp": Hyperparameters(distill=1.0)}, r"--distill 1 distils a teacher model; pass --teacher WEIGHTS"),
        ({"hyp": Hyperparameters(distill=-1.0)}, r"--distill \(hyp.distill\) must be 0 or more"),
        ({"hyp": Hyperparameters(distill_t=0.0)}, r"hyp.distill_t positive"),
        ({"teacher": "/no/such.pt", "hyp": Hyperparameters(distill=1.0)}, "--teacher /no/such.pt: weights file not"),
    ],
)
def test_refused_distillation_options_name_the_flag(options, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(TrainConfig(**options))


# --------------------------------------------------------------------------------------------------------------------
# A tiny real run


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    """A 1-epoch run of the strided-convs model on 4 built-in images, taught by a twice-as-wide teacher."""
    root = tmp_path_factory.mktemp("distill")
    data = ensure_builtin_dataset(root / "data", num_train=4, num_val=2, progress=False)
    (root / "student.yaml").write_text(yaml.safe_dump(tiny_models.strided_convs_yaml(NUM_CLASSES)))
    teacher_path = root / "teacher.pt"
    save_checkpoint(checkpoint_model_entries(tiny_detector(nc=NUM_CLASSES, seed=3, width_multiple=2.0)), teacher_path)
    config = tiny_config({"data": str(data), "cfg": str(root / "student.yaml")}, root, epochs=1, batch_size=2)
    config = dataclasses.replace(
        config, teacher=str(teacher_path), hyp=dataclasses.replace(config.hyp, distill=1.0), logger=()
    )
    trainer = Trainer(config)
    trainer.fit()
    return trainer, teacher_path


def read_results(trainer: Trainer) -> list[dict[str, str]]:
    with open(trainer.save_dir / "results.csv", newline="") as f:
        return [{k.strip(): v.strip() for k, v in row.items()} for row in csv.DictReader(f)]


def assert_frozen_teacher(trainer: Trainer, teacher_path) -> None:
    """The trainer's teacher holds the file's weights bit for bit, in eval mode, outside the optimizer."""
    teacher = trainer.loss_fn.teacher
    fresh = load_teacher(teacher_path, trainer.model)
    assert teacher.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in teacher.state_dict().items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}


def test_a_run_logs_distill_loss_and_never_changes_or_saves_the_teacher(distill_run):
    trainer, teacher_path = distill_run
    [row] = read_results(trainer)
    assert float(row["train/distill_loss"]) > 0
    assert float(row["val/distill_loss"]) == 0  # validation runs no teacher
    assert_frozen_teacher(trainer, teacher_path)
    checkpoint = load_checkpoint(trainer.weights_dir / "last.pt")
    assert set(checkpoint["model"]) == set(trainer.model.state_dict())  # the student's entries, nothing else
    assert checkpoint["train_config"]["teacher"] == str(teacher_path)
    assert checkpoint["train_config"]["hyp"]["distill"] == 1.0


def test_resume_reloads_the_teacher_and_goes_on_distilling(distill_run):
    first, teacher_path = distill_run
    trainer = Trainer(resolve_train_config({"resume": str(first.weights_dir / "last.pt"), "epochs": 2}))
    assert isinstance(trainer.loss_fn, DistillationLoss)
    assert_frozen_teacher(trainer, teacher_path)
    trainer.fit()
    assert [float(row["train/distill_loss"]) > 0 for row in read_results(trainer)] == [True, True]
