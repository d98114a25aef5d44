"""Fixtures of the training tests: one torch thread, and a tiny dataset and model that train in seconds."""

from __future__ import annotations

import pytest
import torch
from tiny_runs import make_tiny


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
    return make_tiny(tmp_path_factory.mktemp("tiny"), num_train=8, num_val=4)
