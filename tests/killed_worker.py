"""A DataLoader whose worker is really killed (SIGKILL, as the kernel's out-of-memory killer does), shared by the
tests of how the trainer and the entry points report it."""

from __future__ import annotations

import os
import signal

import torch


class DiesInWorker(torch.utils.data.Dataset):
    """A dataset whose loader worker kills itself with SIGKILL at its first item."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> torch.Tensor:
        os.kill(os.getpid(), signal.SIGKILL)
        return torch.zeros(1)


def loader_whose_worker_dies() -> torch.utils.data.DataLoader:
    """Iterating it raises torch's RuntimeError "DataLoader worker (pid N) ..." in this process."""
    return torch.utils.data.DataLoader(DiesInWorker(), num_workers=1)
