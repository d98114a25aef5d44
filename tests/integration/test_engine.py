"""The open engine: components handed in or overridden, named loss terms everywhere, hooks that stop a run, schedules
set every iteration, options checked before anything is written, and the README's "Extending" examples run as
written (docs/examples/*.py, included verbatim in README.md)."""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import re
import sys
from pathlib import Path

import pytest
import tiny_runs
import torch
import yaml
from page_faults import faults_of_a_48mb_block

from detector.config import TrainConfig, load_hyp
from detector.data.loader import create_dataloader
from detector.engine.callbacks import Callback
from detector.engine.loggers import read_results
from detector.engine.schedules import LR_SCHEDULES
from detector.engine.trainer import Trainer
from detector.errors import DetectorError
from detector.models.yolo import DetectionModel
from detector.utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "docs" / "examples"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(tiny, tmp_path, **changes) -> TrainConfig:
    """The shared tiny run with 2 batches per epoch (an optimizer step each) and validation every epoch."""
    return tiny_runs.tiny_config(tiny, tmp_path, **{"batch_size": 4, "nbs": 4, "noval": False, **changes})


def example(name: str):
    """Import docs/examples/<name>.py, after checking that README.md shows it verbatim."""
    path = EXAMPLES / f"{name}.py"
    code = path.read_text()
    body = code.split('"""', 2)[2].strip()  # the README shows the code without the module docstring
    assert body in (REPO / "README.md").read_text(), f"README.md's Extending section must show {path} verbatim"
    spec = importlib.util.spec_from_file_location(f"readme_example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordLearningRates(Callback):
    def __init__(self) -> None:
        self.rates: list[tuple[float, ...]] = []

    def on_step_end(self, trainer) -> None:
        self.rates.append(trainer.state.learning_rates)  # the rates this step used


# -- README examples --------------------------------------------------------------------------------------------------


def test_a_new_loss_term_appears_in_the_bar_csv_tensorboard_and_validation(tiny, tmp_path, caplog):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    SparseTrainer = example("loss_term").SparseTrainer
    with caplog.at_level(logging.INFO, logger="detector"):
        trainer = SparseTrainer(tiny_config(tiny, tmp_path))
        trainer.fit()
    run = trainer.save_dir
    rows = read_results(run / "results.csv")
    header = (run / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:5] == ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "train/bn_l1_loss"]
    assert header[9:13] == ["val/box_loss", "val/obj_loss", "val/cls_loss", "val/bn_l1_loss"]
    scales = [m.weight for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    expected = 1e-5 * float(sum(s.detach().abs().sum() for s in scales))  # the term, on the final weights
    assert rows[-1]["val/bn_l1_loss"] == pytest.approx(expected, rel=1e-4)
    assert rows[-1]["train/bn_l1_loss"] == pytest.approx(expected, rel=0.05)  # its mean over the epoch's steps
    assert any(re.search(r"box_loss\s+obj_loss\s+cls_loss\s+bn_l1_loss", r.getMessage()) for r in caplog.records)
    accumulator = event_accumulator.EventAccumulator(str(run))
    accumulator.Reload()
    logged = [event.value for event in accumulator.Scalars("train/bn_l1_loss")]
    assert logged == pytest.approx([row["train/bn_l1_loss"] for row in rows], rel=1e-5)


@pytest.fixture
def step_schedule():
    module = example("schedule")
    yield module
    del LR_SCHEDULES["step"]


def test_a_new_schedule_is_chosen_by_name_and_set_every_iteration(tiny, tmp_path, step_schedule):
    recorder = RecordLearningRates()
    config = tiny_config(tiny, tmp_path, lr_schedule="step", epochs=4)  # 2 batches per epoch
    Trainer(config, callbacks=[recorder]).fit()
    lr0 = config.hyp.lr0
    weight_rates = [rates[1] for rates in recorder.rates]
    assert weight_rates == pytest.approx([lr0, lr0, lr0, lr0, lr0 / 10, lr0 / 10, lr0 / 100, lr0 / 100])


def test_a_hook_ends_the_run_cleanly(tiny, tmp_path):
    TimeBudget = example("hook").TimeBudget
    trainer = Trainer(tiny_config(tiny, tmp_path, epochs=5), callbacks=[TimeBudget(0.0)])
    metrics = trainer.fit()
    assert trainer.state.stop_reason == "time budget of 0 s spent"
    assert trainer.state.epoch == 0 and trainer.state.batch_index == 0  # after the first step of 2
    assert [row["epoch"] for row in read_results(trainer.save_dir / "results.csv")] == [0]
    last = load_checkpoint(trainer.checkpointer.last)
    assert last["epoch"] == 0 and last["optimizer"] is None  # saved, then stripped as at any run's end
    assert metrics is not None and trainer.checkpointer.best.exists()  # best.pt validated as usual


def test_val_period_validates_every_nth_epoch_and_the_last(tiny, tmp_path):
    trainer = Trainer(tiny_config(tiny, tmp_path, epochs=5, val_period=2))
    validated, validate = [], trainer.validate
    trainer.validate = lambda: validated.append(trainer.state.epoch) or validate()
    trainer.fit()
    assert validated == [1, 3, 4]  # epochs 2, 4 and the last, 5 (1-based)
    rows = read_results(trainer.save_dir / "results.csv")
    assert [row["epoch"] for row in rows] == [0, 1, 2, 3, 4]
    # an epoch between validations shows the latest validation's figures
    assert rows[2]["metrics/mAP_0.5:0.95"] == rows[1]["metrics/mAP_0.5:0.95"]
    assert trainer.state.best_epoch in validated


# -- schedules per iteration ------------------------------------------------------------------------------------------


def test_the_ema_follows_the_hyp_keys(tiny, tmp_path):
    """hyp ema_decay 0 saves the weights as trained; the default averages them (YOLOv5's 0.9999, tau 2000)."""
    config = tiny_config(tiny, tmp_path, epochs=1, noval=True)
    averaged = Trainer(config)
    averaged.fit()
    off = Trainer(dataclasses.replace(config, name="off", hyp=dataclasses.replace(config.hyp, ema_decay=0.0)))
    off.fit()
    assert (averaged.ema.max_decay, averaged.ema.tau, off.ema.max_decay) == (0.9999, 2000.0, 0.0)
    for trainer, same in ((averaged, False), (off, True)):
        weights = trainer.model.state_dict()
        equal = [torch.equal(v, weights[k]) for k, v in trainer.ema.ema.state_dict().items() if v.is_floating_point()]
        assert all(equal) if same else not all(equal)


def test_onecycle_learning_rates_follow_torch_one_cycle_lr_every_iteration(tiny, tmp_path):
    recorder = RecordLearningRates()
    config = tiny_config(tiny, tmp_path, lr_schedule="onecycle", epochs=3, optimizer="SGD")
    trainer = Trainer(config, callbacks=[recorder])
    trainer.fit()
    hyp = config.hyp
    reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=hyp.lr0, momentum=hyp.momentum)
    reference = torch.optim.lr_scheduler.OneCycleLR(
        reference_optimizer, max_lr=hyp.lr0, total_steps=6, pct_start=0.3, div_factor=25.0,
        final_div_factor=1 / (25.0 * hyp.lrf), base_momentum=0.85, max_momentum=hyp.momentum,
    )  # fmt: skip
    expected = []
    for _ in range(6):
        expected.append(reference_optimizer.param_groups[0]["lr"])
        reference_optimizer.step()
        reference.step()
    assert [rates[1] for rates in recorder.rates] == pytest.approx(expected, rel=1e-9)
    assert trainer.warmup_iterations == 0  # 1cycle's rising phase is its warmup


