"""The process's memory policy with glibc's malloc: keep freed memory for reuse (hot loops), or hand it back."""

from __future__ import annotations

import ctypes
import gc
from contextlib import suppress

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
try:  # loaded here, in the parent: dlopen in a worker forked from a multi-threaded process can deadlock
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None


def keep_freed_memory(largest_block: int = 64 << 20) -> bool:
    """Make glibc's malloc keep the memory this process frees, instead of handing it back to the kernel.

    By default an image-sized block (over 128 KB, then the largest freed so far) is mmap'ed and unmapped again
    once freed, and heap space over twice that is trimmed: every image and batch of the next item is then new
    memory that faults in page by page, which costs 2-4 us a page in a virtual machine: 0.5-1 ms of every 640 px
    item in a loader worker, and about 24,000 faults (12% of the time) of every yolov5n training step at 320, batch
    16, on the CPU, and 15-20% of val.py's forward time at 320. Loader workers, the training process and val.py
    call it; :func:`release_memory` still hands the memory back where the trainer asks (between training and
    validation). Returns False where there is no glibc (macOS, musl): nothing changes there.
    """
    if _LIBC is None or not hasattr(_LIBC, "mallopt"):
        return False
    return bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, largest_block) and _LIBC.mallopt(_M_TRIM_THRESHOLD, 4 * largest_block))


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise): between training and validation the
    allocation sizes change, and without this the process's resident memory grows by the validation's share."""
    gc.collect()
    if _LIBC is not None:
        with suppress(AttributeError):  # not glibc (musl): nothing to trim
            _LIBC.malloc_trim(0)
