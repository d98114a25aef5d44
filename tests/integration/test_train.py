"""Training end to end on a tiny model and dataset: learning, non-finite losses, seeds, train.py outputs."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny_runs import tiny_config

from detector.engine.callbacks import Callbacks
from detector.engine.loggers import read_results
from detector.engine.trainer import Trainer, TrainingDivergedError
from detector.errors import DetectorError
from detector.utils.checkpoint import load_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout, where train.py is


pytestmark = pytest.mark.usefixtures("one_thread")


def epoch_losses(callbacks: Callbacks) -> list[float]:
    losses: list[float] = []
    callbacks.register("on_epoch_end", lambda trainer: losses.append(sum(trainer.epoch_record.train_losses.values())))
    return losses


def test_tiny_model_learns(tiny, tmp_path):
    config = tiny_config(
        tiny, tmp_path, epochs=24, optimizer="Adam", hyp=dataclasses.replace(tiny_config(tiny, tmp_path).hyp, lr0=0.01)
    )
    callbacks = Callbacks()
    losses = epoch_losses(callbacks)
    Trainer(config, callbacks=callbacks).fit()
    assert len(losses) == 24
    assert losses[-1] < 0.7 * losses[0], losses  # one optimizer step per epoch on the same 8 images


@pytest.mark.parametrize(("nbs", "optimizer_steps"), [(4, 2), (64, 1)])
def test_nominal_batch_size_sets_accumulation_and_weight_decay(tiny, tmp_path, nbs, optimizer_steps):
    """Batches of 4 over 8 images: nbs 4 steps after each batch, nbs 64 only at the epoch's end."""
    config = tiny_config(tiny, tmp_path, epochs=1, batch_size=4, nbs=nbs, optimizer="Adam")
    trainer = Trainer(config)
    trainer.fit()
    accumulate = max(round(nbs / 4), 1)
    assert trainer.accumulate == accumulate
    weight_decays = [group["weight_decay"] for group in trainer.optimizer.param_groups]
    assert max(weight_decays) == pytest.approx(config.hyp.weight_decay * 4 * accumulate / nbs)
    steps = {int(state["step"]) for state in trainer.optimizer.state.values()}
    assert steps == {optimizer_steps}


@pytest.mark.parametrize("fl_gamma", [0.0, 1.5])
def test_focal_loss_from_scratch_starts_classes_at_the_retinanet_prior(tiny, tmp_path, fl_gamma):
    config = tiny_config(tiny, tmp_path)
    trainer = Trainer(dataclasses.replace(config, hyp=dataclasses.replace(config.hyp, fl_gamma=fl_gamma)))
    head = trainer.model.detect
    class_biases = torch.cat([conv.bias.view(head.na, -1)[:, 5:].flatten() for conv in head.m])
    if fl_gamma:  # exactly sigmoid^-1(0.01)
        assert torch.allclose(class_biases, torch.full_like(class_biases, math.log(0.01 / 0.99)), atol=1e-6)
    else:  # YOLOv5's prior log(0.6 / (nc - 0.99)) added to the random initial biases
        assert class_biases.mean().item() == pytest.approx(math.log(0.6 / (head.nc - 0.99)), abs=0.2)


class NonFiniteAt:
    """Wraps a loss function; the calls whose (0-based) number is in ``calls`` return a NaN loss."""

    def __init__(self, loss_fn, calls):
        self.loss_fn, self.calls, self.count = loss_fn, set(calls), 0

    def __call__(self, raw, targets):
        terms = dict(self.loss_fn(raw, targets))
        self.count += 1
        if self.count - 1 in self.calls:
            terms["obj"] = terms["obj"] * float("nan")
        return terms