# -- assembling a trainer ---------------------------------------------------------------------------------------------


def test_model_loss_and_loader_can_be_handed_in(tiny, tmp_path):
    model = DetectionModel(tiny["cfg"], nc=8)
    loader, _ = create_dataloader(
        Path(tiny["data"]).parent / "images" / "train", imgsz=64, batch_size=4, hyp=load_hyp("hyp.no-augmentation.yaml")
    )
    calls = []

    def loss(raw_maps, targets):
        calls.append(len(targets))
        return {"mean_logit": sum(r.float().sigmoid().mean() for r in raw_maps)}

    trainer = Trainer(tiny_config(tiny, tmp_path, epochs=1, noval=True), model=model, loss=loss, train_loader=loader)
    assert trainer.model is model and trainer.loss_fn is loss and trainer.train_loader is loader
    trainer.fit()
    assert len(calls) == 2 + 1  # 2 training steps, then the final validation's one batch of 4 images
    header = (trainer.save_dir / "results.csv").read_text().splitlines()[0]
    assert "train/mean_logit_loss" in header and "train/box_loss" not in header


# -- options checked before anything is written ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data": "missing.yaml"}, "missing.yaml"),
        ({"cfg": "yolov5q.yaml"}, "yolov5q.yaml"),
        ({"amp": "fp16"}, "--amp fp16 needs a CUDA device"),
        ({"lr_schedule": "cosin"}, "did you mean 'cosine'"),
        ({"lr_schedule": "cosine-restarts", "schedule": {"t0": 0}}, "schedule.t0"),
        ({"batch_size": 0}, "--batch-size"),
        ({"freeze": (100,)}, "--freeze 100: that freezes every layer with parameters"),
    ],
)
def test_refused_options_leave_no_run_folder(tiny, tmp_path, changes, message):
    config = tiny_config(tiny, tmp_path)
    schedule = changes.pop("schedule", None)
    config = dataclasses.replace(config, **changes)
    if schedule:
        config = dataclasses.replace(config, schedule=dataclasses.replace(config.schedule, **schedule))
    with pytest.raises(DetectorError, match=message):
        Trainer(config)
    assert not (tmp_path / "runs").exists()


