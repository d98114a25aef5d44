"""The training loop: ``Trainer(config).fit()`` trains, validates, checkpoints and resumes.

One epoch is ``train_one_epoch`` (a bar of ``train_step`` calls); at its end the EMA model is validated, a row
goes to results.csv and last.pt/best.pt are written atomically. Loggers and integrations are callbacks
(:mod:`detector.engine.callbacks`). What makes a run safe to interrupt and repeat:

- Epoch k's data order and augmentation come from ``(seed, k)`` (the sampler), and every other random draw of
  the epoch (multi-scale sizes, torch/NumPy global RNGs) is re-seeded from ``(seed, k)``; gradient accumulation
  never spans two epochs. A run killed at any moment resumes from its last completed epoch and, with
  ``--deterministic``, ends with the same weights as an uninterrupted run.
- A non-finite loss skips its step; several in a row restore the weights and optimizer of the last epoch end
  (kept in memory) at a tenth of the learning rate; if that fails too the run stops with a clear error.
"""

from __future__ import annotations

import copy
import ctypes
import dataclasses
import datetime
import gc
import io
import logging
import math
import random
import time
from collections.abc import Iterable, Mapping
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from detector.config import (
    BUILTIN_TRAIN_CONFIG,
    HYP_CONFIG_DIR,
    Hyperparameters,
    TrainConfig,
    ValConfig,
    build_config,
    config_to_dict,
    load_yaml,
    resolve_config_path,
    save_config,
)
from detector.data.dataset_config import load_dataset_config
from detector.data.loader import create_dataloader
from detector.data.stats import plot_labels
from detector.data.weights import labels_to_class_weights, labels_to_image_weights, reweight_by_map
from detector.engine import distributed
from detector.engine.callbacks import Callback, Callbacks, EpochRecord, StepRecord, default_callbacks, memory_usage
from detector.engine.ema import ModelEMA
from detector.engine.optim import (
    accumulate_steps,
    build_optimizer,
    lr_lambda,
    scaled_weight_decay,
    warmup,
    warmup_accumulate_steps,
    warmup_iterations,
)
from detector.engine.validator import Validator, create_val_dataloader
from detector.errors import CheckpointError, ConfigError
from detector.models.autoanchor import check_anchors
from detector.models.loading import checkpoint_model_entries, load_model, model_from_checkpoint
from detector.models.loss import DetectionLoss, initialize_focal_biases, scale_loss_gains
from detector.models.yolo import DetectionModel
from detector.ops.metrics import Metrics, fitness
from detector.utils.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, save_checkpoint
from detector.utils.files import atomic_write, increment_path
from detector.utils.logging import add_file_log, remove_file_log, setup_logging
from detector.utils.torch_utils import describe_device, init_seeds, select_device

LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL = "yolov5n.yaml"
DEFAULT_IMGSZ = 640
DEFAULT_EPOCHS = 100
MAX_GRAD_NORM = 10.0
NONFINITE_LIMIT = 3  # consecutive non-finite losses before the last good state is restored
RECOVERY_LR_FACTOR = 0.1
MULTI_SCALE_RANGE = (0.5, 1.5)
# Options that may differ from the saved run when resuming; anything else would silently change the experiment.
SAFE_RESUME_KEYS = ("workers", "device", "batch_size", "epochs", "patience")
# Where to look for the run (bare --resume searches --project); the run itself stays in its own folder.
RESUME_LOCATION_KEYS = ("project", "name", "exist_ok")


def train(callbacks: Callbacks | Iterable[Callback] | None = None, **options: Any) -> Metrics | None:
    """Python API of train.py: ``detector.train(data="coco128.yaml", weights="yolov5n.pt", imgsz=320, epochs=3)``.

    ``options`` are TrainConfig fields (``batch_size``, ``hyp`` as a YAML name/path, mapping or Hyperparameters,
    ``config`` as a TrainConfig YAML, ``resume``...), merged exactly as train.py merges its flags. Returns the
    final validation Metrics of best.pt on rank 0 (None on other DDP ranks).
    """
    setup_logging()  # the same console output as train.py (idempotent)
    return Trainer(build_train_config(options, source="detector.train()"), callbacks=callbacks).fit()


class TrainingDivergedError(RuntimeError):
    """The loss stayed non-finite even after restoring the last good weights at a lower learning rate."""


# --------------------------------------------------------------------------------------------------------------------
# Configuration: flags -> TrainConfig, resume


def build_train_config(flags: Mapping[str, Any], source: str = "command line") -> TrainConfig:
    """Merge defaults <- ``config`` YAML <- ``hyp`` YAML (into ``hyp``) <- the other ``flags``.

    ``flags`` holds TrainConfig keys plus optional ``config`` (a TrainConfig YAML path) and ``hyp`` (a hyp YAML
    name/path, a mapping or a Hyperparameters). With ``resume`` set, the run's saved config replaces the
    defaults and only :data:`SAFE_RESUME_KEYS` may differ from it (a ConfigError names any other).
    """
    layers = _config_layers(flags, source)
    config = build_config(TrainConfig, *layers)
    if config.resume:
        return _resume_config(config, layers)
    if is_builtin_data(config.data):  # the built-in dataset's recipe sits under everything the user gave
        config = build_config(TrainConfig, (str(BUILTIN_TRAIN_CONFIG), load_yaml(BUILTIN_TRAIN_CONFIG)), *layers)
    return config


