"""Repeated augmentation and the close-mosaic phase in the sampler and dataset; the --time budget's arithmetic."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from detector.config import ConfigError, Hyperparameters, TrainConfig, check_train_config
from detector.data.augment import Mosaic
from detector.data.builtin import ensure_builtin_dataset
from detector.data.dataset import CLOSE_MOSAIC_OFF, YOLODataset, close_mosaic_hyp
from detector.data.dataset_config import load_dataset_config
from detector.data.loader import DetectionSampler, create_dataloader
from detector.engine.hooks import TimeBudget
from detector.engine.state import TrainState


def test_repeated_augmentation_repeats_each_draw_k_times_in_a_row_with_new_seeds():
    plain = list(DetectionSampler(10, seed=3))
    repeated = list(DetectionSampler(10, seed=3, repeats=3))
    assert len(repeated) == 10  # an epoch stays as long as the dataset
    indices = [index for index, _ in repeated]
    first_draws = [index for index, _ in plain][:4]  # ceil(10 / 3) images drawn, 3 copies each, cut at 10
    assert indices == [first_draws[0]] * 3 + [first_draws[1]] * 3 + [first_draws[2]] * 3 + [first_draws[3]]
    assert len({seed for _, seed in repeated}) == 10  # every copy augmented differently


def test_repeated_augmentation_deals_the_copies_to_consecutive_ranks():
    ranks = [list(DetectionSampler(8, seed=1, rank=r, world_size=2, repeats=2)) for r in range(2)]
    assert [i for i, _ in ranks[0]] == [i for i, _ in ranks[1]]  # copy 1 on rank 0, copy 2 on rank 1
    assert len({i for i, _ in ranks[0]}) == 4  # each process's batch holds different images
    assert {s for _, s in ranks[0]}.isdisjoint({s for _, s in ranks[1]})


def test_closed_sampler_flags_every_item_and_keeps_the_order():
    sampler = DetectionSampler(6, seed=2)
    sampler.set_epoch(4)
    before = list(sampler)
    sampler.set_closed(True)
    assert list(sampler) == [(index, seed, True) for index, seed in before]


def test_close_mosaic_hyp_turns_off_exactly_the_mixing_augmentations():
    hyp = Hyperparameters(mosaic=1.0, mosaic9=0.2, mixup=0.3, cutmix=0.4, copy_paste=0.5, cutout=0.6, gridmask=0.7)
    closed = close_mosaic_hyp(hyp)
    changed = {f.name for f in dataclasses.fields(hyp) if getattr(hyp, f.name) != getattr(closed, f.name)}
    assert changed == set(CLOSE_MOSAIC_OFF)
    assert all(getattr(closed, key) == 0.0 for key in CLOSE_MOSAIC_OFF)
    assert (closed.fliplr, closed.hsv_s, closed.scale) == (hyp.fliplr, hyp.hsv_s, hyp.scale)


@pytest.fixture(scope="module")
def six_images(tmp_path_factory) -> str:
    """The train folder of a 6-image built-in dataset."""
    root = tmp_path_factory.mktemp("six")
    dataset = ensure_builtin_dataset(root / "data", num_train=6, num_val=2, progress=False)
    return load_dataset_config(str(dataset)).train


def test_dataset_serves_closed_items_from_its_close_mosaic_transforms(six_images):
    dataset = YOLODataset(six_images, imgsz=64, augment=True, hyp=Hyperparameters(mosaic=1.0), workers=0)
    assert any(isinstance(getattr(step, "mosaic", step), Mosaic) for step in dataset.transforms.steps[0].steps)
    assert not any(isinstance(step, Mosaic) for step in dataset.closed_transforms.steps[0].steps)
    image, labels, _, _ = dataset[(2, 123, True)]
    sample = dataset.closed_transforms(dataset.store.load_sample(2), np.random.default_rng(123))
    assert image.shape == (3, 64, 64)
    assert len(labels) == len(sample.boxes_xyxy)
    assert not np.array_equal(image.numpy(), dataset[(2, 123)][0].numpy())  # the full pipeline made another image


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"repeat_aug": 0}, "--repeat-aug"),
        ({"repeat_aug": 4, "batch_size": 2}, "--batch-size >= 4"),
        ({"close_mosaic": -1}, "--close-mosaic"),
        ({"time": -1.0}, "--time"),
        ({"auto_augment": "random"}, "--auto-augment 'random'"),
    ],
)
def test_recipe_options_are_checked_in_one_line(changes, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(dataclasses.replace(TrainConfig(), **changes))


class FakeTrainer:
    """What TimeBudget reads and calls, on a virtual clock."""

    def __init__(self, minutes: float, cap: int) -> None:
        self.now = 0.0
        self.config = SimpleNamespace(time=minutes, epochs=cap, noval=False)
        self.state = TrainState(epochs=cap)
        self.context = SimpleNamespace(is_distributed=False)
        self.is_main = True
        self.validation_seconds = 0.0
        self.fitted: list[int] = []
        self.stops: list[str] = []

    def clock(self) -> float:
        return self.now

    def elapsed_seconds(self) -> float:
        return self.state.seconds_before + self.now

    def set_epochs(self, epochs: int) -> None:
        self.fitted.append(epochs)
        self.state.epochs = epochs

    def request_stop(self, reason: str) -> None:
        self.stops.append(reason)


def test_time_budget_fits_the_epochs_that_remain_after_the_final_validation_reserve():
    trainer, budget = FakeTrainer(minutes=1.0, cap=300), TimeBudget()
    trainer.now = 2.0  # set-up
    budget.on_epoch_start(trainer)
    trainer.now, trainer.validation_seconds = 12.0, 2.0  # a 10 s epoch, 2 s of it validation
    budget.on_epoch_end(trainer)
    # 60 s - 12 s used - (1.5 x 2 s + 2 s) reserve = 43 s left: 4 more 10 s epochs
    assert trainer.fitted == [5]
    trainer.state.epoch = 1
    budget.on_epoch_start(trainer)
    trainer.now = 25.0  # a slower 13 s epoch: 60 - 25 - 5 = 30 s, 2 more
    budget.on_epoch_end(trainer)
    assert trainer.fitted == [5, 4]


def test_time_budget_is_capped_by_epochs_and_stops_an_overrunning_epoch():
    trainer, budget = FakeTrainer(minutes=10.0, cap=3), TimeBudget()
    budget.on_epoch_start(trainer)
    trainer.now = 1.0
    budget.on_epoch_end(trainer)
    assert trainer.fitted == []  # 3 epochs of 1 s fit easily: --epochs 3 stays
    trainer.now = 599.0
    budget.on_step_end(trainer)
    assert trainer.stops and "10 min" in trainer.stops[0]


def test_time_budget_counts_the_earlier_sessions_of_a_resumed_run():
    trainer, budget = FakeTrainer(minutes=1.0, cap=300), TimeBudget()
    trainer.state.seconds_before, trainer.state.epoch = 40.0, 4
    budget.on_epoch_start(trainer)
    trainer.now = 5.0  # 45 s used: 60 - 45 - 2 = 13 s, 2 more 5 s epochs after epoch 4
    budget.on_epoch_end(trainer)
    assert trainer.fitted == [7]


def test_repeated_augmentation_puts_k_different_views_of_one_image_in_a_batch(six_images):
    loader, _ = create_dataloader(
        six_images, imgsz=64, batch_size=4, augment=True, shuffle=True, workers=0, repeat_aug=2, hyp=Hyperparameters()
    )
    images, _, paths, _ = next(iter(loader))
    assert paths[0] == paths[1] and paths[2] == paths[3] and paths[0] != paths[2]  # 2 images, 2 views each
    assert not np.array_equal(images[0].numpy(), images[1].numpy())
    assert not np.array_equal(images[2].numpy(), images[3].numpy())