def test_autobatch_on_cpu_says_it_is_cuda_only_and_uses_the_default(tiny, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="detector"):
        trainer = Trainer(tiny_config(tiny, tmp_path, batch_size=-1, epochs=1))
    assert trainer.config.batch_size == 16 and trainer.batch_size == 16
    assert any("AutoBatch (--batch-size -1) sizes batches to CUDA memory" in r.getMessage() for r in caplog.records)
    saved = yaml.safe_load((trainer.save_dir / "config.yaml").read_text())
    assert saved["batch_size"] == 16  # the run records the batch it used: --resume repeats it


def test_image_sizes_off_the_stride_are_rounded_once_each_under_their_own_flag(tiny, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="detector"):
        trainer = Trainer(tiny_config(tiny, tmp_path, imgsz=70, epochs=1))
        sized = Trainer(tiny_config(tiny, tmp_path, imgsz=70, val_imgsz=100, epochs=1, name="sized"))
    assert (trainer.imgsz, trainer.val_imgsz, sized.imgsz, sized.val_imgsz) == (96, 96, 96, 128)
    rounded = [r.getMessage() for r in caplog.records if "must be a multiple" in r.getMessage()]
    assert rounded == [
        "WARNING: --imgsz 70 must be a multiple of the max stride 32; using [96, 96]",
        "WARNING: --imgsz 70 must be a multiple of the max stride 32; using [96, 96]",
        "WARNING: --val-imgsz 100 must be a multiple of the max stride 32; using [128, 128]",
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.fresh_process  # the malloc policy is the process's (tests/conftest.py)
def test_the_training_process_keeps_the_memory_it_frees(tiny, tmp_path):
    """A training step frees and reallocates the same activation sizes; glibc hands large blocks back and faults them
    in again (24,000 faults, 12% of a yolov5n step at 320 on the CPU). After a Trainer is built, they are reused."""
    default = faults_of_a_48mb_block()
    Trainer(tiny_config(tiny, tmp_path))
    kept = faults_of_a_48mb_block()
    assert default > 5 * 12_000 * 0.9, default  # 48 MB = 12,288 pages, every time
    assert kept < 12_288 + 500, kept  # reused: at most once more (where the heap had to move), not 5 times