def is_builtin_data(data: str) -> bool:
    return data in ("", "builtin")


def _config_layers(flags: Mapping[str, Any], source: str) -> list[tuple[str, Mapping[str, Any]]]:
    flags = dict(flags)
    config_file = flags.pop("config", None)
    hyp = flags.pop("hyp", None)
    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file:
        layers.append((str(config_file), load_yaml(config_file)))
    if isinstance(hyp, Hyperparameters):
        layers.append((source, {"hyp": dataclasses.asdict(hyp)}))
    elif isinstance(hyp, Mapping):
        layers.append((source, {"hyp": hyp}))
    elif hyp:
        path = resolve_config_path(hyp, HYP_CONFIG_DIR)
        layers.append((str(path), {"hyp": load_yaml(path)}))
    layers.append((source, flags))
    return layers


def find_last_checkpoint(project: str | Path) -> Path:
    """The most recently written last.pt under ``project`` (for a bare ``--resume``)."""
    candidates = sorted(Path(project).glob("**/last.pt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(
            f"--resume: no last.pt found under {project}; pass the checkpoint, e.g. --resume path/last.pt"
        )
    return candidates[-1]


def resume_checkpoint_path(resume: str, project: str | Path) -> Path:
    """``--resume`` value -> checkpoint path: "auto" = latest under ``project``; a run folder = its last.pt."""
    if resume == "auto":
        return find_last_checkpoint(project)
    path = Path(resume)
    if path.is_dir():
        path = path / "weights" / "last.pt" if (path / "weights").is_dir() else path / "last.pt"
    if not path.is_file():
        raise ConfigError(f"--resume {resume}: checkpoint not found")
    return path


def _resume_config(given: TrainConfig, layers: list[tuple[str, Mapping[str, Any]]]) -> TrainConfig:
    path = resume_checkpoint_path(given.resume, given.project)
    saved_dict = load_checkpoint(path).get("train_config")
    if not isinstance(saved_dict, dict):
        raise CheckpointError(f"{path}: holds no training state (train_config); use --weights {path} to fine-tune")
    saved_dict = {k: v for k, v in saved_dict.items() if k != "resume"}
    saved = build_config(TrainConfig, (str(path), saved_dict))
    merged = build_config(TrainConfig, (str(path), saved_dict), *layers)
    given_keys = {key.replace("-", "_").split(".")[0] for _, values in layers for key in values}
    for key in sorted(given_keys - set(SAFE_RESUME_KEYS) - set(RESUME_LOCATION_KEYS) - {"resume"}):
        if getattr(merged, key) != getattr(saved, key):
            raise ConfigError(
                f"--{key.replace('_', '-')} cannot change when resuming {path} (the run used {getattr(saved, key)!r}); "
                f"only {', '.join('--' + k.replace('_', '-') for k in SAFE_RESUME_KEYS)} may be given"
            )
    location = {key: getattr(saved, key) for key in RESUME_LOCATION_KEYS}
    return dataclasses.replace(merged, resume=str(path), **location)


def resolve_defaults(config: TrainConfig) -> TrainConfig:
    """Fill the options whose default depends on the dataset: imgsz/epochs (built-in: configs/builtin.yaml's)."""
    if is_builtin_data(config.data):
        defaults = load_yaml(BUILTIN_TRAIN_CONFIG)
    else:
        defaults = {"imgsz": DEFAULT_IMGSZ, "epochs": DEFAULT_EPOCHS}
    changes = {key: defaults[key] for key in ("imgsz", "epochs") if getattr(config, key) is None}
    if not config.cfg and not config.weights:
        changes["cfg"] = DEFAULT_MODEL
    return dataclasses.replace(config, **changes)


# --------------------------------------------------------------------------------------------------------------------
# Model helpers


def transfer_weights(model: nn.Module, state: Mapping[str, torch.Tensor], skip: Iterable[str] = ()) -> set[str]:
    """Copy every entry of ``state`` whose name and shape match ``model``'s; returns the names copied.

    ``skip`` lists name fragments never copied (e.g. "anchors" when the hyp asks for new anchors).
    """
    skip = tuple(skip)
    own = model.state_dict()
    matched = {
        name: value
        for name, value in state.items()
        if name in own and own[name].shape == value.shape and not any(s in name for s in skip)
    }
    model.load_state_dict(matched, strict=False)
    return set(matched)


def frozen_layer_indices(freeze: tuple[int, ...]) -> list[int]:
    """--freeze N -> layers 0..N-1; --freeze 0 -> none; several numbers -> exactly those layers."""
    if len(freeze) == 1:
        return list(range(freeze[0]))
    return sorted(set(freeze))


def freeze_layers(model: nn.Module, indices: Iterable[int]) -> list[nn.Module]:
    """Stop gradients of the given top-level layers (``model.<i>.``); returns those layers' modules."""
    indices = sorted(set(indices))
    prefixes = tuple(f"model.{i}." for i in indices)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = not name.startswith(prefixes)
    return [model.model[i] for i in indices if i < len(model.model)]


def set_train_mode(model: nn.Module, frozen: Iterable[nn.Module]) -> None:
    """Training mode, except frozen layers stay in eval mode so their BatchNorm statistics do not drift."""
    model.train()
    for module in frozen:
        module.eval()


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """--amp -> the autocast dtype (None = fp32). auto: fp16 on CUDA, off on CPU; fp16 needs CUDA."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode in ("auto", "fp16"):
        if device.type != "cuda":
            raise ConfigError(f"--amp fp16 needs a CUDA device (got {device}); on CPU use --amp bf16 or off")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--amp bf16: {describe_device(device)} does not support bfloat16; use --amp fp16")
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        # Emulated bfloat16 (no AVX512-BF16/AMX) measured 10x slower than fp32 for yolov5n training.
        LOGGER.warning("WARNING: --amp bf16: this CPU has no native bfloat16; training will be much slower than fp32")
    return torch.bfloat16


def check_amp(model: nn.Module, device: torch.device, dtype: torch.dtype, imgsz: int = 256) -> bool:
    """Whether autocast gives the same predictions as fp32 on a fixed input (some GPUs/drivers get AMP wrong).

    Compares the decoded outputs of an eval copy of ``model`` on a seeded random image; the mean absolute
    difference must stay below 2% (fp16) or 5% (bf16, 8 mantissa bits) of the mean output magnitude.
    """
    probe = copy.deepcopy(distributed.unwrap_model(model)).to(device).eval()
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, imgsz, imgsz, generator=generator).to(device)
    with torch.no_grad():
        reference = probe(image).float()
        with torch.autocast(device.type, dtype=dtype):
            mixed = probe(image).float()
    if not torch.isfinite(mixed).all():
        return False
    error = (mixed - reference).abs().mean() / reference.abs().mean().clamp(min=1e-9)
    tolerance = 0.02 if dtype == torch.float16 else 0.05
    return bool(error < tolerance)


def epoch_seed(seed: int, epoch: int) -> int:
    """A 32-bit seed that depends only on (seed, epoch): the same whether a run was resumed or not."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def seed_epoch(seed: int, epoch: int) -> None:
    """Re-seed Python, NumPy and torch's global RNGs for ``epoch``."""
    value = epoch_seed(seed, epoch)
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def random_image_size(imgsz: int, stride: int, rng: np.random.Generator) -> int:
    """--multi-scale: a size drawn uniformly in [0.5, 1.5] x imgsz, rounded down to a stride multiple (>= stride)."""
    low, high = int(imgsz * MULTI_SCALE_RANGE[0]), int(imgsz * MULTI_SCALE_RANGE[1]) + stride
    return max(stride, int(rng.integers(low, high)) // stride * stride)


def resize_batch(images: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """Scale a (B, 3, H, W) float batch so its long side is ``size`` (sides rounded up to stride multiples)."""
    scale = size / max(images.shape[2:])
    if scale == 1:
        return images
    shape = [math.ceil(side * scale / stride) * stride for side in images.shape[2:]]
    return F.interpolate(images, size=shape, mode="bilinear", align_corners=False)


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise): between training and validation the
    allocation sizes change, and without this the process's resident memory grows by the validation's share."""
    gc.collect()
    with suppress(OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def state_snapshot(module_or_optimizer: Any) -> dict[str, Any]:
    """A deep copy of a state dict on the CPU, safe from later in-place updates."""
    return copy.deepcopy(_to_cpu(module_or_optimizer.state_dict()))


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value


def plain_values(value: Any) -> Any:
    """``value`` with NumPy scalars/arrays turned into Python numbers/lists (tensors kept), so that
    ``torch.load(weights_only=True)`` accepts it; e.g. ``np.interp`` leaves np.float64 learning rates behind."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {k: plain_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_values(v) for v in value)
    return value


def strip_optimizer(path: str | Path, keep_model: bool = True) -> None:
    """Drop the optimizer (and scaler) state from a finished run's checkpoint, atomically; fp32 kept for exactness.

    ``keep_model`` False also drops the raw model (``load_model`` uses the EMA), as for best.pt.
    """
    checkpoint = load_checkpoint(path)
    checkpoint.update(optimizer=None, scaler=None)
    if not keep_model and checkpoint.get("ema") is not None:
        checkpoint["model"] = None
    save_checkpoint({k: v for k, v in checkpoint.items() if k != "format"}, path)


# --------------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Trains one model on one dataset as ``config`` says; ``fit()`` runs it and returns the final Metrics.

    Construction builds everything (run folder, model, data, optimizer) and restores a ``--resume`` checkpoint;
    callbacks receive the trainer and read its public attributes (see :mod:`detector.engine.callbacks`).
    """

    def __init__(self, config: TrainConfig, callbacks: Callbacks | Iterable[Callback] | None = None) -> None:
        self.callbacks = Callbacks(default_callbacks())  # the loggers run first, then the caller's hooks
        if isinstance(callbacks, Callbacks):
            self.callbacks.extend(callbacks)
        else:
            for callback in callbacks or ():
                self.callbacks.add(callback)
        self.context = distributed.context_from_env()
        self.is_main = self.context.is_main
        self.device = self._select_device(config)
        distributed.init_distributed(self.context, self.device)
        self.config = resolve_defaults(config)
        self.resume_state = load_checkpoint(self.config.resume) if self.config.resume else None
        self._setup_run_folder()
        self._load_dataset()
        self.model = self._build_model().to(self.device, memory_format=self.memory_format)
        self.model.names = list(self.names)
        self.stride = int(self.model.stride.max())
        self.imgsz = self._check_imgsz(self.config.imgsz, self.stride)
        self._setup_loaders()
        self._prepare_model()
        self._setup_optimizer()
        if self.resume_state is not None:
            self._restore(self.resume_state)
        self._setup_loss()
        self.resume_state = None  # free the checkpoint's tensors

    # -- set-up -----------------------------------------------------------------------------------------------------

    def _select_device(self, config: TrainConfig) -> torch.device:
        device = select_device(config.device, config.batch_size)
        if self.context.is_distributed and device.type == "cuda":
            device = torch.device("cuda", self.context.local_rank)
        # oneDNN's NHWC convolutions: forward + backward of yolov5n at 320 measured 10-15% faster on the CPU.
        # CUDA keeps NCHW (YOLOv5's layout) until measured there.
        self.memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
        return device

    def _setup_run_folder(self) -> None:
        config = self.config
        if config.resume:
            save_dir = Path(config.resume).resolve().parent.parent
        elif self.is_main:
            save_dir = increment_path(Path(config.project) / config.name, exist_ok=config.exist_ok)
        else:
            save_dir = None
        self.save_dir = Path(distributed.broadcast_object(str(save_dir) if save_dir else None, self.context))
        self.weights_dir = self.save_dir / "weights"
        self.last_path, self.best_path = self.weights_dir / "last.pt", self.weights_dir / "best.pt"
        self.log_handler = None
        if self.is_main:
            self.weights_dir.mkdir(parents=True, exist_ok=True)
            self.log_handler = add_file_log(self.save_dir)
            self._save_run_config()
        init_seeds(config.seed + 1 + self.context.rank, deterministic=config.deterministic)
        LOGGER.info("Training on %s, results in %s", describe_device(self.device), self.save_dir)

    def _save_run_config(self) -> None:
        """config.yaml (loadable with --config), hyp.yaml, and YOLOv5's opt.yaml layout."""
        save_config(self.config, self.save_dir / "config.yaml")
        save_config(self.config.hyp, self.save_dir / "hyp.yaml")
        options = {**config_to_dict(self.config), "save_dir": str(self.save_dir), "local_rank": self.context.local_rank}
        with open(self.save_dir / "opt.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(options, f, sort_keys=False)

    def _load_dataset(self) -> None:
        with self._main_process_first():  # rank 0 downloads or generates the dataset; the others then read it
            self.dataset_config = load_dataset_config(self.config.data)
        self.names = ["item"] if self.config.single_cls else list(self.dataset_config.names)
        self.batch_size = distributed.per_rank_batch_size(self.config.batch_size, self.context)

    def _setup_loaders(self) -> None:
        config = self.config
        labels = self.dataset_config.labels
        with self._main_process_first():  # rank 0 writes the label cache; the others then read it
            self.train_loader, self.train_dataset = create_dataloader(
                self.dataset_config.train,
                batch_size=self.batch_size,
                augment=True,
                cache=config.cache,
                rect=config.rect,
                rank=self.context.rank if self.context.is_distributed else -1,
                world_size=self.context.world_size,
                image_weights=config.image_weights,
                quad=config.quad,
                prefix="train: ",
                shuffle=not config.rect,
                seed=config.seed,
                imgsz=self.imgsz,
                stride=self.stride,
                hyp=config.hyp,
                workers=config.workers,
                names=self.dataset_config.names,
                single_cls=config.single_cls,
                label_dir=self.dataset_config.root / labels if labels else None,
            )
        self.val_loader = None
        if self.is_main:
            self.val_loader, _ = create_val_dataloader(
                self.dataset_config,
                imgsz=self.imgsz,
                batch_size=self.batch_size * 2,
                stride=self.stride,
                workers=config.workers,
                single_cls=config.single_cls,
            )
        self.num_batches = distributed.agree_num_batches(len(self.train_loader), self.context, self.device)

    def _check_imgsz(self, imgsz: int, stride: int) -> int:
        size = max(math.ceil(imgsz / stride) * stride, stride * 2)
        if size != imgsz:
            LOGGER.warning("--imgsz %d must be a multiple of the max stride %d; using %d", imgsz, stride, size)
        return size

    @contextmanager
    def _main_process_first(self):
        """Rank 0 runs the block first (downloads, caches); the other ranks wait, then run it."""
        if not self.is_main:
            distributed.barrier(self.context)
        yield
        if self.is_main:
            distributed.barrier(self.context)

    def _prepare_model(self) -> None:
        """Label plots and AutoAnchor (new runs), frozen layers, DDP wrapper, EMA (rank 0)."""
        if self.is_main and self.resume_state is None:
            self._plot_labels_and_check_anchors(self.model)
        self.frozen = freeze_layers(self.model, frozen_layer_indices(self.config.freeze))
        if self.frozen:
            LOGGER.info("Freezing layers 0-%d (their BatchNorm statistics stay fixed)", len(self.frozen) - 1)
        self.train_model = distributed.wrap_model(self.model, self.device, self.context, self.config.sync_bn)
        self.ema = None
        if self.is_main:
            self.ema = ModelEMA(self.model)

    def _build_model(self) -> nn.Module:
        config, nc = self.config, len(self.names)
        anchors = round(config.hyp.anchors) or None
        self.pretrained_head = False
        if self.resume_state is not None:
            model = model_from_checkpoint(self.resume_state, prefer_ema=False)
            if model.nc != nc:
                raise CheckpointError(f"{config.resume}: trained for {model.nc} classes, the dataset has {nc}")
            return model
        if not config.weights:
            model = DetectionModel(config.cfg, nc=nc, anchors=anchors)
            if config.hyp.fl_gamma > 0:  # focal loss from scratch: start classes at RetinaNet's small prior
                initialize_focal_biases(model)
            return model
        source = load_model(config.weights)
        model = DetectionModel(config.cfg or source.yaml, nc=nc, anchors=anchors)
        # YOLOv5 keeps the checkpoint's (possibly AutoAnchor-evolved) anchors unless the hyp asks for new ones.
        transferred = transfer_weights(model, source.state_dict(), skip=("anchors",) if anchors else ())
        LOGGER.info("Transferred %d/%d items from %s", len(transferred), len(model.state_dict()), config.weights)
        head_prefix = f"model.{len(model.model) - 1}."
        head = {name for name in model.state_dict() if name.startswith(head_prefix)}
        self.pretrained_head = head <= transferred
        return model

    def _plot_labels_and_check_anchors(self, model: nn.Module) -> None:
        labels = self.train_dataset.labels
        if not self.config.noplots:
            plot_labels(labels, self.names, self.save_dir)
        if self.config.noautoanchor:
            return
        if self.pretrained_head:
            # New anchors would invalidate what the head learnt with the old ones (box sizes scale with them).
            LOGGER.info("AutoAnchor: skipped, the detection head and its anchors come pretrained from --weights")
            return
        check_anchors(self.train_dataset, model, thr=self.config.hyp.anchor_t, imgsz=self.imgsz)

    def _setup_optimizer(self) -> None:
        config, hyp = self.config, self.config.hyp
        # Accumulate up to the nominal batch (``nbs``, YOLOv5's 64) per optimizer step.
        self.accumulate = accumulate_steps(config.batch_size, config.nbs)
        weight_decay = scaled_weight_decay(hyp.weight_decay, config.batch_size, self.accumulate, config.nbs)
        self.optimizer = build_optimizer(self.model, config.optimizer, hyp.lr0, hyp.momentum, weight_decay)
        self.group_weight_decays = [group["weight_decay"] for group in self.optimizer.param_groups]
        self.lr_schedule = lr_lambda(config.epochs, hyp.lrf, cosine=config.cos_lr)
        self.amp_dtype = resolve_amp(config.amp, self.device)
        if self.amp_dtype is not None and not check_amp(self.model, self.device, self.amp_dtype):
            LOGGER.warning("AMP check failed: %s autocast gives wrong results here; training in fp32", self.amp_dtype)
            self.amp_dtype = None
        use_scaler = self.amp_dtype == torch.float16  # bf16 has fp32's range: no loss scaling needed
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.epochs, self.start_epoch, self.epoch = config.epochs, 0, 0
        self.best_fitness, self.best_epoch, self.lr_factor = 0.0, -1, 1.0
        self.metrics = None
        self.validator = None
        self.epoch_record: EpochRecord | None = None
        self.step_record: StepRecord | None = None
        self.class_maps = np.zeros(len(self.names))
        self.good_state: dict[str, Any] | None = None
        self.nonfinite_streak, self.recovering = 0, False
        self.timings: dict[str, float] = dict.fromkeys(("data", "forward", "loss", "backward", "optimizer"), 0.0)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        """Continue a run: model, EMA, optimizer, scaler, schedule position, best fitness (from ``--resume``)."""
        path = self.config.resume
        self.model.load_state_dict(checkpoint["model"] if checkpoint.get("model") is not None else checkpoint["ema"])
        if self.ema is not None and checkpoint.get("ema") is not None:
            self.ema.ema.load_state_dict(checkpoint["ema"])
            self.ema.updates = int(checkpoint.get("ema_updates", 0))
        if checkpoint.get("optimizer") is not None:
            self.optimizer.load_state_dict(checkpoint["optimizer"])
            for group, weight_decay in zip(self.optimizer.param_groups, self.group_weight_decays, strict=True):
                group["weight_decay"] = weight_decay  # re-derived: --batch-size may have changed
        else:
            LOGGER.info("%s: optimizer state was stripped at the end of the run; continuing with a fresh one", path)
        if checkpoint.get("scaler") is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.start_epoch = int(checkpoint["epoch"]) + 1
        self.best_fitness = float(checkpoint.get("best_fitness", 0.0))
        self.best_epoch = int(checkpoint.get("best_epoch", checkpoint["epoch"]))
        self.lr_factor = float(checkpoint.get("lr_factor", 1.0))
        if "class_maps" in checkpoint:
            self.class_maps = np.asarray(checkpoint["class_maps"], dtype=np.float64)
        if self.start_epoch >= self.epochs:
            raise ConfigError(
                f"{path}: the run already finished {self.start_epoch} epochs; "
                f"pass --epochs larger than {self.start_epoch} to train it longer"
            )
        LOGGER.info("Resuming %s from epoch %d of %d", path, self.start_epoch, self.epochs)

    def _setup_loss(self) -> None:
        hyp = scale_loss_gains(self.config.hyp, self.model.detect.nl, len(self.names), self.imgsz)
        class_weights = None
        if self.config.class_weights:
            class_weights = labels_to_class_weights(self.train_dataset.labels, len(self.names)) * len(self.names)
        self.loss_fn = DetectionLoss(self.model, hyp, self.config.label_smoothing, class_weights)
        self.warmup_iterations = warmup_iterations(self.config.hyp.warmup_epochs, self.num_batches)

    # -- the loop ---------------------------------------------------------------------------------------------------

    def fit(self) -> Metrics | None:
        """Train from ``start_epoch`` to ``epochs``; returns the final validation Metrics of best.pt (rank 0)."""
        self.callbacks.run("on_fit_start", self)
        started = time.time()
        LOGGER.info(
            "Image sizes %d train, %d val; %d dataloader workers; batch %d x %d accumulation; logging to %s\n"
            "Starting training for %d epochs...",
            self.imgsz,
            self.imgsz,
            self.train_loader.num_workers,
            self.config.batch_size,
            self.accumulate,
            self.save_dir,
            self.epochs,
        )
        self._snapshot_good_state()
        try:
            for epoch in range(self.start_epoch, self.epochs):
                self.epoch = epoch
                self.callbacks.run("on_epoch_start", self)
                self.train_one_epoch()
                stop = self._end_epoch()
                if stop:
                    break
            LOGGER.info(
                "%d epochs completed in %.3f hours.", self.epoch - self.start_epoch + 1, (time.time() - started) / 3600
            )
            self._check_replicas()
            final = self._finish()
            self.callbacks.run("on_fit_end", self)
            return final
        finally:
            if self.log_handler is not None:
                remove_file_log(self.log_handler)
            distributed.destroy_distributed()

    def train_one_epoch(self) -> None:
        """One pass over the training data: warmup/LR, steps with accumulation, the epoch's learning rates."""
        set_train_mode(self.model, self.frozen)
        seed_epoch(self.config.seed, self.epoch)
        self.scale_rng = np.random.default_rng((self.config.seed, self.epoch, 1))
        self.train_loader.sampler.set_epoch(self.epoch)
        self._apply_epoch_lr()
        self.loss_sum, self.loss_steps, self.accumulated = torch.zeros(3), 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        data_start = time.perf_counter()
        for batch_index, batch in enumerate(self.train_loader):
            if batch_index >= self.num_batches:
                break
            self.batch_index = batch_index
            self.timings["data"] += time.perf_counter() - data_start
            self.train_step(batch)
            self.callbacks.run("on_step_end", self)
            data_start = time.perf_counter()
        self.learning_rates = tuple(group["lr"] for group in self.optimizer.param_groups)

    def train_step(self, batch: tuple) -> dict[str, float]:
        """Forward, loss, backward for one batch; an optimizer step when the accumulation is complete.

        Returns the running mean losses of the epoch ({"box", "obj", "cls"}); a non-finite loss skips the step.
        """
        images_uint8, targets, paths = batch[0], batch[1], batch[2]
        self.last_batch = (images_uint8, targets, paths)
        iteration = self.batch_index + self.num_batches * self.epoch
        accumulate = self._warmup(iteration)
        will_step = self.accumulated + 1 >= accumulate or self.batch_index == self.num_batches - 1
        images = images_uint8.to(self.device, non_blocking=True).to(memory_format=self.memory_format).float() / 255
        targets = targets.to(self.device)
        if self.config.multi_scale:
            images = resize_batch(images, random_image_size(self.imgsz, self.stride, self.scale_rng), self.stride)
        sync = nullcontext() if will_step or not self.context.is_distributed else self.train_model.no_sync()
        with sync:
            loss, items = self._forward(images, targets)
            finite = distributed.all_ranks_true(bool(torch.isfinite(loss)), self.context, self.device)
            if finite:
                self._timed("backward", lambda: self.scaler.scale(loss).backward())
        if not finite:
            self._skip_nonfinite(f"loss {loss.item():g}")
        else:
            self.accumulated += 1
            stepped = self._timed("optimizer", self._optimizer_step) if will_step else True
            if stepped:
                self.nonfinite_streak, self.recovering = 0, False
            self.loss_sum += items.float().cpu()
            self.loss_steps += 1
        self._record_step(images.shape[-1], len(targets))
        return dict(zip(("box", "obj", "cls"), self.step_record.mean_losses, strict=True))

    def _forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        )
        with autocast:
            raw = self._timed("forward", lambda: self.train_model(images))
            loss, items = self._timed("loss", lambda: self.loss_fn(raw, targets))
        if self.context.is_distributed:
            loss = loss * self.context.world_size  # DDP averages gradients over ranks; the loss is a per-batch sum
        if self.config.quad:
            loss = loss * 4.0
        return loss, items

    def _timed(self, phase: str, work: Any) -> Any:
        start = time.perf_counter()
        result = work()
        self.timings[phase] += time.perf_counter() - start
        return result

    def _optimizer_step(self) -> bool:
        """Clip, step, EMA; False when the gradients are non-finite and the step was skipped instead.

        With fp16 the GradScaler skips such steps itself (and lowers its scale), which is routine, not an error.
        """
        self.scaler.unscale_(self.optimizer)
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=MAX_GRAD_NORM)
        if not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
            self._skip_nonfinite(f"gradient norm {grad_norm.item():g}")
            return False
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulated = 0
        if self.ema is not None:
            self.ema.update(self.model)
        return True

    def _record_step(self, image_size: int, instances: int) -> None:
        mean = (self.loss_sum / max(self.loss_steps, 1)).tolist()
        self.step_record = StepRecord(
            epoch=self.epoch,
            batch_index=self.batch_index,
            num_batches=self.num_batches,
            mean_losses=(mean[0], mean[1], mean[2]),
            instances=instances,
            image_size=image_size,
            memory=memory_usage(self.device),
        )

    def _warmup(self, iteration: int) -> int:
        """Warmup LR/momentum for this iteration; returns the accumulation steps (ramped up during warmup)."""
        if iteration >= self.warmup_iterations:
            return self.accumulate
        warmup(self.optimizer, iteration, self.warmup_iterations, self._epoch_lr_factor(), self.config.hyp)
        return warmup_accumulate_steps(iteration, self.warmup_iterations, self.config.batch_size, self.config.nbs)

    def _epoch_lr_factor(self) -> float:
        return self.lr_schedule(self.epoch) * self.lr_factor

    def _apply_epoch_lr(self) -> None:
        lr = self.config.hyp.lr0 * self._epoch_lr_factor()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    # -- non-finite losses ------------------------------------------------------------------------------------------

    def _skip_nonfinite(self, what: str) -> None:
        """Drop this step (and the gradients accumulated with it); restore the last good state if it repeats."""
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulated = 0
        self.nonfinite_streak += 1
        LOGGER.warning(
            "WARNING: non-finite %s at epoch %d batch %d; step skipped (%d in a row)",
            what,
            self.epoch,
            self.batch_index,
            self.nonfinite_streak,
        )
        if self.nonfinite_streak < NONFINITE_LIMIT:
            return
        if self.recovering or self.good_state is None:
            raise TrainingDivergedError(
                f"the loss stayed non-finite for {NONFINITE_LIMIT} steps even after restoring the weights of the "
                f"last epoch end at {self.lr_factor:g}x the learning rate; check the data and hyperparameters "
                f"(lr0 {self.config.hyp.lr0}), or try --amp off"
            )
        self._restore_good_state()

    def _snapshot_good_state(self) -> None:
        """Keep the current weights/EMA/optimizer in memory as the state to go back to after divergence."""
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            return  # never make broken weights the state to go back to
        self.good_state = {
            "model": state_snapshot(self.model),
            "optimizer": state_snapshot(self.optimizer),
            "ema": state_snapshot(self.ema.ema) if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
        }

    def _restore_good_state(self) -> None:
        state = self.good_state
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        if self.ema is not None and state["ema"] is not None:
            self.ema.ema.load_state_dict(state["ema"])
            self.ema.updates = state["ema_updates"]
        self.lr_factor *= RECOVERY_LR_FACTOR
        self._apply_epoch_lr()
        self.nonfinite_streak, self.recovering = 0, True
        LOGGER.warning(
            "WARNING: %d non-finite losses in a row: restored the weights of the last epoch end; learning rate now "
            "%gx the schedule",
            NONFINITE_LIMIT,
            self.lr_factor,
        )

    # -- end of epoch -----------------------------------------------------------------------------------------------

    def _end_epoch(self) -> bool:
        """Validate, log, save; returns whether to stop (last epoch or early stopping), agreed by all ranks."""
        final_epoch = self.epoch + 1 == self.epochs
        stop = False
        distributed.average_batchnorm_statistics(self.model, self.context)
        release_memory()
        if self.is_main:
            if not self.config.noval or final_epoch:
                self.metrics = self.validate()
                release_memory()
            fitness = self._fitness(self.metrics)
            if fitness >= self.best_fitness:  # ties count (YOLOv5): with --noval every epoch is "best" and none stops
                self.best_fitness, self.best_epoch = fitness, self.epoch
            self.epoch_record = self._epoch_record(fitness)
            self.callbacks.run("on_epoch_end", self)
            self.save_checkpoint(is_best=self.best_epoch == self.epoch, final=final_epoch)
            patience = self.config.patience
            stop = patience > 0 and self.epoch - self.best_epoch >= patience
            if stop:
                LOGGER.info(
                    "Stopping training early: no improvement in the last %d epochs; best results at epoch %d, "
                    "best.pt saved. Use --patience 0 to disable (or --resume --patience N to continue).",
                    patience,
                    self.best_epoch,
                )
        else:
            self.callbacks.run("on_epoch_end", self)
        stop = distributed.broadcast_object(stop, self.context)
        self._update_image_weights()
        self._snapshot_good_state()
        return stop

    def validate(self) -> Metrics:
        """Metrics of the EMA model on the validation set, with validation losses (rank 0 only)."""
        if self.validator is None:  # one Validator for the whole run, as val.py would configure it
            self.validator = self._validator(plots=False, verbose=False)
        metrics = self.validator.run(self.ema.ema, self.val_loader, loss_fn=self.loss_fn)
        self.class_maps = metrics.class_maps(len(self.names))
        return metrics

    def _validator(self, plots: bool, verbose: bool) -> Validator:
        """The Validator val.py uses, with val.py's thresholds (conf 0.001, IoU 0.6) at the training image size."""
        config = ValConfig(
            data=self.config.data,
            imgsz=self.imgsz,
            batch_size=self.batch_size * 2,
            single_cls=self.config.single_cls,
            half=self.amp_dtype == torch.float16,
            verbose=verbose,
        )
        return Validator(config, self.names, self.save_dir, plots=plots, training=True)

    @staticmethod
    def _fitness(metrics: Any) -> float:
        if metrics is None:
            return 0.0
        return float(fitness(metrics))

    def _epoch_record(self, fitness: float) -> EpochRecord:
        metrics = self.metrics
        train_losses = (self.loss_sum / max(self.loss_steps, 1)).tolist()
        val_losses = tuple(metrics.loss.get(k, 0.0) for k in ("box", "obj", "cls")) if metrics else (0.0, 0.0, 0.0)
        return EpochRecord(
            epoch=self.epoch,
            train_losses=(train_losses[0], train_losses[1], train_losses[2]),
            precision=metrics.precision if metrics else 0.0,
            recall=metrics.recall if metrics else 0.0,
            map50=metrics.map50 if metrics else 0.0,
            map=metrics.map if metrics else 0.0,
            val_losses=(val_losses[0], val_losses[1], val_losses[2]),
            learning_rates=self.learning_rates,
            fitness=fitness,
        )

    def _update_image_weights(self) -> None:
        """--image-weights: draw images with classes the model finds poorly more often (rank 0's maps, shared)."""
        if not self.config.image_weights:
            return
        labels, nc = self.train_dataset.labels, len(self.names)
        class_weights = reweight_by_map(labels_to_class_weights(labels, nc).numpy(), self.class_maps)
        self.train_loader.sampler.set_image_weights(labels_to_image_weights(labels, nc, class_weights))

    def save_checkpoint(self, is_best: bool = False, final: bool = False) -> None:
        """last.pt every epoch (atomically), best.pt when fitness improved, epoch<N>.pt every --save-period."""
        config = self.config
        if config.nosave and not final:
            return
        buffer = io.BytesIO()
        torch.save(plain_values(self._checkpoint()), buffer)
        data = buffer.getvalue()
        targets = [self.last_path]
        if is_best:
            targets.append(self.best_path)
        if config.save_period > 0 and (self.epoch + 1) % config.save_period == 0:
            targets.append(self.weights_dir / f"epoch{self.epoch}.pt")
        for path in targets:
            atomic_write(path, lambda f: f.write(data))

    def _checkpoint(self) -> dict[str, Any]:

        return {
            "format": CHECKPOINT_FORMAT,
            **checkpoint_model_entries(self.model),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "ema": self.ema.ema.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.epoch,
            "best_fitness": self.best_fitness,
            "best_epoch": self.best_epoch,
            "lr_factor": self.lr_factor,
            "class_maps": [float(v) for v in self.class_maps],
            "train_config": config_to_dict(self.config),
            "hyp": dataclasses.asdict(self.config.hyp),
            "results": self.epoch_record.as_row() if self.epoch_record else {},
        }

    def _check_replicas(self) -> None:
        if not self.context.is_distributed:
            return
        if distributed.replicas_agree(self.model, self.context, self.device):
            LOGGER.info("DDP: all %d ranks hold identical weights", self.context.world_size)
        else:
            LOGGER.warning("WARNING: DDP ranks ended with different weights; only rank 0's are saved")

    def _finish(self) -> Metrics | None:
        """Strip optimizers from last.pt/best.pt and validate best.pt with plots and the per-class table."""
        if not self.is_main:
            return None
        for path, keep_model in ((self.last_path, True), (self.best_path, False)):
            if path.exists():
                strip_optimizer(path, keep_model=keep_model)
        if not self.best_path.exists():
            return self.metrics
        LOGGER.info("\nValidating %s...", self.best_path)
        best = load_model(self.best_path, device=self.device)
        self.metrics = self._validator(plots=not self.config.noplots, verbose=True).run(best, self.val_loader)
        LOGGER.info("Results saved to %s", self.save_dir)
        return self.metrics
