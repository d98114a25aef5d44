"""Counting page faults: whether a process reuses the memory it frees (glibc's malloc policy)."""

from __future__ import annotations

import resource

import torch


def faults_of_a_48mb_block(times: int = 5) -> int:
    """Minor page faults of allocating, filling and freeing a 48 MB array ``times`` times: glibc maps a block over
    its mmap threshold (at most 32 MB by default) anew each time, so every page faults in again."""
    torch.ones(48 << 20, dtype=torch.uint8)  # once, so only reuse is counted (torch: 4 KB pages, NumPy: huge pages)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        torch.ones(48 << 20, dtype=torch.uint8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
