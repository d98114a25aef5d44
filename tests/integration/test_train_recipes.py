"""The recipe switches in a real run: --time on a virtual clock (fitted epochs, schedule, resume), --close-mosaic,
--repeat-aug and --auto-augment through the trainer."""

from __future__ import annotations

import dataclasses

import pytest
from tiny_runs import tiny_config

from detector.config import ConfigError, Hyperparameters, resolve_train_config
from detector.engine.callbacks import Callbacks
from detector.engine.loggers import read_results
from detector.engine.trainer import Trainer
from detector.utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


class VirtualClock:
    """Each training step costs one second; nothing else takes time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def step(self, trainer: Trainer) -> None:
        self.now += 1.0


def clocked_trainer(config, clock: VirtualClock, callbacks: Callbacks | None = None) -> Trainer:
    class ClockedTrainer(Trainer):
        pass

    ClockedTrainer.clock = staticmethod(clock)
    callbacks = callbacks or Callbacks()
    callbacks.register("on_step_end", clock.step)
    return ClockedTrainer(config, callbacks=callbacks)


def test_time_budget_fits_epochs_schedule_and_warmup_then_resume_keeps_it(tiny, tmp_path):
    # 8 images, batch 4: 2 steps (2 s) per epoch. A 0.5 min budget minus the 2 s reserve (--noval) leaves 28 s: 14
    # epochs of the cap of 50, decided after the first epoch.
    config = tiny_config(tiny, tmp_path, epochs=50, batch_size=4, time=0.5, name="budget")
    config = dataclasses.replace(config, hyp=dataclasses.replace(config.hyp, warmup_epochs=3.0))
    clock = VirtualClock()
    callbacks = Callbacks()
    stop_after = []

    def interrupt(trainer: Trainer) -> None:  # after the checkpoint hook: like a kill -9 after epoch 5
        if trainer.state.epoch == 5:
            stop_after.append(trainer.state.epochs)
            raise KeyboardInterrupt

    callbacks.register("on_epoch_end", interrupt)
    trainer = clocked_trainer(config, clock, callbacks)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert stop_after == [14]
    assert (trainer.schedule.epochs, trainer.warmup_iterations) == (14, 6)  # warmup: a fifth of 28 iterations, rounded
    last = trainer.save_dir / "weights" / "last.pt"
    saved = load_checkpoint(last)
    assert (saved["epoch"], saved["epochs"], saved["train_seconds"]) == (5, 14, 12.0)

    resumed = resolve_train_config({"resume": str(last)})
    assert resumed.time == 0.5
    trainer = clocked_trainer(resumed, VirtualClock())  # a new session: its clock starts at 0 again
    assert trainer.state.epochs == 14 and trainer.state.seconds_before == 12.0
    trainer.fit()
    assert len(read_results(trainer.save_dir / "results.csv")) == 14  # 6 epochs before the kill, 8 after
    with pytest.raises(ConfigError, match=r"has finished.*--time 1"):
        resolve_train_config({"resume": str(last)})


def test_time_budget_run_ends_after_the_fitted_epochs(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path, epochs=50, batch_size=4, time=0.5, name="fitted")  # 14 epochs, as above
    trainer = clocked_trainer(config, VirtualClock())
    trainer.fit()
    assert trainer.state.stop_reason is None
    assert len(read_results(trainer.save_dir / "results.csv")) == 14
    assert load_checkpoint(trainer.save_dir / "weights" / "last.pt")["epoch"] == 13


def test_time_budget_stops_an_epoch_that_overruns(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path, epochs=5, batch_size=1, time=0.05, name="overrun")  # 3 s; 8 steps/epoch
    trainer = clocked_trainer(config, VirtualClock())
    trainer.fit()
    assert trainer.state.stop_reason is not None and "--time budget" in trainer.state.stop_reason
    assert len(read_results(trainer.save_dir / "results.csv")) == 1
    assert (trainer.save_dir / "weights" / "best.pt").exists()


def test_close_mosaic_switches_the_last_epochs_to_whole_images_at_the_training_size(tiny, tmp_path):
    hyp = Hyperparameters(mosaic=1.0, mixup=0.5, cutmix=0.5, gridmask=0.5, warmup_epochs=0.0)
    config = tiny_config(
        tiny, tmp_path, epochs=3, close_mosaic=1, multi_scale=True, hyp=hyp, auto_augment="trivial", repeat_aug=2
    )
    seen = []
    callbacks = Callbacks()
    callbacks.register(
        "on_step_end",
        lambda t: seen.append((t.state.epoch, t.train_loader.sampler.closed, t.step_record.image_size)),
    )
    trainer = Trainer(config, callbacks=callbacks)
    assert trainer.train_loader.sampler.repeats == 2
    assert "TrivialAugmentWide" in repr(trainer.train_dataset.transforms)
    assert "TrivialAugmentWide" not in repr(trainer.train_dataset.closed_transforms)
    trainer.fit()
    assert [closed for epoch, closed, _ in seen] == [False, False, True]
    assert seen[-1][2] == config.imgsz  # multi-scale is off in the closed phase


def test_close_mosaic_phase_trains_at_the_test_size_when_it_differs(tiny, tmp_path):
    """--img 64 --val-img 96 --close-mosaic 1 (FixRes): the closed epoch's batches are 96 px whole images, drawn
    from a loader rebuilt at 96 (cached at 96), and the earlier epochs' are 64 px mosaics; --image-weights carry
    over to the new sampler."""
    hyp = Hyperparameters(mosaic=1.0, warmup_epochs=0.0)
    config = tiny_config(
        tiny, tmp_path, epochs=3, close_mosaic=1, val_imgsz=96, cache="ram", image_weights=True, noval=False, hyp=hyp
    )
    seen, weights = [], []
    callbacks = Callbacks()
    callbacks.register(
        "on_step_end",
        lambda t: seen.append((t.state.epoch, t.train_loader.sampler.closed, tuple(t.last_batch[0].shape[-2:]))),
    )
    callbacks.register("on_epoch_start", lambda t: weights.append(t.train_loader.sampler.image_weights.copy()))
    trainer = Trainer(config, callbacks=callbacks)
    first_loader = trainer.train_loader
    trainer.fit()
    assert {(closed, shape) for epoch, closed, shape in seen if epoch < 2} == {(False, (64, 64))}
    assert {(closed, shape) for epoch, closed, shape in seen if epoch == 2} == {(True, (96, 96))}
    assert trainer.train_loader is not first_loader and trainer.loader_imgsz == 96
    assert trainer.train_dataset.store.ram and {max(image.shape[:2]) for image in trainer.train_dataset.store.ram} == {
        96
    }
    # the new sampler starts from the weights the old one had after epoch 1's validation
    assert weights[2] == pytest.approx(first_loader.sampler.image_weights)
