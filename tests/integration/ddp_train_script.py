"""Run under torchrun by test_train_ddp.py: trains the tiny model with detector.train() and saves each rank's weights.

usage: torchrun --nproc_per_node 2 ddp_train_script.py OUT_DIR DATA_YAML MODEL_YAML MODE   (MODE: ok, raise, empty)
"""

from __future__ import annotations

import os
import sys

import torch

import detector
import detector.engine.trainer as trainer_module
from detector.engine.callbacks import Callbacks

out_dir, data, cfg, mode = sys.argv[1:5]
rank = int(os.environ["RANK"])
callbacks = Callbacks()
callbacks.register("on_fit_end", lambda t: torch.save(t.model.state_dict(), f"{out_dir}/rank{rank}.pt"))
if mode == "raise":

    def fail_on_rank1(trainer) -> None:
        if rank == 1 and trainer.epoch == 1:
            raise RuntimeError("injected failure on rank 1")

    callbacks.register("on_epoch_start", fail_on_rank1)
if mode == "empty":
    create_dataloader = trainer_module.create_dataloader

    def no_batches_on_rank1(*args, **kwargs):
        loader, dataset = create_dataloader(*args, **kwargs)
        return ([] if rank == 1 else loader), dataset

    trainer_module.create_dataloader = no_batches_on_rank1

detector.train(
    data=data,
    cfg=cfg,
    imgsz=64,
    batch_size=8,
    epochs=3,
    workers=0,
    device="cpu",
    project=f"{out_dir}/runs",
    name="ddp",
    noautoanchor=True,
    noplots=True,
    hyp="hyp.no-augmentation.yaml",
    callbacks=callbacks,
)
