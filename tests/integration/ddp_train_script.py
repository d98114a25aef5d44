"""Run under torchrun by test_train_ddp.py: trains the tiny model with detector.train() and saves each rank's weights.

usage: torchrun --nproc_per_node N ddp_train_script.py OUT_DIR DATA_YAML MODEL_YAML MODE
MODE: ok, raise, empty; equivalence (BatchNorm statistics frozen, batch 8 = one optimizer step, no warmup), which
the test runs with 1 and with 2 processes and compares.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import torch
from torch import nn

import detector
import detector.engine.trainer as trainer_module
from detector.config import load_hyp
from detector.engine.callbacks import Callbacks

out_dir, data, cfg, mode = sys.argv[1:5]
rank = int(os.environ["RANK"])
callbacks = Callbacks()
callbacks.register("on_fit_end", lambda t: torch.save(t.model.state_dict(), f"{out_dir}/rank{rank}.pt"))
if mode == "raise":

    def fail_on_rank1(trainer) -> None:
        if rank == 1 and trainer.state.epoch == 1:
            raise RuntimeError("injected failure on rank 1")

    callbacks.register("on_epoch_start", fail_on_rank1)
if mode == "empty":
    create_dataloader = trainer_module.create_dataloader

    def no_batches_on_rank1(*args, **kwargs):
        loader, dataset = create_dataloader(*args, **kwargs)
        return ([] if rank == 1 else loader), dataset

    trainer_module.create_dataloader = no_batches_on_rank1

options = {"hyp": "hyp.no-augmentation.yaml", "epochs": 3}
if mode == "equivalence":

    def freeze_batchnorm_statistics(trainer) -> None:
        """Per-rank BatchNorm batch statistics differ from the whole batch's; in eval mode they do not."""
        for module in trainer.model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eval()

    callbacks.register("on_epoch_start", freeze_batchnorm_statistics)
    callbacks.register("on_fit_start", lambda t: torch.save(t.model.state_dict(), f"{out_dir}/start{rank}.pt"))
    options = {
        "nbs": 8,
        "epochs": 2,
        "hyp": dataclasses.replace(load_hyp("hyp.no-augmentation.yaml"), warmup_epochs=0.0),
    }

detector.train(
    data=data,
    cfg=cfg,
    imgsz=64,
    batch_size=8,
    workers=0,
    device="cpu",
    project=f"{out_dir}/runs",
    name="ddp",
    noautoanchor=True,
    noplots=True,
    callbacks=callbacks,
    **options,
)
