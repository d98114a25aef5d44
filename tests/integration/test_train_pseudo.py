"""--unlabeled end to end: a tiny run whose EMA model relabels the unlabelled images every epoch, with a persistent
worker; the batches it trained on are rebuilt in this process from the generation's file, and a --resume continues
the generations."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import tiny_runs
import torch
import yaml

from detector.data.loader import collate_fn
from detector.engine import pseudo as pseudo_labelling
from detector.engine.callbacks import Callback, Callbacks
from detector.engine.hooks import ValidationHook, default_hooks
from detector.engine.pseudo import PSEUDO_LABEL_FILE, PseudoLabels
from detector.engine.trainer import Trainer

NUM_CLASSES = 8  # the built-in dataset's
WEIGHT = 0.25


class RecordingTrainer(Trainer):
    """Keeps every batch as the loader gave it (pseudo-label rows marked) and what reached the loss; validates
    nothing (the default hooks without validation: the pseudo-labeller is --unlabeled's own, and stays)."""

    def __init__(self, *args, **kwargs) -> None:
        self.records: list[dict] = []
        super().__init__(*args, **kwargs)

    def train_step(self, batch: tuple) -> dict[str, float]:
        self.records.append({"epoch": self.state.epoch, "marked": batch[1].clone(), "paths": batch[2]})
        return super().train_step(batch)

    def build_hooks(self) -> Callbacks:
        return Callbacks([hook for hook in default_hooks() if not isinstance(hook, ValidationHook)])

    def build_loss(self):
        inner = super().build_loss()

        def loss(raw_maps, targets, weights=None):
            if weights is not None:  # training (validation passes none)
                self.records[-1].update(targets=targets.cpu(), weights=weights.cpu())
            return inner(raw_maps, targets, weights)

        return loss


class KeepGenerations(Callback):
    """The pseudo-label file each epoch starts with (hooks handed in run after the pseudo-labeller's)."""

    def __init__(self) -> None:
        self.by_epoch: dict[int, PseudoLabels] = {}

    def on_epoch_start(self, trainer) -> None:
        path = trainer.save_dir / PSEUDO_LABEL_FILE
        if path.is_file():
            self.by_epoch[trainer.state.epoch] = PseudoLabels.load(path)


def test_ema_relabels_every_epoch_and_workers_train_on_each_generation(tiny, tmp_path, caplog, monkeypatch):
    data = yaml.safe_load(Path(tiny["data"]).read_text())
    data.pop("annotations")  # COCO JSON of the validation images: not needed here
    images = sorted((tiny["root"] / "data" / "images" / "train").glob("*.jpg"))
    (tmp_path / "labelled.txt").write_text("".join(f"{p}\n" for p in images[:4]))
    (tmp_path / "unlabeled.txt").write_text("".join(f"{p}\n" for p in images[4:]))  # their label files are ignored
    data.update(path=str(tmp_path), train="labelled.txt", val=str(tiny["root"] / "data" / "images" / "val"))
    (tmp_path / "half.yaml").write_text(yaml.safe_dump(data))
    config = tiny_runs.tiny_config(
        tiny,
        tmp_path,
        data=str(tmp_path / "half.yaml"),
        unlabeled=str(tmp_path / "unlabeled.txt"),
        pseudo_every=1,
        pseudo_conf=0.0,  # the tiny model is unsure of everything: keep its boxes anyway
        pseudo_weight=WEIGHT,
        epochs=2,
        batch_size=4,
        nbs=4,
        workers=1,  # one persistent worker, holding its own copy of the dataset
        val_imgsz=96,  # trains at 64: the labels are made at the size the run is validated at
    )
    generations = KeepGenerations()
    labelled_at, predict_labels = [], pseudo_labelling.predict_labels

    def recorded(model, images, *, size, **kwargs):
        labelled_at.append((size, len(images)))
        return predict_labels(model, images, size=size, **kwargs)

    monkeypatch.setattr(pseudo_labelling, "predict_labels", recorded)
    trainer = RecordingTrainer(config, callbacks=[generations])
    trainer.fit()
    assert trainer.imgsz == 64 and {size for size, _ in labelled_at} == {96}
    assert sum(count for _, count in labelled_at) == len(images) - 4  # once each, in generation 1

    # Epoch 0 trains on the labelled images only; the EMA model labels them before epoch 1.
    assert {e: (g.generation, g.epoch) for e, g in generations.by_epoch.items()} == {1: (1, 1)}
    unlabeled = {str(p) for p in images[4:]}
    first_epoch = [r for r in trainer.records if r["epoch"] == 0]
    assert first_epoch and not unlabeled & {p for r in first_epoch for p in r["paths"]}
    later = [r for r in trainer.records if r["epoch"] > 0]
    assert unlabeled <= {p for r in later for p in r["paths"]}
    for record in trainer.records:  # marked rows reach the loss with the pseudo-label weight and their class
        pseudo = record["marked"][:, 1] >= NUM_CLASSES
        assert torch.equal(record["weights"], torch.where(pseudo, WEIGHT, 1.0))
        assert torch.equal(record["targets"][:, 1], record["marked"][:, 1] % NUM_CLASSES)
    assert sum(int((r["weights"] == WEIGHT).sum()) for r in later) > 0

    # Epoch 1's batches, rebuilt here from (index, seed) with generation 1's file, are what the worker made.
    dataset, sampler = trainer.train_dataset, trainer.train_loader.sampler
    dataset.set_pseudo_labels(1, generations.by_epoch[1].by_file())
    sampler.set_epoch(1)
    keys = [(index, seed, False, 1) for index, seed, *_ in sampler]
    for number, record in enumerate(later):
        expected = collate_fn([dataset[key] for key in keys[4 * number : 4 * number + 4]])
        assert expected[2] == record["paths"]
        assert torch.equal(expected[1], record["marked"]), f"batch {number}"

    # --resume continues with the run's pseudo-labels (generation 1) and goes on numbering them.
    with caplog.at_level(logging.INFO, logger="detector"):
        resumed = RecordingTrainer(dataclasses.replace(config, resume=str(trainer.weights_dir / "last.pt"), epochs=3))
        resumed.fit()
    assert any("continuing with generation 1" in r.getMessage() for r in caplog.records)
    assert PseudoLabels.load(trainer.save_dir / PSEUDO_LABEL_FILE).generation == 2
    assert any((r["weights"] == WEIGHT).any() for r in resumed.records)
