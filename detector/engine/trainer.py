"""The training loop: ``Trainer(config).fit()`` trains, validates, checkpoints and resumes.

The loop is short: ``fit`` runs ``train_one_epoch`` per epoch, which runs ``train_step`` per batch (forward, the
sum of the loss's named terms, backward, an optimizer step when the accumulation is complete) and fires the
trainer's events. Everything around the step is a hook on that one event list (:mod:`detector.engine.hooks`):
the learning-rate schedule (set every iteration), the EMA, validation, early stopping, checkpointing and the
loggers. Any hook can end the run cleanly with :meth:`Trainer.request_stop`.

The components are built by public ``build_*`` methods that a subclass (or a caller passing ``model``, ``loss``,
``train_loader``) replaces, detectron2's DefaultTrainer pattern::

    class MyTrainer(Trainer):
        def build_loss(self):
            return MyLoss(self.model, self.config.hyp)

What makes a run safe to interrupt and repeat:

- Epoch k's data order and augmentation come from ``(seed, k)`` (the sampler), and every other random draw of
  the epoch (multi-scale sizes, torch/NumPy global RNGs) is re-seeded from ``(seed, k)``; gradient accumulation
  never spans two epochs. A run killed at any moment resumes from its last completed epoch and, with
  ``--deterministic``, ends with the same weights as an uninterrupted run.
- A non-finite loss skips its step; several in a row restore the weights and optimizer of the last epoch end
  (kept in memory) at a tenth of the learning rate; if that fails too the run stops with a clear error.
- Every option is checked, and the data and model are read, before the run folder is made: a refused option
  leaves nothing behind.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.util
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from detector.config import (
    TrainConfig,
    ValConfig,
    apply_aliases,
    check_train_config,
    config_to_dict,
    resolve_train_config,
    save_config,
)
from detector.data.dataset_config import load_dataset_config
from detector.data.device_augment import DeviceAugment
from detector.data.loader import create_dataloader
from detector.data.weights import labels_to_class_weights, labels_to_image_weights, reweight_by_map
from detector.engine import distributed
from detector.engine.autobatch import autobatch
from detector.engine.callbacks import Callback, Callbacks, EpochRecord, StepRecord
from detector.engine.ema import ModelEMA
from detector.engine.hooks import default_hooks
from detector.engine.loggers import memory_usage
from detector.engine.optim import accumulate_steps, build_optimizer, clip_gradients, scaled_weight_decay
from detector.engine.pseudo import PseudoLabeler, unmark_pseudo_targets
from detector.engine.sam import SAM
from detector.engine.schedules import (
    LRSchedule,
    build_schedule,
    schedule_class,
    warmup_accumulate_steps,
    warmup_iterations,
)
from detector.engine.sparsity import SparsityPenalty
from detector.engine.state import Checkpointer, TrainState
from detector.engine.trackers import build_loggers, check_loggers
from detector.engine.validator import Validator, create_val_dataloader
from detector.errors import CheckpointError, ConfigError, DetectorError, LoaderWorkerError
from detector.models.autoanchor import check_anchors
from detector.models.distill import DistillationLoss, load_teacher
from detector.models.loading import load_model, model_from_checkpoint
from detector.models.loss import DetectionLoss, LossFunction, initialize_focal_biases, scale_loss_gains
from detector.models.norms import check_norm_options, norm_overrides
from detector.models.regularization import set_head_dropout, set_stochastic_depth
from detector.models.yolo import DetectionModel
from detector.ops.metrics import Metrics
from detector.utils.checkpoint import load_checkpoint
from detector.utils.checks import check_imgsz, round_to_stride
from detector.utils.files import increment_path
from detector.utils.logging import add_file_log, remove_file_log, setup_logging, start_log_buffer
from detector.utils.memory import keep_freed_memory, release_memory
from detector.utils.plots import plot_labels
from detector.utils.torch_utils import (
    buffers_kept,
    cpu_has_native_bf16,
    describe_device,
    half_precision_dtype,
    init_seeds,
    no_native_bf16_reason,
    select_device,
    unwrap_model,
)

LOGGER = logging.getLogger(__name__)

DEFAULT_MODEL = "yolov5n.yaml"  # the architecture when neither --cfg nor --weights names one
NONFINITE_LIMIT = 3  # consecutive non-finite losses before the last good state is restored
RECOVERY_LR_FACTOR = 0.1
MULTI_SCALE_RANGE = (0.5, 1.5)
FITTED_WARMUP_FRACTION = 0.2  # under --time, warmup takes at most this fraction of the fitted run

T = TypeVar("T")


def train(callbacks: Callbacks | Iterable[Callback] | None = None, **options: Any) -> Metrics | None:
    """Python API of train.py: ``detector.train(data="coco128.yaml", weights="yolov5n.pt", imgsz=320, epochs=3)``.

    ``options`` are TrainConfig fields (``batch_size``, ``hyp`` as a YAML name/path, mapping or Hyperparameters,
    ``config`` as a TrainConfig YAML, ``resume``...), merged exactly as train.py merges its flags. Returns the
    final validation Metrics of best.pt on rank 0 (None on other DDP ranks).
    """
    setup_logging()  # the same console output as train.py (idempotent)
    return Trainer(resolve_train_config(options, source="detector.train()"), callbacks=callbacks).fit()


class TrainingDivergedError(DetectorError, RuntimeError):
    """The loss stayed non-finite even after restoring the last good weights at a lower learning rate (the data or
    the hyperparameters: train.py prints the message as one line, as for bad input)."""


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


def _layer_prefixes(indices: Iterable[int]) -> tuple[str, ...]:
    """The parameter-name prefixes of the given top-level layers (``model.<i>.``)."""
    return tuple(f"model.{i}." for i in sorted(set(indices)))


def freeze_layers(model: nn.Module, indices: Iterable[int]) -> list[nn.Module]:
    """Stop gradients of the given top-level layers (``model.<i>.``); returns those layers' modules."""
    indices = sorted(set(indices))
    prefixes = _layer_prefixes(indices)
    for name, parameter in model.named_parameters():
        parameter.requires_grad = not name.startswith(prefixes)
    return [model.model[i] for i in indices if i < len(model.model)]


