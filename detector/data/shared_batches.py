"""Batch slots in shared memory that DataLoader workers reuse, so a batch reaches the main process in memory
that is already mapped.

By default torch hands each batch a worker makes to the main process in new shared memory: the worker creates a
file in /dev/shm, copies the batch into it page by page (every page a fault, 2-4 us in a virtual machine), sends
its descriptor over a socket, and the main process maps it and faults the pages in again as it reads them. For a
batch of 16 images at ``--img 320`` that is about 4.5 ms of a worker's time, 7% of what the batch costs it.

:class:`BatchSlots` maps a few batch-sized slots per worker once, in the main process before the workers start.
A worker stacks its images straight into one of its free slots and sends only the slot's number; the main process
turns that into a tensor over the slot. The slot stays taken while any tensor over it lives (views included: the
slot is released with the tensor's storage), so a batch the caller keeps is never overwritten; a worker that finds
all its slots taken, or a batch larger than a slot, falls back to torch's own way for that batch.
"""

from __future__ import annotations

import multiprocessing
import uuid
import weakref
from collections.abc import Sequence
from multiprocessing.context import BaseContext
from typing import Any

import numpy as np
import torch
from torch.utils.data import get_worker_info

# The slots of each live loader in this process, by key: how a slot number sent by a worker finds its memory.
_REGISTRY: weakref.WeakValueDictionary[str, BatchSlots] = weakref.WeakValueDictionary()


class BatchSlots:
    """``slots_per_worker`` slots of ``capacity`` bytes for each of ``workers`` DataLoader workers.

    Make it in the main process before the workers start and call :meth:`stack` in the collate function. The
    memory is reserved, not touched: pages are allocated as slots are first used. A DataLoader lets each worker
    run ``prefetch_factor`` batches ahead (2 by default); two more slots cover the batch in use and the one before.
    ``context`` is the DataLoader's ``multiprocessing_context`` (None: the default start method).
    """

    def __init__(
        self, workers: int, capacity: int, slots_per_worker: int = 4, context: str | BaseContext | None = None
    ) -> None:
        if workers < 1 or capacity < 1 or slots_per_worker < 1:
            raise ValueError(
                f"BatchSlots needs workers, capacity and slots >= 1, got {workers}, {capacity}, {slots_per_worker}"
            )
        self.key = uuid.uuid4().hex
        self.capacity = capacity
        self.memory = torch.UntypedStorage._new_shared(workers * slots_per_worker * capacity)
        self.taken = torch.zeros(workers, slots_per_worker, dtype=torch.uint8).share_memory_()
        # a semaphore of the workers' start method: it also orders a slot's release before the slot's reuse
        self.lock = (context if isinstance(context, BaseContext) else multiprocessing.get_context(context)).Lock()
        _REGISTRY[self.key] = self

    def __setstate__(self, state: dict[str, Any]) -> None:  # in a spawned worker (torch shares the memory)
        self.__dict__.update(state)
        _REGISTRY[self.key] = self

    def _slot(self, worker: int, slot: int, shape: tuple[int, ...]) -> np.ndarray:
        start = (worker * self.taken.shape[1] + slot) * self.capacity
        count = int(np.prod(shape))
        flat = torch.empty(0, dtype=torch.uint8).set_(self.memory, start, (count,), (1,))
        return flat.numpy().reshape(shape)

    def _claim(self, worker: int) -> int | None:
        taken = self.taken.numpy()[worker]
        with self.lock:
            free = np.flatnonzero(taken == 0)
            if not len(free):
                return None
            taken[free[0]] = 1
            return int(free[0])

    def release(self, worker: int, slot: int) -> None:
        """Give a slot back (called when the last tensor over it is freed)."""
        with self.lock:
            self.taken.numpy()[worker, slot] = 0

    def stack(self, arrays: Sequence[np.ndarray]) -> torch.Tensor | SlotImages:
        """``np.stack(arrays)`` (B, ...): into a free slot in a worker when uint8 and small enough, else a tensor of
        its own. In a worker the result is a :class:`SlotImages`, which arrives in the main process as the tensor.
        """
        shape = (len(arrays), *arrays[0].shape)
        info = get_worker_info()
        fits = arrays[0].dtype == np.uint8 and int(np.prod(shape)) <= self.capacity
        slot = self._claim(info.id) if info is not None and fits else None
        if slot is None:
            return torch.from_numpy(np.stack(arrays))
        try:
            np.stack(arrays, out=self._slot(info.id, slot, shape))
        except BaseException:
            self.release(info.id, slot)
            raise
        return SlotImages(self.key, info.id, slot, shape)

    def open(self, worker: int, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor over a filled slot; the slot is released when its storage is freed."""
        return torch.from_numpy(np.asarray(_Lease(self, worker, slot, self._slot(worker, slot, shape))))


class SlotImages:
    """A batch a worker stacked into a slot; unpickled in the main process it becomes the tensor over that slot."""

    __slots__ = ("key", "shape", "slot", "worker")

    def __init__(self, key: str, worker: int, slot: int, shape: tuple[int, ...]) -> None:
        self.key, self.worker, self.slot, self.shape = key, worker, slot, shape

    def __reduce__(self) -> tuple:
        return _open_slot, (self.key, self.worker, self.slot, self.shape)


def _open_slot(key: str, worker: int, slot: int, shape: tuple[int, ...]) -> torch.Tensor:
    return _REGISTRY[key].open(worker, slot, shape)


class _Lease:
    """Lends a slot's memory to NumPy (``__array_interface__``); the array keeps it as its base, the tensor keeps
    the array, so this is freed - and the slot released - with the last tensor or view over the slot."""

    def __init__(self, slots: BatchSlots, worker: int, slot: int, view: np.ndarray) -> None:
        self.__array_interface__ = view.__array_interface__
        self._view = view  # keeps the mapping alive
        self._release = (slots, worker, slot)

    def __del__(self) -> None:
        slots, worker, slot = self._release
        slots.release(worker, slot)


def by_value(tensor: torch.Tensor) -> torch.Tensor | _ByValue:
    """In a worker, a small tensor to send pickled by value instead of through new shared memory (torch's way, a
    file in /dev/shm and a socket round trip per tensor); in the main process the tensor itself."""
    return tensor if get_worker_info() is None else _ByValue(tensor.numpy())


class _ByValue:
    __slots__ = ("array",)

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __reduce__(self) -> tuple:
        return torch.from_numpy, (self.array,)
