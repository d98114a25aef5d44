"""Ablation of training tricks: the same model, data and budget trained once with the baseline and once per trick
(or combination of tricks), each with several seeds, summarised as a table and a chart.

``python scripts/ablate.py --tricks mixup cutmix mixup+cutmix --seeds 2 --epochs 30 --data my.yaml`` and
``detector.ablation.ablate(tricks=["mixup"], seeds=2, epochs=30, data="my.yaml")`` run the same thing:

- **Tricks** are data: :data:`TRICKS` maps a name to the TrainConfig overrides that switch it on (hyp keys as
  ``hyp.<key>``; ``model.<key>`` for a key of the model YAML, such as ``model.activation``), a one-line description
  and the switch a user would pass to train.py. A new trick is one :func:`register_trick` call. ``a+b`` combines
  tricks, and ``--extra NAME KEY=VALUE ...`` adds one without registering it.
- **Runs** are ordinary training runs through the public :class:`~detector.engine.trainer.Trainer` (every training
  option passes through, including the ``--epochs`` or ``--time`` budget), with seed k in ``<folder>/<trick>/seed<k>``.
  A :class:`ThroughputMeter` hook counts the images trained and the seconds spent training them (validation
  excluded). A run validates its last epoch only (each epoch where the recipe needs it: ``--image-weights``, the
  plateau schedule), saves no plots or checkpoints, and its row holds its last epoch's validation (the last row of
  its results.csv), the same rule for every variant.
- **Results** go to ``ablation.csv`` (one row per run, rewritten atomically after each), ``ablation.md`` (mean and
  spread per trick, the difference to the baseline, a verdict, in how many seeds the trick's run beat the
  baseline's, and about how many seeds would resolve that difference) and ``ablation.png`` (mAP50-95 per trick, error
  bars, the baseline as a line). ``ablation.yaml`` holds the options, so the same command with ``--exist-ok`` (or
  ``--resume DIR``) continues a killed ablation, skipping the runs already finished.
- **Backends**: runs one after another in this process, or several at once as Ray tasks (``backend="ray"``), on a
  Ray instance started as the evolution's Ray backend starts it (:mod:`detector.evolve.ray_backend`).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import functools
import logging
import math
import re
import shutil
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from detector.config import (
    TrainConfig,
    build_config,
    check_train_config,
    config_to_dict,
    load_yaml,
    resolve_train_config,
)
from detector.engine.callbacks import Callback
from detector.errors import ConfigError
from detector.utils.files import atomic_write, atomic_write_csv, increment_path
from detector.utils.logging import add_file_log, remove_file_log

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from detector.engine.trainer import Trainer

LOGGER = logging.getLogger(__name__)

DEFAULT_PROJECT = "runs/ablate"
BASELINE = "baseline"
MODEL_PREFIX = "model."  # overrides of the model YAML (written as a derived YAML into the ablation folder)
MODEL_KEYS = ("activation", "depth_multiple", "width_multiple", "anchors")  # model YAML keys a trick may set
CLOSE_MOSAIC_FRACTION = 0.1  # close-mosaic: the last 10% of the epochs (ultralytics: 10 of 100)
# Options that may differ when an ablation is continued: where and how its runs train, not what they train.
RUNTIME_KEYS = ("device", "workers", "cache_dir", "project", "name", "exist_ok")
# train.py options an ablation sets itself (per run) or cannot take.
REFUSED_FLAGS = {
    "seed": "the ablation sets each run's seed (0 .. --seeds - 1)",
    "resume": "to continue an ablation use --resume DIR (the ablation folder) or the same command with --exist-ok",
    "evolve": "evolution and ablation are separate tools (train.py --evolve)",
    "local_rank": "an ablation run trains in one process",
}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


# --------------------------------------------------------------------------------------------------------------------
# The registry of tricks


Overrides = Mapping[str, Any]


@dataclass(frozen=True)
class Trick:
    """One training trick: the TrainConfig keys it sets (``hyp.mixup``, ``label_smoothing``, ``model.activation``),
    a one-line description and how a user turns it on in train.py. ``overrides`` is a mapping, or a function of the
    baseline config for tricks relative to it (twice the weight decay, the last 10% of the epochs)."""

    name: str
    description: str
    switch: str
    overrides: Overrides | Callable[[TrainConfig], Overrides]

    def resolve(self, base: TrainConfig) -> dict[str, Any]:
        """The overrides against ``base``, as ``{dotted key: value}``."""
        overrides = self.overrides(base) if callable(self.overrides) else self.overrides
        return dict(overrides)


TRICKS: dict[str, Trick] = {}


def register_trick(
    name: str, description: str, switch: str, overrides: Overrides | Callable[[TrainConfig], Overrides]
) -> Trick:
    """Add a trick to :data:`TRICKS` (a name used twice raises)."""
    if name in TRICKS or name == BASELINE:
        raise ValueError(f"trick {name!r} is registered twice")
    if not NAME_PATTERN.fullmatch(name) or "+" in name:
        raise ValueError(f"trick name {name!r}: use letters, digits, '.', '_' and '-' ('+' combines tricks)")
    TRICKS[name] = Trick(name, description, switch, overrides)
    return TRICKS[name]


def _close_mosaic(base: TrainConfig) -> Overrides:
    # Under --time the trainer counts these epochs back from the last epoch that fits, so this is 10% of the cap.
    return {"close_mosaic": max(1, round(CLOSE_MOSAIC_FRACTION * base.epochs))}


def _double_weight_decay(base: TrainConfig) -> Overrides:
    return {"hyp.weight_decay": 2 * base.hyp.weight_decay}


def _fixres(base: TrainConfig) -> Overrides:
    """Train at about 7/8 of the baseline's size (a multiple of 32: 224 for 256, 576 for 640), test at its size."""
    test_size = base.val_imgsz or base.imgsz
    return {"imgsz": max(64, 32 * round(base.imgsz * 7 / 8 / 32)), "val_imgsz": test_size}


