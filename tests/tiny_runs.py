"""Training configurations small enough for tests (the ``tiny`` fixture's data and model), shared by the test
modules: 64 px, no augmentation, no warmup, no plots, no AutoAnchor, one process."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from detector.config import MODEL_CONFIG_DIR, TrainConfig, load_hyp
from detector.data.builtin import ensure_builtin_dataset


def make_tiny(root: Path, num_train: int = 8, num_val: int = 4) -> dict:
    """Built-in images under ``root`` and a yolov5n variant at 1/8 width (~0.1 M parameters) that trains in seconds:
    ``{"data": dataset YAML, "cfg": model YAML, "root": root}``."""
    data = ensure_builtin_dataset(root / "data", num_train=num_train, num_val=num_val, progress=False)
    model = yaml.safe_load((MODEL_CONFIG_DIR / "yolov5n.yaml").read_text())
    model["width_multiple"] = 0.125
    (root / "tiny.yaml").write_text(yaml.safe_dump(model))
    return {"data": str(data), "cfg": str(root / "tiny.yaml"), "root": root}


def tiny_config(tiny, tmp_path, **changes) -> TrainConfig:
    """A TrainConfig for ``tiny`` (tests/integration/conftest.py) writing under ``tmp_path``; ``changes`` win."""
    hyp = dataclasses.replace(load_hyp("hyp.no-augmentation.yaml"), warmup_epochs=0.0)
    base = TrainConfig(
        data=tiny["data"],
        cfg=tiny["cfg"],
        imgsz=64,
        batch_size=8,
        epochs=2,
        workers=0,
        noautoanchor=True,
        noplots=True,
        noval=True,
        amp="off",  # fp32, as the steps tests compose by hand (auto is bf16 on CPUs with native bf16)
        project=str(tmp_path / "runs"),
        hyp=hyp,
    )
    return dataclasses.replace(base, **changes)