def check_something_trains(model: nn.Module, freeze: tuple[int, ...]) -> None:
    """ConfigError when ``--freeze`` covers every layer that has parameters: the first step would fail with
    autograd's 'does not require grad' (YOLOv5 crashes there too)."""
    prefixes = _layer_prefixes(frozen_layer_indices(freeze))
    if prefixes and all(name.startswith(prefixes) for name, _ in model.named_parameters()):
        layers = len(getattr(model, "model", ()))
        raise ConfigError(
            f"--freeze {' '.join(map(str, freeze))}: that freezes every layer with parameters (the model has {layers} "
            f"layers, 0-{layers - 1}, the last the Detect head): nothing would train"
        )


def set_train_mode(model: nn.Module, frozen: Iterable[nn.Module]) -> None:
    """Training mode, except frozen layers stay in eval mode so their BatchNorm statistics do not drift."""
    model.train()
    for module in frozen:
        module.eval()


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """--amp -> the autocast dtype (None = fp32).

    auto: fp16 on CUDA; on the CPU bf16 where the CPU computes it natively (AVX512-BF16 or AMX: a training step of
    yolov5n at 320, batch 16, took 0.55 s against 1.05 s in fp32 on a Zen 4 core), else off. fp16 needs CUDA.
    """
    if mode == "off":
        return None
    if mode == "auto":
        return half_precision_dtype(device)
    if mode == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"--amp fp16 needs a CUDA device (got {device}); on CPU use --amp bf16 or off")
        return torch.float16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"--amp bf16: {describe_device(device)} does not support bfloat16; use --amp fp16")
    if device.type == "cpu" and not cpu_has_native_bf16():
        LOGGER.warning(f"WARNING: --amp bf16: {no_native_bf16_reason()}; training will be much slower than fp32")
    return torch.bfloat16


def check_amp(model: nn.Module, device: torch.device, dtype: torch.dtype, imgsz: int = 256) -> bool:
    """Whether autocast gives the same predictions as fp32 on a fixed input (some GPUs/drivers get AMP wrong).

    Compares the decoded outputs of an eval copy of ``model`` on a seeded random image; the mean absolute
    difference must stay below 2% (fp16) or 5% (bf16, 8 mantissa bits) of the mean output magnitude.
    """
    probe = copy.deepcopy(unwrap_model(model)).to(device).eval()
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