def test_nonfinite_loss_is_skipped_then_recovered_from(tiny, tmp_path, caplog):
    config = tiny_config(tiny, tmp_path, epochs=4, batch_size=4)  # 2 steps per epoch
    trainer = Trainer(config)
    snapshots = []
    trainer.callbacks.register(
        "on_epoch_end", lambda t: snapshots.append(t.model.state_dict()["model.0.conv.weight"].clone())
    )
    # call 1: one skipped step; calls 4, 5, 6 (epoch 2 and 3): three in a row -> restore epoch 1's end state
    trainer.loss_fn = NonFiniteAt(trainer.loss_fn, calls={1, 4, 5, 6})
    with caplog.at_level(logging.WARNING, logger="detector"):
        trainer.fit()
    messages = [r.getMessage() for r in caplog.records]
    assert sum("step skipped" in m for m in messages) == 4
    assert sum("restored the weights of the last epoch end" in m for m in messages) == 1
    assert trainer.state.lr_factor == pytest.approx(0.1)
    assert all(torch.isfinite(v).all() for v in trainer.model.state_dict().values() if v.is_floating_point())
    assert load_checkpoint(trainer.checkpointer.last)["lr_factor"] == pytest.approx(0.1)  # a resumed run keeps it


def test_persistent_nonfinite_loss_stops_with_a_clear_error(tiny, tmp_path):
    trainer = Trainer(tiny_config(tiny, tmp_path, epochs=4, batch_size=4))
    trainer.loss_fn = NonFiniteAt(trainer.loss_fn, calls=range(2, 100))
    with pytest.raises(TrainingDivergedError, match=r"non-finite .* even after restoring") as raised:
        trainer.fit()
    assert trainer.state.lr_factor == pytest.approx(0.1)  # the recovery was tried once
    assert isinstance(raised.value, DetectorError)  # train.py prints it as one "error:" line, no traceback


def test_same_seed_gives_identical_weights_and_multi_scale_bf16_run(tiny, tmp_path):
    states = []
    for name in ("a", "b"):
        config = tiny_config(tiny, tmp_path, name=name, epochs=2, batch_size=4, multi_scale=True, amp="bf16", seed=3)
        trainer = Trainer(config)
        trainer.fit()
        assert trainer.amp_dtype == torch.bfloat16
        states.append(trainer.model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_train_py_writes_the_run_folder(tiny, tmp_path):
    command = [
        sys.executable,
        "train.py",
        "--data",
        tiny["data"],
        "--cfg",
        tiny["cfg"],
        "--img",
        "64",
        "--batch-size",
        "4",
        "--epochs",
        "2",
        "--workers",
        "1",
        "--project",
        str(tmp_path / "runs"),
        "--name",
        "cli",
        "--noautoanchor",
        "--hyp",
        "hyp.no-augmentation.yaml",
        "--save-period",
        "1",
        "--ndjson-console",
        "--ndjson-file",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    run = tmp_path / "runs" / "cli"
    for name in (
        "config.yaml",
        "hyp.yaml",
        "opt.yaml",
        "results.csv",
        "results.png",
        "labels.jpg",
        "train_batch0.jpg",
        "confusion_matrix.png",
        "log.txt",
    ):
        assert (run / name).is_file(), name
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["imgsz"] == 64 and saved["hyp"]["mosaic"] == 0.0 and saved["epochs"] == 2
    assert yaml.safe_load((run / "opt.yaml").read_text())["save_dir"] == str(run)
    rows = read_results(run / "results.csv")
    assert [row["epoch"] for row in rows] == [0, 1] and all(row["train/box_loss"] > 0 for row in rows)
    # --ndjson-file / --ndjson-console: the same rows as JSON, in the file and as lines of stdout
    lines = (run / "results.ndjson").read_text().splitlines()
    assert [line for line in result.stdout.splitlines() if line.startswith("{")] == lines
    for line, row in zip(lines, rows, strict=True):
        record = json.loads(line)
        assert record.keys() == row.keys() and record == pytest.approx(row, rel=1e-5, abs=1e-9)
    last, best = load_checkpoint(run / "weights" / "last.pt"), load_checkpoint(run / "weights" / "best.pt")
    assert last["optimizer"] is None and last["model"] is not None and last["epoch"] == 1
    assert best["optimizer"] is None and best["ema"] is not None
    assert last["train_config"]["imgsz"] == 64 and last["ema"]["model.0.conv.weight"].dtype == torch.float32
    assert (run / "weights" / "epoch0.pt").is_file() and (run / "weights" / "epoch1.pt").is_file()
    assert "mAP50-95" in result.stdout + result.stderr  # the final per-class table