register_trick("mosaic-off", "no mosaic: every sample is one image", "hyp mosaic: 0", {"hyp.mosaic": 0.0})
register_trick("mixup", "mixup of two samples, ratio from beta(32, 32)", "hyp mixup: 0.1", {"hyp.mixup": 0.1})
register_trick(
    "cutmix", "CutMix: a rectangle of another image pasted in, with its boxes", "hyp cutmix: 0.5", {"hyp.cutmix": 0.5}
)
register_trick(
    "copy-paste",
    "objects of another image pasted in (by polygon, else by box)",
    "hyp copy_paste: 0.1",
    {"hyp.copy_paste": 0.1},
)
register_trick("cutout", "cutout / random erasing of a few patches", "hyp cutout: 0.5", {"hyp.cutout": 0.5})
register_trick("gridmask", "GridMask: a grid of erased squares", "hyp gridmask: 0.5", {"hyp.gridmask": 0.5})
register_trick(
    "trivial", "TrivialAugment-Wide, boxes moved with the image", "--auto-augment trivial", {"auto_augment": "trivial"}
)
register_trick(
    "randaugment", "RandAugment (2 ops at magnitude 9)", "--auto-augment randaugment", {"auto_augment": "randaugment"}
)
register_trick(
    "detection-v0",
    "Zoph et al.'s learned detection augmentation policy v0",
    "--auto-augment detection-v0",
    {"auto_augment": "detection-v0"},
)
register_trick(
    "repeat-aug",
    "repeated augmentation: each image twice per batch, augmented anew",
    "--repeat-aug 2",
    {"repeat_aug": 2},
)
register_trick("label-smoothing", "label smoothing 0.1", "hyp label_smoothing: 0.1", {"hyp.label_smoothing": 0.1})
register_trick(
    "close-mosaic",
    "the last 10% of the epochs (at least 1) without mosaic and mixing, on whole images",
    "--close-mosaic N",
    _close_mosaic,
)
register_trick(
    "fixres",
    "train at about 7/8 of the image size (224 for 256) and validate at the full size: cheaper epochs, objects seen "
    "smaller in training than at test time (Touvron et al. 2019)",
    "--img 224 --val-img 256 (at 256)",
    _fixres,
)
register_trick(
    "class-balanced",
    "repeat-factor sampling (LVIS) at threshold 0.1",
    "--class-balanced 0.1",
    {"class_balanced": 0.1},
)
register_trick(
    "image-weights",
    "images drawn by (1 - per-class mAP)^2 (validates every epoch)",
    "--image-weights",
    {"image_weights": True},
)
register_trick(
    "class-weights", "class loss weighted by inverse class frequency", "--class-weights", {"class_weights": True}
)
register_trick("drop-path", "stochastic depth up to 0.1", "hyp drop_path: 0.1", {"hyp.drop_path": 0.1})
register_trick("dropout", "dropout 0.1 on the features entering the head", "hyp dropout: 0.1", {"hyp.dropout": 0.1})
register_trick(
    "cosine", "cosine learning-rate decay instead of linear", "--lr-schedule cosine", {"lr_schedule": "cosine"}
)
register_trick("weight-decay", "twice the baseline's weight decay", "hyp weight_decay: 2x", _double_weight_decay)
register_trick(
    "ema-off",
    "no weight averaging: the weights as trained are validated and saved",
    "hyp ema_decay: 0",
    {"hyp.ema_decay": 0.0},
)
register_trick(
    "ema-tau-200",
    "the EMA's decay ramps up over 200 updates instead of 2000 (a real average in runs of ~1,000 updates)",
    "hyp ema_tau: 200",
    {"hyp.ema_tau": 200.0},
)
register_trick(
    "activation",
    "LeakyReLU(0.1) instead of SiLU in every Conv (YOLOv5 before v4.0)",
    "model YAML activation: nn.LeakyReLU(0.1)",
    {"model.activation": "nn.LeakyReLU(0.1)"},
)
register_trick(
    "sparsity",
    "network slimming's L1 penalty 1e-4 on BatchNorm scales (the accuracy it costs before pruning)",
    "--sparsity 1e-4",
    {"sparsity": 1e-4},
)
# Speed and memory switches: the same training (the table's throughput column shows their effect).
register_trick(
    "channels-last",
    "NHWC memory format for the model and batches (auto already uses it on the CPU)",
    "--channels-last",
    {"channels_last": "on"},
)
register_trick("compile", "torch.compile of the training model", "--compile", {"compile": True})
register_trick(
    "grad-checkpoint",
    "activation checkpointing of the backbone and neck: less memory, more compute",
    "--grad-checkpoint",
    {"grad_checkpoint": True},
)

register_trick("sam", "sharpness-aware minimisation (SAM), rho 0.05: two passes per batch", "--sam 0.05", {"sam": 0.05})
register_trick(
    "asam",
    "adaptive SAM (ASAM): the perturbation scaled by the weights' magnitudes, rho 0.5",
    "--sam 0.5 --sam-adaptive",
    {"sam": 0.5, "sam_adaptive": True},
)
register_trick("no-clip", "no gradient-norm clipping (the default clips at 10)", "--clip-grad 0", {"clip_grad": 0.0})
# Small-batch normalisation and ACNet (detector/models/norms.py, acnet.py); short warm-ups to suit short runs.
register_trick(
    "ghost-bn",
    "Ghost BatchNorm: statistics per virtual batch of 4 images",
    "--norm ghost --virtual-batch-size 4",
    {"norm": "ghost", "norm_options.virtual_batch_size": 4},
)
register_trick(
    "batch-renorm",
    "Batch Renormalization, bounds opening to rmax 3, dmax 5 over 50 batches",
    "--norm brn (norm_options.renorm_warmup: 50)",
    {"norm": "brn", "norm_options.renorm_warmup": 50},
)
register_trick(
    "cross-iteration-bn",
    "Cross-Iteration BatchNorm over 8 iterations, after 20 batches of BatchNorm",
    "--norm cbn (norm_options.burnin: 20)",
    {"norm": "cbn", "norm_options.burnin": 20},
)
register_trick(
    "acnet", "ACNet: 1x3 and 3x1 branches on every 3x3 Conv, folded for inference", "--acnet", {"acnet": True}
)


