"""Fixtures of the training tests: one torch thread, and a tiny dataset and model that train in seconds."""

from __future__ import annotations

import pytest
import torch
import yaml

from detector.config import MODEL_CONFIG_DIR
from detector.data.builtin import ensure_builtin_dataset


@pytest.fixture
def one_thread():
    """One torch thread: these tensors are tiny, and two threads crawl when other processes share the 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> dict:
    """8 train + 4 val built-in images and a yolov5n variant at 1/8 width (~0.1 M parameters)."""
    root = tmp_path_factory.mktemp("tiny")
    data = ensure_builtin_dataset(root / "data", num_train=8, num_val=4, progress=False)
    model = yaml.safe_load((MODEL_CONFIG_DIR / "yolov5n.yaml").read_text())
    model["width_multiple"] = 0.125
    model_path = root / "tiny.yaml"
    model_path.write_text(yaml.safe_dump(model))
    return {"data": str(data), "cfg": str(model_path), "root": root}
