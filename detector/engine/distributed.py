"""Distributed data-parallel helpers: the process's place in the group, set-up with timeouts, self-launch.

One process per device, started by ``torchrun`` (which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT)::

    torchrun --nproc_per_node 2 train.py --device 0,1 ...                       # one machine, 2 GPUs
    torchrun --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500 \\
             --nproc_per_node 8 train.py ...    # machine 0 of 2; node_rank 1 on the other
    torchrun --nproc_per_node 2 train.py --device cpu ...                         # 2 CPU processes (gloo backend)

``train.py --device 0,1`` without torchrun starts those processes itself (:func:`launch`).
Every collective has a timeout (``DETECTOR_DDP_TIMEOUT`` seconds, default 1800), so a rank that dies or stalls
ends the run with an error instead of a hang; torchrun also stops the other ranks when one fails.
"""

from __future__ import annotations

import datetime
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from detector.errors import ConfigError
from detector.utils.torch_utils import unwrap_model

LOGGER = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800  # validation on rank 0 keeps the others waiting at a barrier: allow a long one


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine (-1 = alone)."""

    rank: int = 0
    local_rank: int = -1
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, plots, validates and saves."""
        return self.rank == 0


def context_from_env() -> DistributedContext:
    """The context torchrun describes in the environment; a single process when those variables are absent."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    return DistributedContext(
        rank=int(os.environ.get("RANK", "0")),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        world_size=world_size,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size))),
    )


def timeout_seconds() -> float:
    """The collective timeout: ``DETECTOR_DDP_TIMEOUT`` seconds, default 1800."""
    value = os.environ.get("DETECTOR_DDP_TIMEOUT", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(value)
    except ValueError:
        raise ConfigError(f"DETECTOR_DDP_TIMEOUT={value!r}: expected a number of seconds") from None
    if seconds <= 0:
        raise ConfigError(f"DETECTOR_DDP_TIMEOUT={value!r}: expected a positive number of seconds")
    return seconds


def init_distributed(context: DistributedContext, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU) with a timeout; no-op for a single process."""
    if not context.is_distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
        # Each CPU process gets its share of the cores; torch's default (all cores each) oversubscribes them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, context.local_world_size)))
    timeout = datetime.timedelta(seconds=timeout_seconds())
    dist.init_process_group(backend=backend, timeout=timeout)
    LOGGER.info("DDP: rank %d of %d on %s (%s backend)", context.rank, context.world_size, device, backend)


def destroy_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.is_distributed:
        dist.barrier()


def broadcast_object(value: Any, context: DistributedContext) -> Any:
    """``value`` from rank 0 on every rank (e.g. the early-stop decision made after rank 0's validation)."""
    if not context.is_distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_ranks_true(flag: bool, context: DistributedContext, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (all ranks must take the same branch around a collective)."""
    if not context.is_distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def agree_num_batches(num_batches: int, context: DistributedContext, device: torch.device) -> int:
    """The number of batches every rank runs per epoch: the smallest over ranks.

    DDP hangs when one rank makes more backward passes than another, so all ranks stop at the shortest loader.
    A rank with no batch at all is an error on every rank, raised at once rather than at the first collective.
    """
    if not context.is_distributed:
        return num_batches
    counts = torch.tensor([num_batches, -num_batches], dtype=torch.int64, device=device)
    dist.all_reduce(counts, op=dist.ReduceOp.MIN)
    smallest, largest = int(counts[0]), -int(counts[1])
    if smallest == 0:
        raise RuntimeError(
            f"DDP: a rank has no training batches (rank {context.rank} has {num_batches}); "
            "use fewer processes or a smaller --batch-size for this dataset"
        )
    if smallest != largest:
        LOGGER.warning("DDP: ranks have %d-%d batches per epoch; each runs %d", smallest, largest, smallest)
    return smallest


def average_batchnorm_statistics(model: nn.Module, context: DistributedContext) -> None:
    """Replace each BatchNorm's running mean/variance by its average over ranks (once per epoch, as timm does).

    Each rank updates these statistics from its own share of the batch; averaging them estimates the statistics
    of the whole batch and leaves every rank with identical weights (rank 0's are the ones validated and saved).
    """
    if not context.is_distributed:
        return
    for module in unwrap_model(model).modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
            for statistic in (module.running_mean, module.running_var):
                dist.all_reduce(statistic, op=dist.ReduceOp.SUM)
                statistic.div_(context.world_size)


def replicas_agree(model: nn.Module, context: DistributedContext, device: torch.device) -> bool:
    """Whether every rank holds the same weights (per-tensor float64 sums compared exactly across ranks)."""
    if not context.is_distributed:
        return True
    state = unwrap_model(model).state_dict()
    sums = torch.stack([t.detach().double().sum() for t in state.values() if t.is_floating_point()]).to(device)
    gathered = [torch.zeros_like(sums) for _ in range(context.world_size)]
    dist.all_gather(gathered, sums)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def per_rank_batch_size(total: int, context: DistributedContext) -> int:
    """--batch-size is the total over all ranks; each rank takes an equal share."""
    if total < 1:
        raise ConfigError(f"--batch-size {total}: expected a positive number of images")
    if total % context.world_size:
        raise ConfigError(f"--batch-size {total} is not a multiple of the {context.world_size} DDP processes")
    return total // context.world_size


def wrap_model(model: nn.Module, device: torch.device, context: DistributedContext, sync_bn: bool) -> nn.Module:
    """The model in DistributedDataParallel (with SyncBatchNorm when asked, CUDA only); unchanged if alone."""
    if not context.is_distributed:
        if sync_bn:
            LOGGER.warning("--sync-bn has no effect without DDP (one process)")
        return model
    if sync_bn:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
            LOGGER.info("Using SyncBatchNorm")
        else:
            LOGGER.warning("--sync-bn needs CUDA devices; CPU processes keep per-process BatchNorm statistics")
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, output_device=device_ids and device_ids[0])


def launch_command(argv: Sequence[str], nproc: int, module: str = "detector.cli.train") -> list[str]:
    """The torchrun command that runs ``python -m module argv`` in ``nproc`` processes on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        module,
        *argv,
    ]


def launch(argv: Sequence[str], nproc: int, module: str = "detector.cli.train") -> int:
    """Run ``python -m module argv`` under torchrun with ``nproc`` processes and return its exit status.

    Used for ``train.py --device 0,1`` started without torchrun. The children see WORLD_SIZE and train
    normally; torchrun stops all of them when one fails.
    """
    command = launch_command(argv, nproc, module)
    LOGGER.info("DDP: launching %d processes: %s", nproc, " ".join(command))
    return subprocess.call(command)