def resolve_memory_format(mode: str, device: torch.device) -> torch.memory_format:
    """--channels-last -> the memory format of the model and the batches: on = NHWC (channels_last), off = NCHW.

    auto: NHWC on the CPU, where oneDNN's NHWC convolutions made yolov5n's forward + backward at 320, batch 16,
    20-25% faster (interleaved runs on 2 vCPUs); NCHW elsewhere (YOLOv5's layout; on CUDA NHWC pays off with AMP
    on tensor cores: try on).
    """
    if mode == "auto":
        return torch.channels_last if device.type == "cpu" else torch.contiguous_format
    return torch.channels_last if mode == "on" else torch.contiguous_format


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why ``torch.compile`` (its default inductor backend) cannot work for training on ``device``, or None.

    Checked before compiling so that a missing piece costs one line, not a failed compilation: TorchDynamo's
    platform support, a C++ compiler for CPU kernels, Triton for CUDA kernels.
    """
    import torch._dynamo  # only under --compile: importing it takes a second

    if not torch._dynamo.is_dynamo_supported():
        return f"torch {torch.__version__} has no TorchDynamo support on this platform or Python version"
    if device.type == "cpu":
        compilers = (os.environ.get("CXX", ""), "g++", "c++", "clang++")
        if not any(shutil.which(name) for name in compilers if name):
            return "no C++ compiler found (inductor builds CPU kernels with g++ or clang++; set CXX to use another)"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Triton is not installed (inductor builds CUDA kernels with it; pip install triton)"
    return None


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
    shape = [round_to_stride(side * scale, stride) for side in images.shape[2:]]
    return F.interpolate(images, size=shape, mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Trains one model on one dataset as ``config`` says; ``fit()`` runs it and returns the final Metrics.

    ``model``, ``loss`` (a callable ``(raw_maps, targets) -> {name: scalar term}``) and ``train_loader`` replace
    what :meth:`build_model`, :meth:`build_loss` and :meth:`build_train_loader` would make; ``callbacks`` are
    hooks run after the defaults of :meth:`build_hooks`. Construction checks every option and reads the data and
    model before it makes the run folder; then it prepares the model, optimizer, schedule and hooks, and restores
    a ``--resume`` checkpoint. Hooks read the typed attributes below (``state``, ``step_record``, ``epoch_record``).
    """

    clock = staticmethod(time.monotonic)  # the wall clock of --time (a test may run on a virtual one)
    compile_backend = "inductor"  # torch.compile's backend under --compile (a test may use a quicker one)

    def __init__(
        self,
        config: TrainConfig,
        *,
        model: nn.Module | None = None,
        loss: LossFunction | None = None,
        train_loader: Any = None,
        callbacks: Callbacks | Iterable[Callback] | None = None,
    ) -> None:
        self.started = self.clock()  # --time counts from here: data set-up and the final validation included
        config = apply_aliases(config)
        check_train_config(config)
        schedule_class(config.lr_schedule)  # an unknown schedule is refused before any work
        check_loggers(config.logger)  # so is an unknown --logger, or one whose package is missing
        self.config = config
        self.log_buffer = start_log_buffer()  # log.txt starts here, though the run folder comes later
        self.log_handler: logging.Handler | None = None
        try:
            self._read_inputs(model, loss, train_loader)
            self._make_run_folder()  # every option and input checked: from here on the run writes files
            keep_freed_memory()  # training steps reuse the memory the last one freed: no page faults (12% of a step)
            self._prepare_model(new_run=self.resume_checkpoint is None)
            self.ema = self.build_ema() if self.is_main else None
            self.optimizer = self.build_optimizer()
            self.sam = SAM(self.optimizer, config.sam, config.sam_adaptive) if config.sam > 0 else None
            self.state = TrainState(
                epochs=self.config.epochs,
                class_maps=[0.0] * len(self.names),
                fitness_weights=self.config.fitness_weights,
            )
            self.checkpointer = Checkpointer(
                self.weights_dir, save_period=self.config.save_period, nosave=self.config.nosave
            )
            if self.resume_checkpoint is not None:
                self.checkpointer.restore(self, self.resume_checkpoint)
                if config.time > 0:  # keep the epochs the budget was fitted to; the next epoch end refits them
                    self.set_epochs(min(int(self.resume_checkpoint.get("epochs", config.epochs)), config.epochs))
                self.resume_checkpoint = None  # free the checkpoint's tensors
        except BaseException:
            for handler in (self.log_buffer, self.log_handler):
                if handler is not None:
                    remove_file_log(handler)
            raise
        self.callbacks = self.build_hooks()
        if config.unlabeled:  # the option's own machinery: kept when a subclass replaces the default hooks
            self.callbacks.add(PseudoLabeler())
        if config.sparsity > 0:
            self.callbacks.add(SparsityPenalty(config.sparsity))
        if isinstance(callbacks, Callbacks) or callbacks:
            self.callbacks.extend(callbacks)
        self.validator: Validator | None = None
        self.step_record: StepRecord | None = None
        self.last_batch: tuple[Tensor, Tensor, tuple[str, ...]] | None = None
        self.good_state: dict[str, Any] | None = None
        self.nonfinite_streak, self.recovering = 0, False
        self.accumulated = 0
        self.loss_sums: dict[str, Tensor] = {}
        self.loss_steps = 0
        self.timings: dict[str, float] = dict.fromkeys(("data", "forward", "loss", "backward", "optimizer"), 0.0)
        self.validation_seconds = 0.0  # of the latest validation (the --time budget reserves one for the end)

    def _read_inputs(self, model: nn.Module | None, loss: LossFunction | None, train_loader: Any) -> None:
        """Everything that can refuse the run, before it writes anything: device, resume checkpoint, dataset, model,
        image and batch size, data loaders, precision, schedule and loss."""
        config = self.config
        self.context = distributed.context_from_env()
        self.is_main = self.context.is_main
        self.device = self._select_device(config)
        distributed.init_distributed(self.context, self.device)
        init_seeds(config.seed + 1 + self.context.rank, deterministic=config.deterministic)
        self.resume_checkpoint = load_checkpoint(config.resume) if config.resume else None
        with self._main_process_first():  # rank 0 downloads or generates the dataset; the others then read it
            self.dataset_config = load_dataset_config(config.data)
        self.names = ["item"] if config.single_cls else list(self.dataset_config.names)
        self.pretrained_head = False
        self.model = self._adopt_model(model if model is not None else self.build_model(self.resume_checkpoint))
        check_something_trains(self.model, config.freeze)
        self.stride = int(self.model.stride.max())
        self.imgsz = check_imgsz(config.imgsz, self.stride, minimum=2 * self.stride)[0]  # square training size
        self.val_imgsz = (
            check_imgsz(config.val_imgsz, self.stride, minimum=2 * self.stride, flag="--val-imgsz")[0]
            if config.val_imgsz
            else self.imgsz
        )
        self._resolve_batch_size()
        self.batch_size = distributed.per_rank_batch_size(self.config.batch_size, self.context)
        self.accumulate = accumulate_steps(self.config.batch_size, self.config.nbs)  # batches per optimizer step
        with self._main_process_first():  # rank 0 writes the label cache; the others then read it
            self.train_loader = train_loader if train_loader is not None else self.build_train_loader()
        self.train_dataset = getattr(self.train_loader, "dataset", None)
        self.loader_imgsz = self.imgsz  # the size the training batches come at (the close-mosaic phase's may differ)
        self._own_train_loader = train_loader is None
        self.val_loader = self.build_val_loader() if self.is_main else None
        self.num_batches = distributed.agree_num_batches(len(self.train_loader), self.context, self.device)
        self._setup_precision()
        self.schedule = self.build_schedule()
        self.warmup_iterations = (
            0 if self.schedule.has_warmup else warmup_iterations(self.config.hyp.warmup_epochs, self.num_batches)
        )
        self.loss_fn = loss if loss is not None else self.build_loss()
        if config.hyp.distill > 0:  # the option's own machinery: it wraps a subclass's or caller's loss too
            self.loss_fn = self.build_distillation(self.loss_fn)

    # -- components: public, replaceable ----------------------------------------------------------------------------

    def build_model(self, checkpoint: Mapping[str, Any] | None = None) -> DetectionModel:
        """The model to train: the ``--resume`` checkpoint's, else ``--cfg`` (or --weights' architecture, else
        yolov5n.yaml) with --weights transferred where names and shapes match. ``--norm`` (other than bn) and
        ``--acnet`` override the model YAML's keys; a resumed model keeps its checkpoint's."""
        config, nc = self.config, len(self.names)
        anchors = round(config.hyp.anchors) or None
        layer_options = {**norm_overrides(config.norm, config.norm_options), "acnet": config.acnet or None}
        if checkpoint is not None:
            model = model_from_checkpoint(dict(checkpoint), prefer_ema=False)
            if model.nc != nc:
                raise CheckpointError(f"{config.resume}: trained for {model.nc} classes, the dataset has {nc}")
        elif not config.weights:
            model = DetectionModel(config.cfg or DEFAULT_MODEL, nc=nc, anchors=anchors, **layer_options)
            if config.hyp.fl_gamma > 0:  # focal loss from scratch: start classes at RetinaNet's small prior
                initialize_focal_biases(model)
        else:
            source = load_model(config.weights)
            model = DetectionModel(config.cfg or source.yaml, nc=nc, anchors=anchors, **layer_options)
            # YOLOv5 keeps the checkpoint's (possibly AutoAnchor-evolved) anchors unless the hyp asks for new ones.
            transferred = transfer_weights(model, source.state_dict(), skip=("anchors",) if anchors else ())
            LOGGER.info("Transferred %d/%d items from %s", len(transferred), len(model.state_dict()), config.weights)
            head_prefix = f"model.{len(model.model) - 1}."
            head = {name for name in model.state_dict() if name.startswith(head_prefix)}
            self.pretrained_head = head <= transferred
        check_norm_options(model, config.sync_bn, config.grad_checkpoint, config.compile)
        return model

    def build_train_loader(self, imgsz: int | None = None) -> Any:
        """The augmenting, shuffling training DataLoader (split over DDP ranks); its dataset gives the labels.
        Its images come at ``imgsz`` (default the training size; the close-mosaic phase asks for the test size)."""
        config, data = self.config, self.dataset_config
        loader, _ = create_dataloader(
            data.train,
            batch_size=self.batch_size,
            augment=True,
            cache=config.cache,
            rect=config.rect,
            rank=self.context.rank if self.context.is_distributed else -1,
            world_size=self.context.world_size,
            image_weights=config.image_weights,
            class_balanced=config.class_balanced,
            repeat_aug=config.repeat_aug,
            auto_augment=config.auto_augment,
            quad=config.quad,
            prefix="train: ",
            shuffle=not config.rect,
            seed=config.seed,
            imgsz=imgsz or self.imgsz,
            stride=self.stride,
            hyp=config.hyp,
            workers=config.workers,
            names=data.names,
            single_cls=config.single_cls,
            label_dir=data.root / data.labels if data.labels else None,
            cache_dir=config.cache_dir,
            train_tile=config.train_tile,
            unlabeled=config.unlabeled or None,
            augment_on_device=config.augment_on_device,
        )
        return loader

    def build_val_loader(self) -> Any:
        """val.py's validation loader (rectangular batches of twice the training batch), rank 0 only."""
        loader, _ = create_val_dataloader(
            self.dataset_config,
            imgsz=self.val_imgsz,
            batch_size=self.batch_size * 2,
            stride=self.stride,
            workers=self.config.workers,
            single_cls=self.config.single_cls,
            cache_dir=self.config.cache_dir,
        )
        return loader

    def build_ema(self) -> ModelEMA:
        """The exponential moving average of the weights that is validated and saved (rank 0); hyp ``ema_decay``
        and ``ema_tau`` set its decay after n updates, ``ema_decay * (1 - exp(-n / ema_tau))``."""
        hyp = self.config.hyp
        return ModelEMA(self.model, decay=hyp.ema_decay, tau=hyp.ema_tau)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """SGD/Adam/AdamW over 3 parameter groups, stepping every ``nbs`` images (gradient accumulation), with the
        weight decay scaled to that effective batch; each group's ``initial_lr`` is what schedules multiply."""
        config, hyp = self.config, self.config.hyp
        weight_decay = scaled_weight_decay(hyp.weight_decay, config.batch_size, self.accumulate, config.nbs)
        optimizer = build_optimizer(self.model, config.optimizer, hyp.lr0, hyp.momentum, weight_decay)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        return optimizer

    def build_schedule(self, epochs: int | None = None) -> LRSchedule:
        """The ``--lr-schedule`` from :data:`detector.engine.schedules.LR_SCHEDULES`, stepped every iteration, for
        a run of ``epochs`` (default ``--epochs``)."""
        config = self.config
        return build_schedule(
            config.lr_schedule, epochs or config.epochs, self.num_batches, config.hyp, config.schedule
        )

    def build_loss(self) -> LossFunction:
        """YOLOv5's loss with the gains scaled to this model and image size (and class weights when asked)."""
        hyp = scale_loss_gains(self.config.hyp, self.model.detect.nl, len(self.names), self.imgsz)
        class_weights = None
        if self.config.class_weights:
            class_weights = labels_to_class_weights(self._dataset_labels("--class-weights"), len(self.names))
            class_weights = class_weights * len(self.names)
        return DetectionLoss(self.model, hyp, hyp.label_smoothing, class_weights)

    def build_distillation(self, loss: LossFunction) -> DistillationLoss:
        """``loss`` plus the ``distill`` term of ``--teacher`` at ``hyp.distill``, its parts weighted by the detection
        loss's scaled gains (:mod:`detector.models.distill`). The teacher is loaded on this process's device (each
        DDP rank its own copy), frozen, and runs on every training batch; the checkpoint's config names it."""
        hyp = scale_loss_gains(self.config.hyp, self.model.detect.nl, len(self.names), self.imgsz)
        teacher = load_teacher(self.config.teacher, self.model, self.device).to(memory_format=self.memory_format)
        return DistillationLoss(
            loss,
            teacher,
            self.model,
            gain=hyp.distill,
            temperature=hyp.distill_t,
            box_gain=hyp.box,
            obj_gain=hyp.obj,
            cls_gain=hyp.cls,
        )

    def build_hooks(self) -> Callbacks:
        """The default hooks (:func:`detector.engine.hooks.default_hooks`), then the ``--logger`` trackers
        (:func:`detector.engine.trackers.build_loggers`: after the checkpoint hook, so at the end they find the final
        plots and weights); the caller's run after them."""
        return Callbacks([*default_hooks(), *build_loggers(self.config.logger)])

    # -- set-up -----------------------------------------------------------------------------------------------------

    def set_epochs(self, epochs: int) -> None:
        """Make the run ``epochs`` long from now on (``--time`` fits it to the budget): the LR schedule is rebuilt
        for the new length (keeping any state it learnt), warmup is capped at a fifth of the run, and the
        close-mosaic phase, which counts back from the last epoch, moves with it."""
        self.state.epochs = epochs
        learnt = self.schedule.state_dict()
        self.schedule = self.build_schedule(epochs)
        self.schedule.load_state_dict(learnt)
        if not self.schedule.has_warmup:
            configured = warmup_iterations(self.config.hyp.warmup_epochs, self.num_batches)
            self.warmup_iterations = min(configured, round(FITTED_WARMUP_FRACTION * epochs * self.num_batches))

    def elapsed_seconds(self) -> float:
        """Wall-clock seconds the run has used: this session since the trainer was made, plus earlier sessions."""
        return self.state.seconds_before + self.clock() - self.started

    def _select_device(self, config: TrainConfig) -> torch.device:
        device = select_device(config.device, max(config.batch_size, 0))
        if self.context.is_distributed and device.type == "cuda":
            device = torch.device("cuda", self.context.local_rank)
        self.memory_format = resolve_memory_format(config.channels_last, device)
        return device

    def _adopt_model(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device, memory_format=self.memory_format)
        model.names = list(self.names)
        hyp = self.config.hyp
        if hyp.drop_path or hyp.dropout:  # training-only modules: eval mode, checkpoints and exports never see them
            set_stochastic_depth(model, hyp.drop_path)
            set_head_dropout(model, hyp.dropout)
        if self.config.grad_checkpoint:
            if not hasattr(model, "set_grad_checkpointing"):
                name = type(model).__name__
                raise ConfigError(f"--grad-checkpoint needs a model with set_grad_checkpointing(); got a {name}")
            model.set_grad_checkpointing(True)
        return model

    def _resolve_batch_size(self) -> None:
        """--batch-size -1: AutoBatch on CUDA (a single process), the default elsewhere."""
        if self.config.batch_size != -1:
            return
        if self.context.is_distributed:
            raise ConfigError("--batch-size -1 (AutoBatch) works with one process; pass a total --batch-size for DDP")
        default = TrainConfig().batch_size
        amp_dtype = resolve_amp(self.config.amp, self.device)
        batch_size = autobatch(self.model, self.imgsz, self.device, default=default, amp_dtype=amp_dtype)
        self.config = dataclasses.replace(self.config, batch_size=batch_size)

    def _make_run_folder(self) -> None:
        config = self.config
        if config.resume:
            save_dir = Path(config.resume).resolve().parent.parent
        elif self.is_main:
            save_dir = increment_path(Path(config.project) / config.name, exist_ok=config.exist_ok)
        else:
            save_dir = None
        self.save_dir = Path(distributed.broadcast_object(str(save_dir) if save_dir else None, self.context))
        self.weights_dir = self.save_dir / "weights"
        if self.is_main:
            self.save_dir.mkdir(parents=True, exist_ok=True)  # weights/ comes with the first checkpoint
            self.log_handler = add_file_log(self.save_dir, buffer=self.log_buffer)
            self._save_run_config()
        else:
            remove_file_log(self.log_buffer)
        LOGGER.info("Training on %s, results in %s", describe_device(self.device), self.save_dir)

    def _save_run_config(self) -> None:
        """config.yaml (loadable with --config), hyp.yaml, and YOLOv5's opt.yaml layout."""
        save_config(self.config, self.save_dir / "config.yaml")
        save_config(self.config.hyp, self.save_dir / "hyp.yaml")
        options = {**config_to_dict(self.config), "save_dir": str(self.save_dir), "local_rank": self.context.local_rank}
        with open(self.save_dir / "opt.yaml", "w", encoding="utf-8") as f:
            yaml.safe_dump(options, f, sort_keys=False)

    @contextmanager
    def _main_process_first(self):
        """Rank 0 runs the block first (downloads, caches); the other ranks wait, then run it."""
        if not self.is_main:
            distributed.barrier(self.context)
        yield
        if self.is_main:
            distributed.barrier(self.context)

    def _dataset_labels(self, option: str) -> list[np.ndarray]:
        """The training labels ((n, 5) [class, xywhn] per image) that ``option`` needs from the loader's dataset."""
        labels = getattr(self.train_dataset, "labels", None)
        if labels is None:
            raise ConfigError(f"{option} needs the training loader's dataset to have `labels` (a YOLODataset's)")
        return labels

    def _prepare_model(self, new_run: bool) -> None:
        """Label plots and AutoAnchor (new runs), frozen layers, DDP wrapper, --compile."""
        if self.is_main and new_run:
            self._plot_labels_and_check_anchors()
        self.frozen = freeze_layers(self.model, frozen_layer_indices(self.config.freeze))
        if self.frozen:
            LOGGER.info("Freezing layers 0-%d (their BatchNorm statistics stay fixed)", len(self.frozen) - 1)
        self.train_model = distributed.wrap_model(self.model, self.device, self.context, self.config.sync_bn)
        if self.config.compile:
            self._compile_train_model()

    def _compile_train_model(self) -> None:
        """--compile: ``torch.compile`` the training model (the DDP wrapper under DDP, as PyTorch recommends).

        One forward and backward on a blank batch of the training shape, under the training autocast, compiles it
        now and proves it works; the probe leaves no trace (BatchNorm statistics restored, gradients cleared).
        Where compilation cannot work or fails, training runs eagerly after a one-line warning (all DDP ranks
        alike). A second batch shape (--rect, --multi-scale, a smaller last batch) recompiles once, into a graph
        for any size. The EMA, validation and checkpoints use ``self.model``: the same weights, uncompiled.
        """
        started = time.perf_counter()
        reason = compile_unavailable_reason(self.device)
        compiled = torch.compile(self.train_model, backend=self.compile_backend) if reason is None else None
        if compiled is not None:
            reason = self._probe_compiled(compiled)
        if not distributed.all_ranks_true(reason is None, self.context, self.device):
            LOGGER.warning("WARNING: --compile: %s; training without torch.compile", reason or "failed on another rank")
            return
        self.train_model = compiled
        LOGGER.info("--compile: training model compiled in %.1f s", time.perf_counter() - started)

    def _probe_compiled(self, compiled: nn.Module) -> str | None:
        """One training-mode forward and backward of ``compiled`` on zeros; None if it ran, else why not."""
        images = torch.zeros(self.batch_size, 3, self.imgsz, self.imgsz, device=self.device)
        autocast = torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)
        set_train_mode(self.model, self.frozen)
        try:
            with buffers_kept(self.model):
                with autocast:
                    outputs = compiled(images.contiguous(memory_format=self.memory_format))
                sum(output.float().sum() for output in outputs).backward()
        except Exception as e:  # compilers fail in many ways (toolchain, backend, an op); eager training always works
            cause = getattr(e, "inner_exception", None) or e  # what dynamo's BackendCompilerFailed wraps
            first_line = next(iter(str(cause).strip().splitlines()), "")
            return f"compilation failed ({type(cause).__name__}: {first_line})"
        finally:
            self.model.zero_grad(set_to_none=True)
        return None

    def _plot_labels_and_check_anchors(self) -> None:
        labels = getattr(self.train_dataset, "labels", None)
        if labels is None:
            LOGGER.info("Label plots and AutoAnchor: skipped, the training loader's dataset has no `labels`")
            return
        if not self.config.noplots:
            plot_labels(labels, self.names, self.save_dir)
        if self.config.noautoanchor:
            return
        if self.pretrained_head:
            # New anchors would invalidate what the head learnt with the old ones (box sizes scale with them).
            LOGGER.info("AutoAnchor: skipped, the detection head and its anchors come pretrained from --weights")
            return
        check_anchors(self.train_dataset, self.model, thr=self.config.hyp.anchor_t, imgsz=self.imgsz)

    def _setup_precision(self) -> None:
        self.amp_dtype = resolve_amp(self.config.amp, self.device)
        if self.amp_dtype is not None and not check_amp(self.model, self.device, self.amp_dtype):
            LOGGER.warning("AMP check failed: %s autocast gives wrong results here; training in fp32", self.amp_dtype)
            self.amp_dtype = None
        precision = {None: "fp32", torch.float16: "fp16 autocast", torch.bfloat16: "bf16 autocast"}[self.amp_dtype]
        LOGGER.info("AMP: --amp %s trains in %s", self.config.amp, precision)
        use_scaler = self.amp_dtype == torch.float16  # bf16 has fp32's range: no loss scaling needed
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)

    # -- the loop ---------------------------------------------------------------------------------------------------

    def fit(self) -> Metrics | None:
        """Train from the start (or resumed) epoch to the last; returns the final validation Metrics of best.pt
        (rank 0; None elsewhere)."""
        state = self.state
        try:
            self.callbacks.run("on_fit_start", self)
            started = time.time()
            LOGGER.info(
                "Image sizes %d train, %d val; %d dataloader workers; batch %d x %d accumulation; %s LR schedule; "
                "logging to %s\nStarting training for %d epochs...",
                self.imgsz,
                self.val_imgsz,
                getattr(self.train_loader, "num_workers", 0),
                self.config.batch_size,
                self.accumulate,
                self.config.lr_schedule,
                self.save_dir,
                state.epochs,
            )
            self.good_state = self.checkpointer.snapshot(self)
            state.epoch = state.start_epoch
            with self._loader_worker_deaths_explained():
                while state.epoch < state.epochs:  # not a range: --time may change state.epochs during the run
                    self.train_one_epoch()
                    self.end_epoch()
                    if state.stop_reason is not None:
                        LOGGER.info("Stopping training: %s", state.stop_reason)
                        break
                    if state.is_last_epoch:
                        break  # state.epoch stays the last epoch trained, for the hooks at the end
                    state.epoch += 1
            LOGGER.info(
                "%d epochs completed in %.3f hours.",
                state.epoch - state.start_epoch + 1,
                (time.time() - started) / 3600,
            )
            self._check_replicas()
            self.callbacks.run("on_fit_end", self)
            if self.is_main:
                LOGGER.info("Results saved to %s", self.save_dir)
            return state.metrics if self.is_main else None
        finally:
            if self.log_handler is not None:
                remove_file_log(self.log_handler)
            distributed.destroy_distributed()

    @contextmanager
    def _loader_worker_deaths_explained(self) -> Iterator[None]:
        """A loader worker that dies (torch raises ``RuntimeError: DataLoader worker (pid N) is killed by signal:
        Killed.`` or ``... exited unexpectedly`` wherever the main process is) becomes one line: what happened, the
        likely cause and how to go on from the last checkpoint."""
        try:
            yield
        except RuntimeError as e:
            last = self.checkpointer.last
            then = (
                f"continue from the last epoch saved with: python train.py --resume {last}"
                if last.exists()
                else "no epoch was saved yet"
            )
            explained = LoaderWorkerError.explain(e, then)
            if explained is None:
                raise
            raise explained from e

    def train_one_epoch(self) -> None:
        """One pass over the training data: seeding, then ``train_step`` per batch with the step events."""
        state = self.state
        set_train_mode(self.model, self.frozen)
        seed_epoch(self.config.seed, state.epoch)
        self.scale_rng = np.random.default_rng((self.config.seed, state.epoch, 1))
        self._close_mosaic_phase()  # first: it may rebuild the loader
        if hasattr(self.train_loader, "sampler") and hasattr(self.train_loader.sampler, "set_epoch"):
            self.train_loader.sampler.set_epoch(state.epoch)
        self.loss_sums, self.loss_steps, self.accumulated = {}, 0, 0
        self.optimizer.zero_grad(set_to_none=True)
        state.iteration = state.epoch * self.num_batches
        self.callbacks.run("on_epoch_start", self)
        data_start = time.perf_counter()
        for batch_index, batch in enumerate(self.train_loader):
            if batch_index >= self.num_batches:
                break
            state.batch_index, state.iteration = batch_index, state.epoch * self.num_batches + batch_index
            self.timings["data"] += time.perf_counter() - data_start
            self.train_step(batch)
            self.callbacks.run("on_step_end", self)
            if self._stop_requested_anywhere():
                break
            data_start = time.perf_counter()

    def _close_mosaic_phase(self) -> None:
        """From ``epochs - close_mosaic`` on, the batches come without mosaic or mixing augmentations, without
        --multi-scale, and at the test size: ``--val-imgsz`` where it differs from --imgsz (FixRes: a model
        trained small is fine-tuned at the size it is tested at), for which the training loader is rebuilt once.
        Once begun, the phase stays even if --time later adds epochs."""
        state, close, size = self.state, self.config.close_mosaic, self._closed_imgsz()
        if close > 0 and not state.mosaic_closed and state.epoch >= state.epochs - close:
            state.mosaic_closed = True
            LOGGER.info(
                "Closing mosaic: epochs %d-%d train without mosaic, mixup, CutMix, copy-paste, erasing, the "
                "auto-augment policy and multi-scale, at %d px",
                state.epoch,
                state.epochs - 1,
                size,
            )
        if state.mosaic_closed and self.loader_imgsz != size:
            self._rebuild_train_loader(size)
        sampler = getattr(self.train_loader, "sampler", None)
        if state.mosaic_closed and hasattr(sampler, "set_closed"):
            sampler.set_closed(True)

    def _closed_imgsz(self) -> int:
        """The close-mosaic phase's training size: the test size, except for a loader passed in by the caller and
        for --unlabeled and --train-tile, whose datasets carry state or sizes of their own (they keep --imgsz)."""
        config = self.config
        if not self._own_train_loader or config.unlabeled or config.train_tile:
            return self.imgsz
        return self.val_imgsz

    def _rebuild_train_loader(self, imgsz: int) -> None:
        """The training loader again, at ``imgsz``: the same images, labels and sampling (image weights carried
        over), another size. The old loader (its workers, its RAM cache) goes first."""
        LOGGER.info("Training images now load at %d px (were %d)", imgsz, self.loader_imgsz)
        self.train_loader = self.train_dataset = None
        gc.collect()
        with self._main_process_first():
            self.train_loader = self.build_train_loader(imgsz)
        self.train_dataset = self.train_loader.dataset
        self.loader_imgsz = imgsz
        if self.state.class_maps:  # --image-weights: as after the last validation
            self._update_image_weights()

    def train_step(self, batch: tuple) -> dict[str, float]:
        """Forward, loss, backward for one batch; an optimizer step when the accumulation is complete.

        The loss's named terms are summed (times the batch size, YOLOv5's scale) and backpropagated; returns the
        running mean of each term over the epoch. A non-finite loss skips the step. With ``--sam`` the forward and
        backward run at SAM's perturbed weights, after a first pass at the real weights (:meth:`_sharpness_aware`).
        """
        state = self.state
        images_uint8, targets, paths = batch[0], batch[1], batch[2]
        if self.config.augment_on_device:  # the HSV jitter and flips that the loader workers left out
            augment = DeviceAugment(self.config.hyp)  # holds only the ranges: as cheap to make as to keep
            seed = (self.config.seed, state.epoch, state.batch_index, self.context.rank)
            images_uint8, targets = augment(images_uint8.to(self.device, non_blocking=True), targets, seed)
        target_weights = None
        if self.config.unlabeled:  # pseudo-label rows arrive as class + nc: their class, and --pseudo-weight
            targets, target_weights = unmark_pseudo_targets(targets, len(self.names), self.config.pseudo_weight)
        self.last_batch = (images_uint8, targets, paths)
        will_step = (
            self.accumulated + 1 >= self.accumulate_at(state.iteration) or state.batch_index == self.num_batches - 1
        )
        images = images_uint8.to(self.device, non_blocking=True).to(memory_format=self.memory_format).float() / 255
        targets = targets.to(self.device)
        if target_weights is not None:
            target_weights = target_weights.to(self.device)
        if self.config.multi_scale and not state.mosaic_closed:
            images = resize_batch(images, random_image_size(self.imgsz, self.stride, self.scale_rng), self.stride)
        sync = nullcontext() if will_step or not self.context.is_distributed else self.train_model.no_sync()
        state.stepped = False
        with sync, self._sharpness_aware(images, targets, target_weights) as first_pass_terms:
            loss, terms = self._forward(images, targets, target_weights)
            finite = distributed.all_ranks_true(bool(torch.isfinite(loss)), self.context, self.device)
            if finite:
                self.timed("backward", lambda: self.scaler.scale(loss).backward())
        if not finite:
            self._skip_nonfinite(f"loss {loss.item():g}")
        else:
            self.accumulated += 1
            if will_step:
                state.stepped = self.timed("optimizer", self._optimizer_step)
                if state.stepped:
                    self.nonfinite_streak, self.recovering = 0, False
            for name, term in (first_pass_terms or terms).items():
                self.loss_sums[name] = self.loss_sums.get(name, 0.0) + term.detach().float()
            self.loss_steps += 1
        state.learning_rates = tuple(group["lr"] for group in self.optimizer.param_groups)
        self._record_step(images.shape[-1], len(targets))
        return dict(self.step_record.mean_losses)

    @contextmanager
    def _sharpness_aware(
        self, images: Tensor, targets: Tensor, target_weights: Tensor | None
    ) -> Iterator[Mapping[str, Tensor] | None]:
        """--sam: SAM's first pass (forward and gradient at the real weights), the weights moved to SAM's worst
        nearby point for the block (the usual forward and backward, whose gradient the optimizer uses), then put
        back. Yields the first pass's loss terms, the loss at the real weights, which the logs report.

        The first pass runs under DDP's ``no_sync`` (each rank perturbs with its own batch's gradient, SAM's
        m-sharpness) and leaves ``.grad`` alone, so accumulation over batches works as without SAM; BatchNorm
        running statistics are updated by the first pass only (:mod:`detector.engine.sam`). Yields None without SAM.
        """
        if self.sam is None:
            yield None
            return
        with self.train_model.no_sync() if self.context.is_distributed else nullcontext():
            loss, terms = self._forward(images, targets, target_weights)
            self.timed("backward", lambda: self.sam.perturb(self.scaler.scale(loss)))
        try:
            with buffers_kept(self.model):  # the second pass at perturbed weights is not a step
                yield terms
        finally:
            self.sam.restore()

    def _mean_losses(self) -> dict[str, float]:
        """Each loss term averaged over the epoch's steps so far (one device-to-host copy for all terms)."""
        if not self.loss_sums:
            return {}
        totals = torch.stack([torch.as_tensor(v) for v in self.loss_sums.values()]).cpu() / max(self.loss_steps, 1)
        return dict(zip(self.loss_sums, totals.tolist(), strict=True))

    def accumulate_at(self, iteration: int) -> int:
        """Batches per optimizer step at ``iteration``: ramped up from 1 during warmup, then ``nbs / batch``."""
        if iteration >= self.warmup_iterations:
            return self.accumulate
        return warmup_accumulate_steps(iteration, self.warmup_iterations, self.config.batch_size, self.config.nbs)

    def _forward(
        self, images: Tensor, targets: Tensor, target_weights: Tensor | None = None
    ) -> tuple[Tensor, Mapping[str, Tensor]]:
        """The loss to backpropagate and its named terms; ``target_weights`` (N,) go to the loss only when given
        (pseudo-labels), so a loss without a weights argument serves every other run. A DistillationLoss also gets
        the images, which its teacher sees under the same autocast (its time counts as the loss's)."""
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype is not None else nullcontext()
        )
        with autocast:
            raw = self.timed("forward", lambda: self.train_model(images))
            weighted = () if target_weights is None else (target_weights,)
            teacher_input = {"images": images} if isinstance(self.loss_fn, DistillationLoss) else {}
            terms = self.timed("loss", lambda: self.loss_fn(raw, targets, *weighted, **teacher_input))
        loss = sum(terms.values()) * images.shape[0]  # YOLOv5's scale: lr0 in hyp files assumes it
        if self.context.is_distributed:
            loss = loss * self.context.world_size  # DDP averages gradients over ranks; the loss is a per-batch sum
        if self.config.quad:
            loss = loss * 4.0
        return loss, terms

    def timed(self, phase: str, work: Callable[[], T]) -> T:
        """``work()``, its seconds added to ``timings[phase]`` (data, forward, loss, backward, optimizer)."""
        start = time.perf_counter()
        result = work()
        self.timings[phase] += time.perf_counter() - start
        return result

    def _optimizer_step(self) -> bool:
        """Clip, step; False when the gradients are non-finite and the step was skipped instead.

        With fp16 the GradScaler skips such steps itself (and lowers its scale), which is routine, not an error.
        """
        self.scaler.unscale_(self.optimizer)
        grad_norm = clip_gradients(self.model.parameters(), self.config.clip_grad, self.config.clip_value)
        if not self.scaler.is_enabled() and not torch.isfinite(grad_norm):
            self._skip_nonfinite(f"gradient norm {grad_norm.item():g}")
            return False
        self.callbacks.run("on_before_optimizer_step", self)  # complete, unscaled, clipped gradients (--sparsity)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulated = 0
        return True

    def _record_step(self, image_size: int, instances: int) -> None:
        state = self.state
        self.step_record = StepRecord(
            epoch=state.epoch,
            batch_index=state.batch_index,
            num_batches=self.num_batches,
            mean_losses=self._mean_losses(),
            instances=instances,
            image_size=image_size,
            memory=memory_usage(self.device),
        )

    # -- stopping ---------------------------------------------------------------------------------------------------

    def request_stop(self, reason: str) -> None:
        """End the run cleanly: a stop asked during an epoch ends it after the current batch; the epoch is then
        validated, logged and saved like any other, and the run finishes as if it were its last epoch. The first
        reason given is kept in ``state.stop_reason``. Under DDP a request on any rank stops every rank."""
        if self.state.stop_reason is None:
            self.state.stop_reason = reason

    def _stop_requested_anywhere(self) -> bool:
        """Whether any rank asked to stop (one small all-reduce per step under DDP, none otherwise)."""
        requested = self.state.stop_reason is not None
        if self.context.is_distributed:
            anywhere = not distributed.all_ranks_true(not requested, self.context, self.device)
            if anywhere and not requested:
                self.state.stop_reason = "stop requested on another rank"
            return anywhere
        return requested

    # -- non-finite losses ------------------------------------------------------------------------------------------

    def _skip_nonfinite(self, what: str) -> None:
        """Drop this step (and the gradients accumulated with it); restore the last good state if it repeats."""
        self.optimizer.zero_grad(set_to_none=True)
        self.accumulated = 0
        self.nonfinite_streak += 1
        LOGGER.warning(
            "WARNING: non-finite %s at epoch %d batch %d; step skipped (%d in a row)",
            what,
            self.state.epoch,
            self.state.batch_index,
            self.nonfinite_streak,
        )
        if self.nonfinite_streak < NONFINITE_LIMIT:
            return
        if self.recovering or self.good_state is None:
            raise TrainingDivergedError(
                f"the loss stayed non-finite for {NONFINITE_LIMIT} steps even after restoring the weights of the "
                f"last epoch end at {self.state.lr_factor:g}x the learning rate; check the data and hyperparameters "
                f"(lr0 {self.config.hyp.lr0}), or try --amp off"
            )
        self.checkpointer.restore_snapshot(self, self.good_state)
        self.state.lr_factor *= RECOVERY_LR_FACTOR
        self.nonfinite_streak, self.recovering = 0, True
        LOGGER.warning(
            "WARNING: %d non-finite losses in a row: restored the weights of the last epoch end; learning rate now "
            "%gx the schedule",
            NONFINITE_LIMIT,
            self.state.lr_factor,
        )

    # -- end of epoch -----------------------------------------------------------------------------------------------

    def end_epoch(self) -> None:
        """BatchNorm statistics agreed over ranks, the epoch-end hooks (validation, schedule, early stopping,
        logging, checkpoint), the stop decision shared by all ranks, and the state to recover to."""
        distributed.average_batchnorm_statistics(self.model, self.context)
        release_memory()
        self.state.train_seconds = self.elapsed_seconds()
        self.callbacks.run("on_epoch_end", self)
        release_memory()
        self._stop_requested_anywhere()
        self._update_image_weights()
        self.good_state = self.checkpointer.snapshot(self) or self.good_state

    @property
    def epoch_record(self) -> EpochRecord:
        """This epoch's results.csv row: mean train losses, the latest validation, the learning rates."""
        state, metrics = self.state, self.state.metrics
        return EpochRecord(
            epoch=state.epoch,
            train_losses=self._mean_losses(),
            precision=metrics.precision if metrics else 0.0,
            recall=metrics.recall if metrics else 0.0,
            map50=metrics.map50 if metrics else 0.0,
            map=metrics.map if metrics else 0.0,
            val_losses=dict(metrics.loss) if metrics else {},
            learning_rates=state.learning_rates,
            fitness=state.fitness if state.fitness is not None else 0.0,
        )

    def validate(self) -> Metrics:
        """Metrics of the EMA model on the validation set, with validation losses (rank 0); recorded in ``state``."""
        if self.validator is None:  # one Validator for the whole run, as val.py would configure it
            self.validator = self._validator(plots=False, verbose=False)
        model = self.ema.ema if self.ema is not None else self.model
        started = self.clock()
        metrics = self.validator.run(model, self.val_loader, loss_fn=self.loss_fn)
        self.validation_seconds = self.clock() - started
        self.state.record_validation(metrics, len(self.names))
        release_memory()
        return metrics

    def validate_best(self) -> Metrics | None:
        """best.pt validated as val.py would (plots, per-class table); becomes ``state.metrics``."""
        best = self.checkpointer.best
        if not best.exists():
            return self.state.metrics
        LOGGER.info("\nValidating %s...", best)
        model = load_model(best, device=self.device)
        self.state.metrics = self._validator(plots=not self.config.noplots, verbose=True).run(model, self.val_loader)
        return self.state.metrics

    def _validator(self, plots: bool, verbose: bool) -> Validator:
        """The Validator val.py uses, with val.py's thresholds (conf 0.001, IoU 0.6) at ``--val-imgsz`` (by default
        the training image size)."""
        config = ValConfig(
            data=self.config.data,
            imgsz=self.val_imgsz,
            batch_size=self.batch_size * 2,
            single_cls=self.config.single_cls,
            half=self.amp_dtype is not None,  # validation under the training's autocast dtype
            verbose=verbose,
        )
        return Validator(config, self.names, self.save_dir, plots=plots, training=True)

    def _update_image_weights(self) -> None:
        """--image-weights: draw images with classes the model finds poorly more often (rank 0's maps, shared)."""
        if not self.config.image_weights:
            return
        class_maps = np.asarray(distributed.broadcast_object(self.state.class_maps, self.context), dtype=np.float64)
        labels, nc = self._dataset_labels("--image-weights"), len(self.names)
        class_weights = reweight_by_map(labels_to_class_weights(labels, nc).numpy(), class_maps)
        self.train_loader.sampler.set_image_weights(labels_to_image_weights(labels, nc, class_weights))

    def _check_replicas(self) -> None:
        if not self.context.is_distributed:
            return
        if distributed.replicas_agree(self.model, self.context, self.device):
            LOGGER.info("DDP: all %d ranks hold identical weights", self.context.world_size)
        else:
            LOGGER.warning("WARNING: DDP ranks ended with different weights; only rank 0's are saved")