def trick_table() -> str:
    """The registry as a Markdown table: name, switch, overrides against the defaults, description."""
    base = TrainConfig()
    lines = ["| trick | train.py switch | overrides | what |", "|---|---|---|---|"]
    for trick in TRICKS.values():
        overrides = format_overrides(trick.resolve(base))
        lines.append(f"| {trick.name} | `{trick.switch}` | `{overrides}` | {trick.description} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Which variants to run: names, combinations and --extra


@dataclass(frozen=True)
class Variant:
    """One arm of the ablation: its name (``mixup``, ``mixup+cutmix``, an --extra name; its folder) and the tricks
    it combines (none for the baseline)."""

    name: str
    tricks: tuple[Trick, ...] = ()

    def overrides(self, base: TrainConfig) -> dict[str, Any]:
        """The combined overrides; two tricks that set one key to different values are refused."""
        merged: dict[str, Any] = {}
        owner: dict[str, str] = {}
        for trick in self.tricks:
            for key, value in trick.resolve(base).items():
                if key in merged and merged[key] != value:
                    raise ConfigError(
                        f"--tricks {self.name}: {owner[key]} sets {key}={merged[key]} and {trick.name} sets "
                        f"{key}={value}; combine tricks that set different keys"
                    )
                merged[key], owner[key] = value, trick.name
        return merged


def parse_extra(items: Sequence[str]) -> Trick:
    """``--extra NAME KEY=VALUE [KEY=VALUE ...]`` -> a Trick (values as typed; they are coerced by the field type,
    and ``model.*`` values are read as YAML scalars)."""
    if len(items) < 2:
        raise ConfigError(f"--extra {' '.join(items)}: expected a NAME and at least one KEY=VALUE")
    name, *assignments = items
    if not NAME_PATTERN.fullmatch(name) or "+" in name:
        raise ConfigError(f"--extra {name}: a name of letters, digits, '.', '_' and '-' (it names the run folder)")
    if name == BASELINE or name in TRICKS:
        raise ConfigError(f"--extra {name}: this name is taken by {'the baseline' if name == BASELINE else 'a trick'}")
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, value = assignment.partition("=")
        key = key.strip().replace("-", "_") if not key.startswith(MODEL_PREFIX) else key.strip()
        if not sep or not key:
            raise ConfigError(f"--extra {name}: expected KEY=VALUE (e.g. hyp.mixup=0.2), got {assignment!r}")
        overrides[key] = yaml.safe_load(value) if key.startswith(MODEL_PREFIX) else value
    return Trick(name, "user-defined (--extra)", " ".join(assignments), overrides)


def select_variants(tricks: Sequence[str] | None = None, extra: Iterable[Sequence[str]] = ()) -> list[Variant]:
    """The baseline, then the selected variants in the order given.

    ``tricks``: trick names, ``a+b`` combinations, or ``baseline`` (always run anyway); None = every registered
    trick, or only the ``extra`` ones when there are some. ``extra``: ``[NAME, KEY=VALUE, ...]`` lists, each its
    own variant, whose names ``tricks`` may also use. An unknown name is one ConfigError with a close match.
    """
    extras: dict[str, Trick] = {}
    for items in extra:
        trick = parse_extra(list(items))
        if trick.name in extras:
            raise ConfigError(f"--extra {trick.name} is given twice")
        extras[trick.name] = trick
    known = {**TRICKS, **extras}
    if tricks is None:
        tricks = list(extras) if extras else list(TRICKS)
    else:
        tricks = [*tricks, *(name for name in extras if name not in tricks)]
    variants = [Variant(BASELINE)]
    for token in tricks:
        if token == BASELINE or token in (v.name for v in variants):
            continue
        parts = token.split("+")
        for part in parts:
            if part not in known:
                close = difflib.get_close_matches(part, [*known, BASELINE], n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise ConfigError(
                    f"--tricks: unknown trick '{part}'{hint} (known: {', '.join(known)}; see --list-tricks)"
                )
        if len(set(parts)) != len(parts):
            raise ConfigError(f"--tricks {token}: a trick appears twice")
        variants.append(Variant(token, tuple(known[part] for part in parts)))
    return variants


def format_overrides(overrides: Mapping[str, Any]) -> str:
    """``{"hyp.mixup": 0.1, "label_smoothing": 0.1}`` -> ``hyp.mixup=0.1 label_smoothing=0.1`` (csv, md, logs)."""
    return " ".join(f"{key}={_plain(value)}" for key, value in overrides.items())


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# --------------------------------------------------------------------------------------------------------------------
# Run configs


@dataclass(frozen=True)
class RunSpec:
    """One run: a variant and a seed, its overrides (as the csv shows them) and the TrainConfig it trains with."""

    variant: str
    seed: int
    overrides: str
    config: TrainConfig

    @property
    def folder(self) -> Path:
        return Path(self.config.project) / self.config.name


def variant_config(base: TrainConfig, name: str, overrides: Mapping[str, Any], model_yaml: Path | None) -> TrainConfig:
    """``base`` with a variant's overrides applied through the project's config builder (unknown keys and wrong
    types are refused with a suggestion); ``model.*`` overrides point ``cfg`` at ``model_yaml``."""
    train_overrides = {key: value for key, value in overrides.items() if not key.startswith(MODEL_PREFIX)}
    config = build_config(TrainConfig, ("baseline", config_to_dict(base)), (f"trick {name}", train_overrides))
    if model_yaml is not None:
        config = dataclasses.replace(config, cfg=str(model_yaml))
    return config


def run_config(config: TrainConfig, save_dir: Path, variant: str, seed: int) -> TrainConfig:
    """A variant's config as one run: seed, folder ``save_dir/<variant>/seed<k>``, no plots, the final checkpoint
    only, validation at the end only unless the recipe reacts to each epoch's (plateau, --image-weights)."""
    validate_each = config.lr_schedule == "plateau" or config.image_weights
    return dataclasses.replace(
        config,
        seed=seed,
        project=str(save_dir / variant),
        name=f"seed{seed}",
        exist_ok=True,
        resume="",
        nosave=True,
        noplots=True,
        noval=not validate_each,
    )


def derived_model_yaml(base: TrainConfig, name: str, overrides: Mapping[str, Any]) -> dict[str, Any] | None:
    """The model YAML of a variant with ``model.*`` overrides: the baseline's (--cfg, else --weights' own, else
    yolov5n.yaml) with those keys replaced; None when the variant sets none. Checked here (keys, activation name)."""
    model_overrides = {key[len(MODEL_PREFIX) :]: v for key, v in overrides.items() if key.startswith(MODEL_PREFIX)}
    if not model_overrides:
        return None
    from detector.engine.trainer import DEFAULT_MODEL
    from detector.models.yolo import parse_activation, read_model_yaml

    for key in model_overrides:
        if key not in MODEL_KEYS:
            close = difflib.get_close_matches(key, MODEL_KEYS, n=1)
            hint = f"; did you mean '{MODEL_PREFIX}{close[0]}'?" if close else ""
            raise ConfigError(
                f"trick {name}: unknown model key '{MODEL_PREFIX}{key}'{hint} (model keys: "
                f"{', '.join(MODEL_PREFIX + k for k in MODEL_KEYS)})"
            )
    if base.cfg or not base.weights:
        model, _ = read_model_yaml(base.cfg or DEFAULT_MODEL)
    else:
        from detector.models.loading import load_model

        model = dict(load_model(base.weights).yaml)
    model.pop("yaml_file", None)
    model.update(model_overrides)
    if "activation" in model_overrides:
        parse_activation(model["activation"], f"trick {name}")
    return model


# --------------------------------------------------------------------------------------------------------------------
# One run through the Trainer


class ThroughputMeter(Callback):
    """Counts the images trained and the wall-clock seconds spent training them: each epoch from its start to its
    last step, so validation, checkpoints and the run's set-up are left out. (``Trainer.timings`` splits the same
    time into data, forward, loss, backward and optimizer phases; this also counts the hooks of each step.)"""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._epoch_started: float | None = None
        self._last_step: float | None = None

    def on_epoch_start(self, trainer: Trainer) -> None:
        self._epoch_started, self._last_step = time.perf_counter(), None

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.last_batch is not None:
            self.images += int(trainer.last_batch[0].shape[0]) * trainer.context.world_size
        self._last_step = time.perf_counter()

    def on_epoch_end(self, trainer: Trainer) -> None:
        if self._epoch_started is not None and self._last_step is not None:
            self.seconds += self._last_step - self._epoch_started
        self._epoch_started = None

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


@dataclass
class RunResult:
    """What one run gave: its last epoch's validation, the training throughput and how it ended."""

    map50: float = 0.0
    map: float = 0.0  # mAP50-95
    fitness: float = 0.0
    train_seconds: float = 0.0  # training only (ThroughputMeter)
    images_per_second: float = 0.0
    epochs: int = 0
    seconds: float = 0.0  # the whole run: set-up, training, validation
    status: str = "ok"  # ok | failed
    error: str = ""


@functools.cache
def ablation_trainer() -> type[Trainer]:
    """The Trainer of ablation runs, made on first use (the trainer imports torch): every default hook (the LR
    schedule, EMA, --time budget, early stopping, loggers...) except the second validation of best.pt at the end, so
    a run's result is its last epoch's validation (results.csv's last row) whichever epoch best.pt holds; and no
    checkpoints unless ``keep_weights``."""
    from detector.engine.callbacks import Callbacks
    from detector.engine.hooks import CheckpointHook, ValidationHook, default_hooks
    from detector.engine.trackers import build_loggers
    from detector.engine.trainer import Trainer

    class AblationTrainer(Trainer):
        def __init__(self, config: TrainConfig, *, keep_weights: bool = False, callbacks: Any = None) -> None:
            self.keep_weights = keep_weights
            super().__init__(config, callbacks=callbacks)

        def build_hooks(self) -> Callbacks:
            hooks = []
            for hook in default_hooks():
                if isinstance(hook, ValidationHook):
                    hook = ValidationHook(final=False)
                elif isinstance(hook, CheckpointHook) and not self.keep_weights:
                    continue
                hooks.append(hook)
            return Callbacks([*hooks, *build_loggers(self.config.logger)])  # --logger's trackers, as train.py

    return AblationTrainer


def train_run(config: TrainConfig, keep_weights: bool = False) -> RunResult:
    """Train one run (:func:`ablation_trainer`, with a :class:`ThroughputMeter`); its result is the validation of
    its last epoch (validated now if a stop left it unvalidated). Any exception (divergence, out of memory, an
    impossible value) is the run's result (``failed``), not the ablation's end; only Ctrl-C stops it."""
    from detector.ops.metrics import fitness
    from detector.utils.memory import release_memory

    meter = ThroughputMeter()
    started = time.perf_counter()
    result = RunResult()
    trainer = None
    try:
        trainer = ablation_trainer()(config, keep_weights=keep_weights, callbacks=[meter])
        trainer.fit()
        state = trainer.state
        metrics = state.metrics if state.fitness is not None else trainer.validate()
        result.epochs = state.epoch - state.start_epoch + 1
        result.map50, result.map = float(metrics.map50), float(metrics.map)
        result.fitness = float(fitness(metrics, config.fitness_weights))
    except Exception as e:  # one failed run is that run's row; the ablation goes on
        result.status, result.error = "failed", f"{type(e).__name__}: {e}"
        LOGGER.warning("WARNING: ablation run %s failed: %s", Path(config.project).name, result.error)
        LOGGER.debug("ablation run traceback", exc_info=True)  # in the ablation's log.txt
    finally:
        trainer = None  # the dataset, cache and model go before the next run
        release_memory()
    result.train_seconds, result.images_per_second = meter.seconds, meter.images_per_second
    result.seconds = time.perf_counter() - started
    return result


# --------------------------------------------------------------------------------------------------------------------
# ablation.csv


CSV_COLUMNS = (
    "trick",
    "seed",
    "overrides",
    "mAP50",
    "mAP50-95",
    "fitness",
    "train_seconds",
    "images_per_second",
    "epochs",
    "seconds",
    "status",
    "error",
)


class AblationTable:
    """``ablation.csv``: one row per run (trick, seed), rewritten atomically after every run; the ablation's state.
    A row recorded again (a failed run tried again) replaces the old one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.rows: list[dict[str, str]] = []
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                missing = [column for column in CSV_COLUMNS if column not in (reader.fieldnames or ())]
                if missing:
                    raise ConfigError(f"{self.path}: not an ablation.csv; columns missing: {', '.join(missing)}")
                self.rows = list(reader)

    def finished(self, variant: str, seed: int) -> bool:
        """Whether (variant, seed) trained to its end; failed runs are tried again."""
        row = self.row(variant, seed)
        return row is not None and row["status"] == "ok"

    def row(self, variant: str, seed: int) -> dict[str, str] | None:
        return next((r for r in self.rows if r["trick"] == variant and r["seed"] == str(seed)), None)

    def overrides_of(self, variant: str) -> str | None:
        """The overrides the variant's recorded runs used (None when it has none)."""
        return next((r["overrides"] for r in self.rows if r["trick"] == variant), None)

    def add(self, spec: RunSpec, result: RunResult) -> None:
        row = {
            "trick": spec.variant,
            "seed": str(spec.seed),
            "overrides": spec.overrides,
            "mAP50": f"{result.map50:.6g}",
            "mAP50-95": f"{result.map:.6g}",
            "fitness": f"{result.fitness:.6g}",
            "train_seconds": f"{result.train_seconds:.2f}",
            "images_per_second": f"{result.images_per_second:.2f}",
            "epochs": str(result.epochs),
            "seconds": f"{result.seconds:.1f}",
            "status": result.status,
            "error": " ".join(result.error.split())[:500],  # one line; the run's log.txt has the rest
        }
        self.rows = [r for r in self.rows if (r["trick"], r["seed"]) != (row["trick"], row["seed"])] + [row]
        self.write()

    def write(self) -> None:
        atomic_write_csv(self.path, CSV_COLUMNS, self.rows)


# --------------------------------------------------------------------------------------------------------------------
# The summary: mean and spread per variant, difference to the baseline, verdict


@dataclass(frozen=True)
class Estimate:
    """Mean and spread (half the min-max range) of one figure over a variant's finished runs."""

    mean: float
    spread: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Estimate | None:
        if not values:
            return None
        return cls(sum(values) / len(values), (max(values) - min(values)) / 2, len(values))


@dataclass(frozen=True)
class VariantSummary:
    """A variant's line of ablation.md and bar of ablation.png."""

    name: str
    overrides: str
    finished: int
    failed: int
    map50: Estimate | None
    map: Estimate | None  # mAP50-95
    delta_map50: float | None  # mean minus the baseline's mean
    delta_map: float | None
    verdict: str
    # seeds where this variant's mAP50-95 is above the baseline's run of the same seed, of the seeds both finished
    seeds_above: tuple[int, int] | None
    # about how many seeds would resolve the paired difference at 80% power (see seeds_to_resolve); None: < 2 pairs
    seeds_for_delta: float | None
    train_seconds: float | None  # of the fastest finished run (see summarize)
    images_per_second: float | None


VERDICT_BASELINE = "baseline"
VERDICT_NO_EFFECT = "no effect"
VERDICT_BETTER = "better"
VERDICT_WORSE = "worse"
VERDICT_TOO_FEW = "too few runs"
VERDICT_FAILED = "failed"


def verdict(trick: Estimate | None, baseline: Estimate | None) -> str:
    """``no effect`` when the difference of the means is inside the combined spread (the trick's plus the
    baseline's: their mean ± spread intervals overlap), else ``better`` / ``worse``; ``too few runs`` when either
    side has fewer than 2 finished runs (one run has no spread), ``failed`` when the trick has none."""
    if trick is None:
        return VERDICT_FAILED
    if baseline is None or trick.count < 2 or baseline.count < 2:
        return VERDICT_TOO_FEW
    difference = trick.mean - baseline.mean
    if abs(difference) <= trick.spread + baseline.spread + 1e-12:
        return VERDICT_NO_EFFECT
    return VERDICT_BETTER if difference > 0 else VERDICT_WORSE


# z for a two-sided 5% test plus z for 80% power (1.96 + 0.84): the usual sample-size rule for a paired difference
POWER_Z = 2.8


def seeds_to_resolve(differences: Sequence[float]) -> float | None:
    """About how many seeds a paired comparison needs to tell its mean difference from zero (two-sided 5%, 80%
    power): ``(2.8 * sd / mean)^2`` of the per-seed differences (trick minus baseline, same seed), at least 2;
    ``inf`` when the mean is 0, None with fewer than 2 differences. A rough guide: few seeds estimate ``sd`` loosely
    and the normal rule undercounts for small samples, so treat it as a lower bound."""
    if len(differences) < 2:
        return None
    mean = statistics.fmean(differences)
    if mean == 0:
        return math.inf
    return max(2.0, math.ceil((POWER_Z * statistics.stdev(differences) / mean) ** 2 - 1e-9))


def summarize(rows: Sequence[Mapping[str, str]], order: Sequence[str] = ()) -> list[VariantSummary]:
    """One summary per variant of ``rows`` (ablation.csv rows), the baseline first, then ``order``, then the rest
    in the order of their first row. The verdict is on mAP50-95.

    Train seconds and images per second are the fastest finished run's, as ``timeit`` keeps the best of its repeats:
    other work on the machine and cold disk caches (the first run of an ablation reads every image from disk) only
    ever slow a run down, and the baseline, which runs first, would otherwise carry that cost."""
    names = list(dict.fromkeys([BASELINE, *order, *(row["trick"] for row in rows)]))
    by_name: dict[str, list[Mapping[str, str]]] = {name: [] for name in names}
    for row in rows:
        by_name[row["trick"]].append(row)
    names = [name for name in names if by_name[name]]

    def estimate(name: str, column: str) -> Estimate | None:
        return Estimate.of([float(row[column]) for row in by_name[name] if row["status"] == "ok"])

    def by_seed(name: str) -> dict[str, float]:
        return {row["seed"]: float(row["mAP50-95"]) for row in by_name[name] if row["status"] == "ok"}

    base_by_seed = by_seed(BASELINE)

    base_map50, base_map = estimate(BASELINE, "mAP50"), estimate(BASELINE, "mAP50-95")
    summaries = []
    for name in names:
        finished = [row for row in by_name[name] if row["status"] == "ok"]
        fastest = max(finished, key=lambda row: float(row["images_per_second"]), default=None)
        map50, map_ = estimate(name, "mAP50"), estimate(name, "mAP50-95")
        is_base = name == BASELINE
        # this variant's run minus the baseline's run of the same seed, over the seeds both finished
        differences = [value - base_by_seed[seed] for seed, value in by_seed(name).items() if seed in base_by_seed]
        summaries.append(
            VariantSummary(
                name=name,
                overrides=by_name[name][0]["overrides"],
                finished=len(finished),
                failed=len(by_name[name]) - len(finished),
                map50=map50,
                map=map_,
                delta_map50=None if is_base or map50 is None or base_map50 is None else map50.mean - base_map50.mean,
                delta_map=None if is_base or map_ is None or base_map is None else map_.mean - base_map.mean,
                verdict=VERDICT_BASELINE if is_base and map_ is not None else verdict(map_, base_map),
                seeds_above=None if is_base or not differences else (sum(d > 0 for d in differences), len(differences)),
                seeds_for_delta=None if is_base else seeds_to_resolve(differences),
                train_seconds=float(fastest["train_seconds"]) if fastest else None,
                images_per_second=float(fastest["images_per_second"]) if fastest else None,
            )
        )
    return summaries


# --------------------------------------------------------------------------------------------------------------------
# ablation.md and ablation.png


def markdown_report(
    summaries: Sequence[VariantSummary],
    rows: Sequence[Mapping[str, str]],
    *,
    title: str,
    budget: str,
    seeds: int,
    commands: Sequence[str],
) -> str:
    """ablation.md: the table (one line per variant), the failed runs with their errors, and the command(s)."""
    lines = [
        f"# Ablation: {title}",
        "",
        f"Every run trains the same model on the same data with the same budget ({budget}); "
        f"{f'seeds 0-{seeds - 1}' if seeds > 1 else 'seed 0'}.",
        "mAP50 and mAP50-95 are each run's last validation (of its last epoch: the last row of its results.csv), "
        "shown as **mean ± spread** over the seeds' finished runs, where **spread = half the min-max range**. "
        "Δ is the difference of the means to the baseline. The "
        f"verdict is on mAP50-95: *{VERDICT_NO_EFFECT}* when |Δ| is inside the combined spread (the trick's plus the "
        f"baseline's), else *{VERDICT_BETTER}* or *{VERDICT_WORSE}*; *{VERDICT_TOO_FEW}* with fewer than 2 finished "
        "runs on either side. Seeds above: in how many of the seeds both finished the trick's run scored a higher "
        "mAP50-95 than the baseline's run of the same seed (shown beside the verdict, not part of it). "
        "Seeds for Δ: about how many seeds would tell the trick's paired difference (its run minus the baseline's, "
        "seed by seed) from no difference at 80% power, (2.8 x sd / mean)^2 of those differences: a rough lower "
        "bound from few seeds, to plan the next run when the verdict is *no effect*. "
        "Train s and img/s are the training time (validation excluded) and images trained per "
        "second of the trick's fastest run (other load and cold disk caches only slow a run down).",
        "",
        "| trick | overrides | runs | mAP50 | Δ mAP50 | mAP50-95 | Δ mAP50-95 | verdict | seeds above | seeds for Δ "
        "| train s | img/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        runs = f"{s.finished}/{s.finished + s.failed}"
        lines.append(
            f"| {s.name} | {_code(s.overrides)} | {runs} | {_estimate(s.map50)} | {_delta(s.delta_map50)} | "
            f"{_estimate(s.map)} | {_delta(s.delta_map)} | {s.verdict} | {_seeds_above(s.seeds_above)} | "
            f"{_seeds_needed(s.seeds_for_delta)} | "
            f"{_number(s.train_seconds, '.1f')} | {_number(s.images_per_second, '.1f')} |"
        )
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        lines += ["", "Failed runs (tried again when the ablation is continued):", ""]
        lines += [f"- {row['trick']} seed {row['seed']}: {row['error'] or row['status']}" for row in failed]
    lines += ["", "Produced by:", "", "```bash", *commands, "```", ""]
    return "\n".join(lines)


def _code(text: str) -> str:
    return f"`{text}`" if text else ""


def _estimate(value: Estimate | None) -> str:
    return "" if value is None else f"{value.mean:.4f} ± {value.spread:.4f}"


def _seeds_above(value: tuple[int, int] | None) -> str:
    return "" if value is None else f"{value[0]}/{value[1]}"


def _seeds_needed(value: float | None) -> str:
    if value is None:
        return ""
    return "∞" if math.isinf(value) else f"{value:.0f}"


def _delta(value: float | None) -> str:
    return "" if value is None else f"{value:+.4f}"


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


VERDICT_COLOURS = {
    VERDICT_BASELINE: "#7f7f7f",
    VERDICT_BETTER: "#2ca02c",
    VERDICT_WORSE: "#d62728",
    VERDICT_NO_EFFECT: "#1f77b4",
    VERDICT_TOO_FEW: "#9ecae1",
    VERDICT_FAILED: "#cccccc",
}


def ablation_figure(summaries: Sequence[VariantSummary], title: str = "") -> Figure:
    """ablation.png: a horizontal bar per variant (mean mAP50-95, error bar = spread), coloured by verdict and
    labelled with its difference to the baseline, whose mean is a dashed line over its spread band. The axis is
    zoomed to the values (differences of a few thousandths would not show on an axis from 0). Failed variants show
    no bar."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    from detector.utils.plots import new_figure

    figure = new_figure((8.0, 1.6 + 0.36 * max(len(summaries), 1)))
    axes = figure.add_subplot(1, 1, 1)
    positions = list(range(len(summaries)))
    means = [s.map.mean if s.map else 0.0 for s in summaries]
    spreads = [s.map.spread if s.map else 0.0 for s in summaries]
    measured = [(s.map.mean - s.map.spread, s.map.mean + s.map.spread) for s in summaries if s.map is not None]
    low = min((lo for lo, _ in measured), default=0.0)
    high = max((hi for _, hi in measured), default=1e-3)
    span = max(high - low, 0.01 * max(high, 1e-3), 1e-4)
    left, right = max(0.0, low - 0.6 * span), high + 0.45 * span  # room for the labels right of the bars
    colours = [VERDICT_COLOURS[s.verdict] for s in summaries]
    axes.barh(positions, means, xerr=spreads, color=colours, capsize=3, height=0.65, error_kw={"elinewidth": 1})
    baseline = next((s for s in summaries if s.name == BASELINE and s.map is not None), None)
    if baseline is not None:
        band = (baseline.map.mean - baseline.map.spread, baseline.map.mean + baseline.map.spread)
        axes.axvspan(*band, color="#7f7f7f", alpha=0.2, linewidth=0)
        axes.axvline(baseline.map.mean, color="#333333", linestyle="--", linewidth=1)
    for position, s in zip(positions, summaries, strict=True):
        if s.map is None:
            label, x = s.verdict, left
        elif s.delta_map is None:
            label, x = f"{s.map.mean:.4f}", s.map.mean + s.map.spread
        else:
            label, x = f"{s.delta_map:+.4f}", s.map.mean + s.map.spread
        axes.text(x + 0.02 * span, position, label, va="center", fontsize=8)
    axes.set_yticks(positions, [s.name for s in summaries], fontsize=9)
    axes.invert_yaxis()  # the baseline on top, as in ablation.md
    axes.set_xlim(left, right)
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.4g}"))  # no offset text on the label
    axes.set_xlabel("mAP50-95: mean ± spread (half the min-max range) over seeds; dashed line: baseline")
    axes.grid(axis="x", alpha=0.3)
    used = list(dict.fromkeys(s.verdict for s in summaries))
    axes.legend(
        handles=[Patch(color=VERDICT_COLOURS[v], label=v) for v in used],
        loc="lower center",
        bbox_to_anchor=(0.5, 1.0),
        ncol=len(used),
        fontsize=8,
        frameon=False,
    )
    if title:
        figure.suptitle(title, fontsize=10)
    return figure


def plot_ablation(path: str | Path, summaries: Sequence[VariantSummary], title: str = "") -> Path:
    from detector.utils.plots import save_figure

    return save_figure(ablation_figure(summaries, title), path, dpi=120)


# --------------------------------------------------------------------------------------------------------------------
# The ablation: folder, options, runs


@dataclass
class Ablation:
    """One ablation: its folder, baseline config, variants, seeds and runs; ``table`` is its ablation.csv."""

    save_dir: Path
    base: TrainConfig
    variants: list[Variant]
    seeds: int
    commands: list[str]
    selection: dict[str, Any] = field(default_factory=dict)  # tricks and extras as given (ablation.yaml)
    specs: list[RunSpec] = field(default_factory=list)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)  # variant -> derived model YAML to write

    def __post_init__(self) -> None:
        self.table = AblationTable(self.save_dir / "ablation.csv")

    @property
    def settings_path(self) -> Path:
        return self.save_dir / "ablation.yaml"

    def build_specs(self) -> None:
        """Every run's config, each checked as the trainer would check it, before anything is written."""
        self.specs, self.models = [], {}
        for variant in self.variants:
            overrides = variant.overrides(self.base)
            model = derived_model_yaml(self.base, variant.name, overrides)
            model_path = (self.save_dir / "models" / f"{variant.name}.yaml") if model is not None else None
            if model is not None:
                self.models[variant.name] = model
            config = variant_config(self.base, variant.name, overrides, model_path)  # its errors name the trick
            try:
                check_train_config(config)
            except ConfigError as e:
                raise ConfigError(f"trick {variant.name}: {e}") from e
            if variant.name != BASELINE and config == self.base:
                LOGGER.warning("WARNING: ablation: %s changes nothing from the baseline here", variant.name)
            for seed in range(self.seeds):
                spec_config = run_config(config, self.save_dir, variant.name, seed)
                self.specs.append(RunSpec(variant.name, seed, format_overrides(overrides), spec_config))
        for variant in self.variants:  # a variant that already ran must run as it did
            recorded = self.table.overrides_of(variant.name)
            current = next(spec.overrides for spec in self.specs if spec.variant == variant.name)
            if recorded is not None and recorded != current:
                raise ConfigError(
                    f"{self.table.path}: {variant.name} ran with '{recorded}', now it would be '{current}'; use a new "
                    "--name (or another --extra name)"
                )

    def pending(self) -> list[RunSpec]:
        """The runs not yet finished, in order: seed 0 of every variant, then seed 1, ... (a stopped ablation has
        every variant's first seed first)."""
        todo = [spec for spec in self.specs if not self.table.finished(spec.variant, spec.seed)]
        return sorted(todo, key=lambda spec: spec.seed)

    def write_settings(self) -> None:
        """ablation.yaml (the options, for continuing) and the derived model YAMLs; makes the folder."""
        settings = {
            "commands": self.commands,
            "seeds": self.seeds,
            "selection": self.selection,
            "train": config_to_dict(self.base),
        }
        text = yaml.safe_dump(settings, sort_keys=False)
        atomic_write(self.settings_path, lambda f: f.write(text.encode("utf-8")))
        for name, model in self.models.items():
            path = self.save_dir / "models" / f"{name}.yaml"
            header = f"# the model of the ablation's '{name}' runs: the baseline's model YAML with its model.* keys\n"
            text = header + yaml.safe_dump(model, sort_keys=False)
            atomic_write(path, lambda f, text=text: f.write(text.encode("utf-8")))

    def record(self, spec: RunSpec, result: RunResult) -> None:
        """A run's row in ablation.csv (atomically) and a log line."""
        self.table.add(spec, result)
        done = sum(self.table.finished(s.variant, s.seed) for s in self.specs)
        LOGGER.info(
            "Ablation: %s seed %d %s in %.1f s: mAP50 %.4f, mAP50-95 %.4f, %.1f img/s; %d of %d runs done",
            spec.variant,
            spec.seed,
            result.status,
            result.seconds,
            result.map50,
            result.map,
            result.images_per_second,
            done,
            len(self.specs),
        )

    def budget(self) -> str:
        base = self.base
        size = f"imgsz {base.imgsz}, batch {base.batch_size}"
        epochs = f"{base.epochs} epoch{'s' if base.epochs != 1 else ''}"
        if base.time > 0:
            return f"--time {base.time:g} min (at most {epochs}), {size}"
        return f"{epochs}, {size}"

    def finish(self) -> list[VariantSummary]:
        """ablation.md and ablation.png from ablation.csv; returns the summaries."""
        summaries = summarize(self.table.rows, [variant.name for variant in self.variants])
        text = markdown_report(
            summaries,
            self.table.rows,
            title=str(self.save_dir),
            budget=self.budget(),
            seeds=self.seeds,
            commands=self.commands,
        )
        atomic_write(self.save_dir / "ablation.md", lambda f: f.write(text.encode("utf-8")))
        if summaries:
            plot_ablation(self.save_dir / "ablation.png", summaries, title=f"{self.save_dir.name}: {self.budget()}")
        for s in summaries:
            LOGGER.info(
                "Ablation: %-16s mAP50-95 %s %s %s",
                s.name,
                _estimate(s.map) or "-",
                _delta(s.delta_map),
                s.verdict,
            )
        LOGGER.info("Ablation: results in %s (ablation.csv, ablation.md, ablation.png)", self.save_dir)
        return summaries


@dataclass(frozen=True)
class AblationResult:
    """What :func:`ablate` returns: the folder and one summary per variant (baseline first)."""

    save_dir: Path
    summaries: list[VariantSummary]


def ablate(
    *,
    tricks: Sequence[str] | None = None,
    extra: Iterable[Sequence[str]] = (),
    seeds: int | None = None,
    resume: str = "",
    backend: str = "local",
    ray_address: str = "",
    trial_resources: str = "",
    keep_weights: bool = False,
    command: str | None = None,
    **train_options: Any,
) -> AblationResult:
    """Python API of ``scripts/ablate.py``: ``ablate(tricks=["mixup", "mixup+cutmix"], seeds=2, epochs=30,
    data="coco128.yaml")``.

    ``tricks``: names of :data:`TRICKS`, ``a+b`` combinations (None: all; only the extras when ``extra`` is given);
    ``extra``: ``[NAME, "KEY=VALUE", ...]`` lists of further variants; ``seeds``: runs per variant, seeds 0..S-1
    (default 2); ``resume``: an ablation folder to continue; ``backend``: ``local`` (one run at a time) or ``ray``
    (``ray_address``, ``trial_resources`` as for the evolution); ``keep_weights``: save each run's final checkpoint.
    ``train_options`` are train.py's options as TrainConfig fields (``data``, ``cfg``, ``epochs``, ``time``,
    ``hyp``, ``config``, ``project`` (default runs/ablate), ``name``, ``exist_ok``...), merged as train.py merges
    them. Every option is checked before anything is written.
    """
    from detector.utils.logging import setup_logging

    setup_logging()
    if backend not in ("local", "ray"):
        raise ConfigError(f"--backend {backend!r}: expected local or ray")
    if backend == "local" and (ray_address or trial_resources):
        raise ConfigError("--ray-address and --trial-resources need --backend ray (local runs go one by one)")
    if command is None:
        given = {"tricks": tricks, "seeds": seeds, "resume": resume, "backend": backend, **train_options}
        shown = ", ".join(f"{key}={value!r}" for key, value in given.items() if value not in (None, "", "local"))
        command = f"detector.ablation.ablate({shown})"
    ablation = prepare(tricks, list(extra), seeds, resume, train_options, command)
    log = add_file_log(ablation.save_dir)  # the ablation's log.txt: every run's output and failed runs' tracebacks
    try:
        pending = ablation.pending()
        LOGGER.info(
            "Ablation: %d variants x %d seeds into %s; %d runs to go (%s)",
            len(ablation.variants),
            ablation.seeds,
            ablation.save_dir,
            len(pending),
            ablation.budget(),
        )
        if backend == "ray" and pending:
            run_on_ray(ablation, pending, ray_address, trial_resources, keep_weights)
        else:
            for number, spec in enumerate(pending, start=1):
                LOGGER.info(
                    "\nAblation: run %d of %d: %s seed %d %s",
                    number,
                    len(pending),
                    spec.variant,
                    spec.seed,
                    spec.overrides,
                )
                shutil.rmtree(spec.folder, ignore_errors=True)  # a run lost to a kill starts again from nothing
                ablation.record(spec, train_run(spec.config, keep_weights))
        return AblationResult(ablation.save_dir, ablation.finish())
    finally:
        remove_file_log(log)


def prepare(
    tricks: Sequence[str] | None,
    extra: list[Sequence[str]],
    seeds: int | None,
    resume: str,
    train_options: Mapping[str, Any],
    command: str,
) -> Ablation:
    """Check every option, then make (or reopen) the folder: a new one under ``project/name``, or the one of
    ``resume``, or ``project/name`` itself with ``exist_ok`` when it holds an ablation.yaml. Continuing keeps the
    saved baseline; only :data:`RUNTIME_KEYS` may differ, tricks and seeds may be added."""
    flags = {key.replace("-", "_"): value for key, value in train_options.items()}
    for key in flags:
        if key.split(".")[0] in REFUSED_FLAGS or key.startswith(("evolve", "resume_evolve", "asha_")):
            reason = REFUSED_FLAGS.get(key.split(".")[0], REFUSED_FLAGS["evolve"])
            raise ConfigError(f"--{key.replace('_', '-')}: not an ablation option; {reason}")
    if seeds is not None and seeds < 1:
        raise ConfigError(f"--seeds: expected 1 or more, got {seeds}")
    flags.setdefault("project", DEFAULT_PROJECT)
    if tricks is not None or extra:
        select_variants(tricks, extra)  # an unknown trick stops here, before the data is even read
    saved: dict[str, Any] | None = None
    if resume:
        save_dir = Path(resume)
        if not (save_dir / "ablation.yaml").is_file():
            raise ConfigError(f"--resume {resume}: no ablation.yaml there; pass an ablation folder (runs/ablate/exp)")
        saved = load_yaml(save_dir / "ablation.yaml")
        base = _reopened_base(save_dir, saved, flags)
    else:
        base = resolve_train_config(flags, source="ablation")
        save_dir = Path(base.project) / base.name
        if base.exist_ok and (save_dir / "ablation.yaml").is_file():
            saved = load_yaml(save_dir / "ablation.yaml")
            base = _reopened_base(save_dir, saved, flags)
        else:
            save_dir = increment_path(save_dir, exist_ok=base.exist_ok, mkdir=False)
    _check_base(base)
    selection = {"tricks": list(tricks) if tricks is not None else None, "extra": [list(items) for items in extra]}
    if saved is not None and tricks is None and not extra:
        selection = dict(saved.get("selection") or selection)
    seeds = seeds if seeds is not None else int(saved.get("seeds", 2)) if saved else 2
    if seeds == 1:
        LOGGER.warning("WARNING: --seeds 1: no spread to judge by; every verdict will say '%s'", VERDICT_TOO_FEW)
    variants = select_variants(selection["tricks"], selection["extra"])
    commands = [*(saved.get("commands", []) if saved else []), command]
    ablation = Ablation(save_dir, base, variants, seeds, commands, selection)
    ablation.build_specs()
    if base.time > 0 and any(v.name == "close-mosaic" for v in variants):
        LOGGER.warning(
            "WARNING: close-mosaic under --time closes the last %d epochs (10%% of --epochs %d, the cap): set "
            "--epochs near the number of epochs that fit",
            max(1, round(CLOSE_MOSAIC_FRACTION * base.epochs)),
            base.epochs,
        )
    ablation.write_settings()
    return ablation


def _reopened_base(save_dir: Path, saved: Mapping[str, Any], flags: Mapping[str, Any]) -> TrainConfig:
    """The saved baseline, with the runtime options given now; any other training option given now must agree."""
    source = str(save_dir / "ablation.yaml")
    saved_base = build_config(TrainConfig, (source, saved.get("train", {})))
    given = {key: value for key, value in flags.items() if key.split(".")[0] not in RUNTIME_KEYS}
    if given:
        location = {"project": saved_base.project, "name": saved_base.name}
        fresh = resolve_train_config({**flags, **location}, source="ablation")
        old, new = config_to_dict(saved_base), config_to_dict(fresh)
        changed = [f"--{key.replace('_', '-')}" for key in old if key not in RUNTIME_KEYS and old[key] != new[key]]
        if changed:
            raise ConfigError(
                f"{source}: this ablation ran with other training options ({', '.join(changed)}); to continue it "
                "only --device, --workers and --cache-dir may change (tricks and seeds may be added)"
            )
    runtime = {key: flags[key] for key in ("device", "workers", "cache_dir") if key in flags}
    return build_config(TrainConfig, (source, config_to_dict(saved_base)), ("ablation", runtime))


def _check_base(base: TrainConfig) -> None:
    """What every run needs, checked once: a valid config, a single device, a dataset that loads."""
    from detector.data.dataset_config import load_dataset_config
    from detector.utils.torch_utils import device_ids

    check_train_config(base)
    if len(device_ids(base.device)) > 1:
        raise ConfigError(
            f"--device {base.device}: an ablation run trains on one device; use --backend ray to run several "
            "runs at once, one device each"
        )
    load_dataset_config(base.data)


# --------------------------------------------------------------------------------------------------------------------
# Ray: the runs as Ray tasks, several at once


def run_on_ray(
    ablation: Ablation, pending: Sequence[RunSpec], address: str, trial_resources: str, keep_weights: bool
) -> None:
    """Each pending run as a Ray task with ``trial_resources`` (default 1 CPU, and 1 GPU when Ray has GPUs and
    ``--device`` is not cpu), recorded here as it ends. Ray is started (or joined) as the evolution starts it."""
    from detector.evolve.ray_backend import (
        absolute_paths,
        complete_resources,
        connect,
        error_message,
        import_tune,
        parse_trial_resources,
    )

    import_tune()  # the same one-line install hint as the evolution's (ray[tune] brings ray)
    requested = parse_trial_resources(trial_resources)
    ray, started = connect(address)
    try:
        resources = complete_resources(requested, ablation.base.device, ray.cluster_resources(), local=started)
        task = ray.remote(train_run_on_worker).options(
            num_cpus=resources["cpu"], num_gpus=resources["gpu"], max_retries=0
        )
        threads = max(1, int(resources["cpu"]))
        futures = {}
        for spec in pending:
            config = absolute_paths(dataclasses.replace(spec.config, project=str(Path(spec.config.project).resolve())))
            futures[task.remote(config, threads, keep_weights)] = spec
        LOGGER.info(
            "Ablation: %d runs on Ray, each with %s",
            len(futures),
            ", ".join(f"{key}={value:g}" for key, value in resources.items()),
        )
        while futures:
            done, _ = ray.wait(list(futures), num_returns=1)
            spec = futures.pop(done[0])
            try:
                result = ray.get(done[0])
            except Exception as e:  # the worker died (out of memory, killed): the run failed, the others go on
                result = RunResult(status="failed", error=error_message(e))
                LOGGER.warning(
                    "WARNING: ablation run %s seed %d failed on Ray: %s", spec.variant, spec.seed, result.error
                )
            ablation.record(spec, result)
    finally:
        if started:
            ray.shutdown()


def train_run_on_worker(config: TrainConfig, threads: int, keep_weights: bool = False) -> RunResult:
    """A Ray task: :func:`train_run` with ``threads`` torch threads, on the task's GPU (or the CPU), its progress
    bars in the run's console.txt (several runs' bars would interleave in the driver)."""
    import contextlib

    import ray
    import torch

    from detector.evolve.ray_backend import trial_device
    from detector.utils.logging import setup_logging

    setup_logging(verbose=False)  # warnings reach the driver's console; the run's full log is in its log.txt
    torch.set_num_threads(threads)
    config = dataclasses.replace(config, device=trial_device(config.device, len(ray.get_gpu_ids())))
    folder = Path(config.project) / config.name
    shutil.rmtree(folder, ignore_errors=True)  # a run lost to a kill starts again from nothing
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "console.txt", "w", encoding="utf-8") as console, contextlib.redirect_stderr(console):
        return train_run(config, keep_weights)
