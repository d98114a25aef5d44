"""Training configurations small enough for tests (the ``tiny`` fixture's data and model), shared by the test
modules: 64 px, no augmentation, no warmup, no plots, no AutoAnchor, one process."""

from __future__ import annotations

import dataclasses

from detector.config import TrainConfig, load_hyp


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
        project=str(tmp_path / "runs"),
        hyp=hyp,
    )
    return dataclasses.replace(base, **changes)
