"""Device selection, seeding and other small torch helpers shared by every task."""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from detector.errors import ConfigError

LOGGER = logging.getLogger(__name__)


def select_device(device: str | int | torch.device = "", batch_size: int = 0) -> torch.device:
    """A torch.device from YOLOv5's ``--device`` syntax: "" (CUDA 0 if present, else CPU), "cpu", "0", "0,1", "mps".

    Asking for CUDA on a machine without it is a one-line ConfigError, never a silent fall-back to the CPU.
    Under torchrun (LOCAL_RANK set) each process takes the GPU of its local rank.
    """
    if isinstance(device, torch.device):
        return device
    spec = str(device).strip().lower().replace("cuda:", "").replace(" ", "")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("--device mps: Apple MPS is not available on this machine")
        return torch.device("mps")
    if spec == "":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        spec = "0"
    ids = [s for s in spec.split(",") if s]
    if not all(s.isdigit() for s in ids):
        raise ConfigError(f"--device {device!r}: expected 'cpu', 'mps', a CUDA index like '0' or a list like '0,1'")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    count = torch.cuda.device_count()
    if bad := [i for i in ids if int(i) >= count]:
        raise ConfigError(f"--device {device}: CUDA device {bad[0]} does not exist ({count} visible)")
    if len(ids) > 1 and batch_size > 0 and batch_size % len(ids):
        raise ConfigError(f"--batch-size {batch_size} is not a multiple of the {len(ids)} devices in --device {device}")
    local_rank = int(os.environ.get("LOCAL_RANK", "-1"))
    index = int(ids[local_rank]) if 0 <= local_rank < len(ids) else int(ids[0])
    return torch.device("cuda", index)


def device_ids(device: str) -> list[int]:
    """CUDA indices named by a ``--device`` string ("0,1" -> [0, 1]; "cpu" or "" -> [])."""
    spec = str(device).strip().lower().replace("cuda:", "")
    return [int(s) for s in spec.split(",") if s.strip().isdigit()]


def init_seeds(seed: int = 0, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        os.environ["PYTHONHASHSEED"] = str(seed)


def time_sync(device: torch.device | None = None) -> float:
    """time.perf_counter() after waiting for queued CUDA work, so GPU timings are honest."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# oneDNN's instruction-set caps (ONEDNN_MAX_CPU_ISA, or the older DNNL_MAX_CPU_ISA) below which it has no bfloat16
# dot products and emulates them: torch's and OpenVINO's oneDNN both read the variable
_ISA_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def onednn_isa_cap() -> str:
    """The instruction-set cap the user set for oneDNN (``ONEDNN_MAX_CPU_ISA``, else ``DNNL_MAX_CPU_ISA``),
    upper-case, or "" when none is set."""
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        value = os.environ.get(name, "").strip().upper()
        if value:
            return value
    return ""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX): there bf16 convolutions run about twice as
    fast as fp32; elsewhere oneDNN emulates bf16, which measured 10x slower than fp32 for yolov5n training. A
    ``ONEDNN_MAX_CPU_ISA`` cap below AVX512_CORE_BF16 takes the native instructions away (OpenVINO's bf16 yolov5n at
    640 ran 5.5x slower under AVX512_CORE_VNNI on an AMX Xeon), so it counts as none."""
    if onednn_isa_cap() in _ISA_CAPS_WITHOUT_BF16:
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def no_native_bf16_reason() -> str:
    """Why bf16 would be emulated here, for a warning: the user's oneDNN cap, else the CPU itself."""
    cap = onednn_isa_cap()
    if cap in _ISA_CAPS_WITHOUT_BF16:
        return f"oneDNN is capped at {cap} (ONEDNN_MAX_CPU_ISA), below native bfloat16"
    return "this CPU has no native bfloat16 (AVX512-BF16 or AMX)"


def half_precision_dtype(device: torch.device) -> torch.dtype | None:
    """What --half computes in on ``device``: fp16 on CUDA, bf16 on a CPU with native bf16, else None (fp32)."""
    if device.type == "cuda":
        return torch.float16
    return torch.bfloat16 if device.type == "cpu" and cpu_has_native_bf16() else None


def describe_device(device: torch.device) -> str:
    """One line naming the device, e.g. 'CUDA:0 (NVIDIA H100, 80GiB)' or 'CPU (2 threads)'."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"CUDA:{device.index} ({props.name}, {props.total_memory / 2**30:.0f}GiB)"
    return f"{device.type.upper()} ({torch.get_num_threads()} threads)"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside a DistributedDataParallel / DataParallel wrapper, else the model itself."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


@contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Every buffer of ``module`` (BatchNorm running statistics and batch counts, any normalisation's state) the
    same after the block as before; constant buffers (anchors, strides) are copied back unchanged.

    Used where a forward must not count as a step: SAM's second pass at perturbed weights, the recomputation of a
    checkpointed layer in backward, the --compile probe on a blank batch.
    """
    saved = [(buffer, buffer.detach().clone()) for buffer in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)
