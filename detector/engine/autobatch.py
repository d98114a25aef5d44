"""AutoBatch (``--batch-size -1``): the largest training batch that fits a fraction of the GPU's memory.

The model is trained for one forward/backward pass at a few small batch sizes on dummy images; the peak memory
grows linearly with the batch, so a straight line through those points says how many images fit in
``fraction`` of the device's memory. CUDA only: on the CPU (or MPS) memory is not the limit that matters, and
the run keeps the default batch size.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from detector.utils.torch_utils import describe_device

LOGGER = logging.getLogger(__name__)

PROBE_BATCH_SIZES = (1, 2, 4, 8, 16)
DEFAULT_FRACTION = 0.8
MAX_BATCH_SIZE = 1024


def choose_batch_size(
    measurements: Sequence[tuple[int, float]], budget_bytes: float, *, maximum: int = MAX_BATCH_SIZE
) -> int:
    """The batch size whose predicted memory fits ``budget_bytes``, from (batch size, peak bytes) measurements.

    A least-squares line ``bytes = slope * batch + intercept`` through the measurements is solved for the budget;
    the result is at least 1, at most ``maximum``, and never above a measured batch size that already went over.
    """
    finite = [(b, m) for b, m in measurements if np.isfinite(m)]  # an out-of-memory probe is measured as inf
    if len(finite) < 2:
        raise ValueError(f"AutoBatch needs at least two finite measurements, got {list(measurements)}")
    sizes = np.array([b for b, _ in finite], dtype=float)
    used = np.array([m for _, m in finite], dtype=float)
    slope, intercept = np.polyfit(sizes, used, 1)
    if slope <= 0:  # memory did not grow with the batch: nothing to extrapolate
        return int(min(maximum, sizes.max()))
    batch = int((budget_bytes - intercept) // slope)
    over = [b for b, m in measurements if m > budget_bytes]
    if over:
        batch = min(batch, min(over) - 1)
    return max(1, min(batch, maximum))


def autobatch(
    model: nn.Module,
    imgsz: int,
    device: torch.device,
    *,
    default: int = 16,
    fraction: float = DEFAULT_FRACTION,
    amp_dtype: torch.dtype | None = None,
) -> int:
    """The batch size for ``--batch-size -1``: ~``fraction`` of ``device``'s memory on CUDA, ``default`` elsewhere."""
    if device.type != "cuda":
        LOGGER.info(
            "AutoBatch (--batch-size -1) sizes batches to CUDA memory; on %s training uses --batch-size %d",
            describe_device(device),
            default,
        )
        return default
    probe = copy.deepcopy(model).to(device).train()
    total = torch.cuda.get_device_properties(device).total_memory
    measurements: list[tuple[int, float]] = []
    for batch_size in PROBE_BATCH_SIZES:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        try:
            images = torch.zeros(batch_size, 3, imgsz, imgsz, device=device)
            with torch.autocast("cuda", dtype=amp_dtype, enabled=amp_dtype is not None):
                outputs = probe(images)
            sum(output.float().sum() for output in outputs).backward()
            probe.zero_grad(set_to_none=True)
        except torch.OutOfMemoryError:
            measurements.append((batch_size, float("inf")))
            break
        measurements.append((batch_size, float(torch.cuda.max_memory_allocated(device))))
    del probe
    torch.cuda.empty_cache()
    if sum(np.isfinite(m) for _, m in measurements) < 2:
        LOGGER.warning(
            "WARNING: AutoBatch could not measure %s; using --batch-size %d", describe_device(device), default
        )
        return default
    batch = choose_batch_size(measurements, fraction * total)
    LOGGER.info(
        "AutoBatch: --batch-size %d for %.0f%% of %s's %.1f GiB at --imgsz %d",
        batch,
        100 * fraction,
        describe_device(device),
        total / 2**30,
        imgsz,
    )
    return batch
