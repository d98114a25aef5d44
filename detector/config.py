"""Typed configuration: defaults <- YAML files <- command-line flags, merged in one place.

Every option of every task is a field of a frozen dataclass below, with its meaning in a comment. YAML files
(hyperparameters, ``--config`` files) and command-line flags are applied on top of the defaults by
:func:`build_config`, which rejects unknown keys with a suggestion and coerces values by the field's type
(``"0.5"`` -> 0.5 for a float; only ``true/false/1/0`` for a bool, never Python's ``bool("False") == True``).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from detector.errors import CheckpointError, ConfigError
from detector.models.release import is_release_name

# The YAMLs ship inside the package (so a wheel installed anywhere finds them); a checkout's configs/ and data/ are
# symlinks to these folders. A plain folder, not importlib.resources: pip always installs the package unzipped, and
# these paths are globbed, resolved and shown to users.
PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
MODEL_CONFIG_DIR = CONFIG_DIR / "models"
HYP_CONFIG_DIR = CONFIG_DIR / "hyps"
DATA_CONFIG_DIR = CONFIG_DIR / "data"
# What `python train.py` uses on the built-in dataset, under any --config, --hyp and flags (CPU-friendly recipe).
BUILTIN_TRAIN_CONFIG = CONFIG_DIR / "builtin.yaml"

T = TypeVar("T")


@dataclass(frozen=True)
class Hyperparameters:
    """Training hyperparameters, with YOLOv5's keys so its ``hyp.*.yaml`` files load unchanged."""

    lr0: float = 0.01  # initial learning rate (SGD 1e-2, Adam 1e-3)
    lrf: float = 0.01  # final learning rate as a fraction of lr0
    momentum: float = 0.937  # SGD momentum / Adam beta1
    weight_decay: float = 0.0005  # optimizer weight decay at nominal batch 64
    warmup_epochs: float = 3.0  # warmup length in epochs (fractions allowed; at least 100 iterations)
    warmup_momentum: float = 0.8  # momentum at the start of warmup
    warmup_bias_lr: float = 0.1  # bias learning rate at the start of warmup
    box: float = 0.05  # box loss gain
    cls: float = 0.5  # class loss gain
    cls_pw: float = 1.0  # class BCE positive weight
    obj: float = 1.0  # objectness loss gain (scales with pixels)
    obj_pw: float = 1.0  # objectness BCE positive weight
    iou_t: float = 0.20  # IoU training threshold (unused by the loss, kept for YOLOv5 hyp files)
    anchor_t: float = 4.0  # anchor-multiple threshold for target matching and AutoAnchor
    anchors: float = 0.0  # anchors per output level; > 0 replaces the model's anchors (then AutoAnchor fits them)
    fl_gamma: float = 0.0  # focal loss gamma (0 = plain BCE; EfficientDet uses 1.5)
    label_smoothing: float = 0.0  # class-target smoothing epsilon: targets 1 - eps/2 and eps/2 (--label-smoothing)
    distill: float = 0.0  # knowledge distillation from --teacher: gain of the distill loss term (0 = off)
    distill_t: float = 1.0  # distillation temperature: teacher and student logits divided by it (> 1 softens)
    hsv_h: float = 0.015  # hue augmentation (fraction)
    hsv_s: float = 0.7  # saturation augmentation (fraction)
    hsv_v: float = 0.4  # value augmentation (fraction)
    degrees: float = 0.0  # rotation (+/- degrees)
    translate: float = 0.1  # translation (+/- fraction)
    scale: float = 0.5  # scale (+/- gain)
    shear: float = 0.0  # shear (+/- degrees)
    perspective: float = 0.0  # perspective (+/- fraction), range 0-0.001
    flipud: float = 0.0  # probability of an up-down flip
    fliplr: float = 0.5  # probability of a left-right flip
    mosaic: float = 1.0  # probability of a mosaic
    mosaic9: float = 0.0  # probability that a mosaic uses 9 images instead of 4
    mixup: float = 0.0  # probability of mixup (ratio drawn from beta(32, 32))
    copy_paste: float = 0.0  # probability of pasting another image's objects (by polygon, else by box)
    cutout: float = 0.0  # probability of cutout / random erasing of a few patches
    cutmix: float = 0.0  # probability of CutMix: a rectangle of another training image pasted in, with its boxes
    gridmask: float = 0.0  # probability of GridMask: a grid of erased squares over the image
    min_visibility: float = 0.3  # CutMix, GridMask: a box keeps its label while at least this fraction stays visible
    albumentations: float = 0.0  # probability of the albumentations pipeline (only when albumentations is installed)
    drop_path: float = 0.0  # stochastic depth: drop probability of the deepest bottleneck's branch (rising with depth)
    dropout: float = 0.0  # dropout probability on the features entering the detection head, in training
    ema_decay: float = 0.9999  # EMA of the weights: final decay per update (0 = no averaging: the model as trained)
    ema_tau: float = 2000.0  # EMA: updates over which the decay ramps up, d = ema_decay * (1 - exp(-updates / tau))


@dataclass(frozen=True)
class NormConfig:
    """Options of the small-batch normalisations (``--norm``; detector/models/norms.py); each norm reads its own."""

    virtual_batch_size: int = 16  # ghost: images per virtual batch normalised by its own statistics
    rmax: float = 3.0  # brn: final bound of the correction r in [1/rmax, rmax] (1 = plain BatchNorm)
    dmax: float = 5.0  # brn: final bound of the correction d in [-dmax, dmax] (0 = plain BatchNorm)
    renorm_warmup: int = 5000  # brn: training batches over which the bounds open linearly from 1 and 0
    window: int = 8  # cbn: iterations whose compensated statistics are averaged, this one included
    burnin: int = 1000  # cbn: training batches of plain BatchNorm first, while the weights change fast


@dataclass(frozen=True)
class ScheduleConfig:
    """Parameters of the learning-rate schedules (``--lr-schedule``; detector/engine/schedules.py)."""

    onecycle_pct: float = 0.3  # onecycle: fraction of the iterations spent raising the rate (torch's pct_start)
    onecycle_div: float = 25.0  # onecycle: the rate starts at lr0 / onecycle_div (torch's div_factor)
    onecycle_min_momentum: float = 0.85  # onecycle: momentum (Adam beta1) at the peak rate; hyp.momentum at the ends
    t0: float = 10.0  # cosine-restarts: epochs of the first cosine cycle (SGDR's T_0)
    t_mult: int = 1  # cosine-restarts: each cycle is t_mult times longer than the one before (SGDR's T_mult)
    plateau_factor: float = 0.1  # plateau: rate multiplier when the validation fitness stalls
    plateau_patience: int = 5  # plateau: epochs without improvement before the rate is reduced
    plateau_cooldown: int = 0  # plateau: epochs to wait after a reduction before counting again
    plateau_threshold: float = 0.0001  # plateau: relative improvement of the fitness that counts as better


@dataclass(frozen=True)
class TrainConfig:
    """Options of ``train.py``; flag names are YOLOv5's (``--batch-size`` is ``batch_size`` here)."""

    weights: str = ""  # initial weights (.pt, ours or YOLOv5's); "" trains from scratch
    cfg: str = ""  # model YAML (name in configs/models or a path); "" = from --weights, else yolov5n.yaml
    data: str = ""  # dataset YAML; "" = the built-in synthetic dataset
    hyp: Hyperparameters = field(default_factory=Hyperparameters)  # from --hyp YAML
    epochs: int = 100  # epochs to train (configs/builtin.yaml sets the built-in dataset's CPU-friendly number)
    batch_size: int = 16  # total batch size over all GPUs; -1 = AutoBatch (CUDA: ~80% of the memory)
    nbs: int = 64  # nominal batch size: gradients accumulate to this many images per optimizer step (YOLOv5: 64)
    imgsz: int = 640  # train/val image size in pixels (configs/builtin.yaml sets the built-in dataset's)
    val_imgsz: int = 0  # validation image size (FixRes: train smaller than you test); 0 = imgsz
    rect: bool = False  # rectangular training batches (no mosaic)
    resume: str = ""  # "" = no; "auto" = most recent last.pt under --project; or a path to last.pt
    nosave: bool = False  # only save the final checkpoint
    noval: bool = False  # only validate after the final epoch
    val_period: int = 1  # validate every N epochs, and always the last (--noval: only the last)
    noautoanchor: bool = False  # skip the AutoAnchor check
    noplots: bool = False  # save no plot files
    cache: Literal["", "ram", "disk"] = ""  # cache decoded images in RAM or as .npy files on disk
    cache_dir: str = ""  # folder for label caches; "" = beside the labels, or the user cache when not writable
    image_weights: bool = False  # sample images weighted by (1 - per-class mAP)^2 of their classes
    class_balanced: float = 0.0  # > 0: repeat-factor sampling: classes in fewer than this fraction of images drawn more
    device: str = ""  # "cpu", "0", "0,1,2,3"; "" = first CUDA device if any, else CPU
    multi_scale: bool = False  # vary image size +/- 50% each batch
    single_cls: bool = False  # train multi-class data as one class
    optimizer: Literal["SGD", "Adam", "AdamW"] = "SGD"  # optimizer
    clip_grad: float = 10.0  # clip the gradients' total L2 norm to this before each optimizer step (0 = off)
    clip_value: float = 0.0  # clip each gradient element to [-V, V] before each step (before clip_grad; 0 = off)
    sam: float = 0.0  # sharpness-aware minimisation (SAM) radius rho, e.g. 0.05: two passes per batch (0 = off)
    sam_adaptive: bool = False  # ASAM: SAM's perturbation scaled by |w| (use a ~10x larger sam, e.g. 0.5)
    sparsity: float = 0.0  # network slimming: L1 penalty on BatchNorm scales, e.g. 1e-4, decaying to 1/10 (0 = off)
    sync_bn: bool = False  # SyncBatchNorm across DDP processes
    norm: str = "bn"  # normalisation: bn, or ghost, brn, cbn for small batches (bn = the model YAML's norm, else bn)
    norm_options: NormConfig = field(default_factory=NormConfig)  # parameters of the --norm ghost, brn, cbn
    acnet: bool = False  # ACNet: 1x3 and 3x1 branches beside every 3x3 Conv in training, folded for inference
    workers: int = 8  # max dataloader workers per process (capped by CPU count)
    project: str = "runs/train"  # parent folder of run folders
    name: str = "exp"  # run folder name; exp, exp2, ... unless exist_ok
    exist_ok: bool = False  # reuse an existing run folder instead of incrementing
    quad: bool = False  # quad collate: 4 images become one at 2x size
    cos_lr: bool = False  # alias of lr_schedule "cosine" (YOLOv5's --cos-lr)
    lr_schedule: str = "linear"  # LR per iteration: linear, cosine, onecycle, cosine-restarts, plateau (or registered)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)  # parameters of the learning-rate schedules
    label_smoothing: float = 0.0  # alias of hyp.label_smoothing (YOLOv5's --label-smoothing); when > 0 it wins
    class_weights: bool = False  # weight the class loss by inverse class frequency
    patience: int = 100  # early stopping after this many epochs without improvement (0 = never)
    freeze: tuple[int, ...] = (0,)  # freeze the first N layers (one number), or the listed layer indices
    save_period: int = -1  # also save a checkpoint every N epochs (-1 = never)
    seed: int = 0  # global random seed
    deterministic: bool = False  # deterministic algorithms (slower), for bit-exact repeatable runs
    amp: Literal["auto", "fp16", "bf16", "off"] = "auto"  # auto: fp16 on CUDA, bf16 on CPUs with native bf16
    channels_last: Literal["auto", "on", "off"] = "auto"  # NHWC memory format for model and batches; auto = on CPU only
    compile: bool = False  # torch.compile the training model (eager, with a one-line warning, where it cannot)
    grad_checkpoint: bool = False  # activation checkpointing: recompute backbone/neck activations in backward
    fitness_weights: tuple[float, ...] = (0.0, 0.0, 0.1, 0.9)  # fitness = these x (P, R, mAP50, mAP50-95): best.pt
    auto_augment: str = ""  # automatic augmentation policy: trivial, randaugment[-nN-mM], detection-v0; "" = none
    repeat_aug: int = 1  # repeated augmentation: each drawn image appears this many times per batch, augmented anew
    close_mosaic: int = 0  # the last N epochs without mosaic/mixing augmentation, on whole images at val_imgsz (FixRes)
    augment_on_device: bool = False  # HSV colour and flips on the training device (batch-wise), not in the workers
    time: float = 0.0  # wall-clock budget in minutes: > 0 fits the number of epochs to it (--epochs is then a cap)
    logger: tuple[str, ...] = ("tensorboard",)  # experiment trackers: tensorboard, mlflow, wandb (console, CSV: always)
    ndjson_console: bool = False  # alias of logger "ndjson-console": each epoch's results as a JSON line on stdout
    ndjson_file: bool = False  # alias of logger "ndjson": each epoch's results appended to results.ndjson
    train_tile: int = 0  # > 0: train on random tiles of this many px cut from full-resolution images; 0 = whole images
    unlabeled: str = ""  # images without labels (folder, glob or .txt list): pseudo-labelled into the training set
    pseudo_every: int = 5  # the run's EMA model relabels them every N epochs (from epoch N); 0 = the teacher's only
    pseudo_conf: float = 0.5  # confidence threshold of the pseudo-label boxes (NMS of the labelling model)
    pseudo_weight: float = 0.5  # weight of a pseudo-label box in the box, class and objectness losses (labelled: 1)
    teacher: str = ""  # weights (.pt, ours or YOLOv5's) that label --unlabeled and/or teach (hyp distill); "" = none


@dataclass(frozen=True)
class LRFindConfig:
    """Options of ``train.py --lr-find``: the learning-rate range test of the run a TrainConfig describes."""

    iterations: int = 200  # optimizer steps, the learning rate growing geometrically from min_lr to max_lr
    min_lr: float = 1e-6  # learning rate of the first step
    max_lr: float = 1.0  # learning rate of the last step (the test stops earlier when the loss diverges)


@dataclass(frozen=True)
class EvolveConfig:
    """Options of ``train.py --evolve``: how to search the hyperparameters of the run a TrainConfig describes."""

    trials: int = 300  # --evolve N: trials in all, counting those a resumed search already has in evolve.csv
    space: str = ""  # search space YAML (bounds, scale, evolve per hyp key); "" = configs/evolve/default.yaml
    strategy: str = "genetic"  # genetic (tournament, crossover, range-scaled mutation, elitism) or yolov5 (classic)
    population: int = 8  # genetic: trials per generation, and the size of the parent pool
    parent: Literal["single", "weighted"] = "single"  # yolov5: one of the top 5 at random, or their weighted mean
    hyps: tuple[str, ...] = ()  # further starting hyp YAMLs besides --hyp (the first generation's seeds)
    resume: str = ""  # an evolve folder (runs/evolve/exp) whose evolve.csv to continue
    backend: Literal["local", "ray"] = "local"  # trials one after another here, or several at once with Ray Tune
    ray_address: str = ""  # ray: "" = start a local Ray instance; "auto" or HOST:PORT = join an existing cluster
    trial_resources: str = ""  # ray: resources of each trial, e.g. "cpu=2,gpu=1"; "" = 1 CPU (and 1 GPU if any)
    concurrency: int = 0  # ray: most trials at once; 0 = as many as the resources allow
    search: Literal["ga", "random", "optuna"] = "ga"  # ray: our genetic proposals, Ray's random search, or Optuna
    scheduler: Literal["fifo", "asha"] = "fifo"  # ray: run every trial to the end, or stop poor ones early (ASHA)
    grace_period: int = 1  # asha: epochs every trial runs before it can be stopped
    reduction_factor: int = 2  # asha: keep the best 1/reduction_factor of trials at each rung


@dataclass(frozen=True)
class ValConfig:
    """Options of ``val.py``."""

    data: str = ""  # dataset YAML; "" = the built-in synthetic dataset
    weights: str | tuple[str, ...] = ""  # .pt, .torchscript, .onnx, OpenVINO folder, .engine; several: an ensemble
    batch_size: int = 32
    imgsz: int = 640  # inference size in pixels
    conf_thres: float = 0.001  # confidence threshold
    iou_thres: float = 0.6  # NMS IoU threshold
    max_det: int = 300  # maximum detections per image
    task: Literal["train", "val", "test", "speed", "study"] = "val"
    device: str = ""
    workers: int = 8
    single_cls: bool = False  # treat as a single-class dataset
    cache_dir: str = ""  # folder for label caches; "" = beside the labels, or the user cache when not writable
    augment: bool = False  # test-time augmentation
    verbose: bool = False  # report mAP per class
    save_txt: bool = False  # save results to *.txt
    save_hybrid: bool = False  # save labels + predictions to *.txt
    save_conf: bool = False  # save confidences in --save-txt labels
    save_json: bool = False  # save a COCO-format JSON and evaluate it with pycocotools
    project: str = "runs/val"
    name: str = "exp"
    exist_ok: bool = False
    half: bool = False  # FP16 on CUDA; bf16 (.pt, OpenVINO) on CPUs with native bf16
    dnn: bool = False  # run .onnx weights with OpenCV's DNN module instead of ONNX Runtime
    tile: int = 0  # > 0: predict each whole image in overlapping tiles of this many px (small objects); 0 = off
    tile_overlap: float = 0.2  # overlap of neighbouring tiles, as a fraction of the tile, in [0, 1)
    tile_full: bool = False  # with tiles: also predict on the whole downscaled image (objects larger than a tile)
    tile_merge: Literal["nms", "nmm"] = "nms"  # joining tiles: keep the best of matching boxes, or merge into unions
    tile_match: Literal["iou", "ios"] = "ios"  # boxes match by IoU or by intersection over the smaller box's area
    tile_match_thres: float = 0.5  # boxes of one class match above this IoU/IoS


@dataclass(frozen=True)
class DetectConfig:
    """Options of ``detect.py``."""

    weights: str | tuple[str, ...] = ""  # model weights (any supported format); several: an ensemble
    source: str = ""  # file, folder, glob, .txt list, video, webcam index, URL or .streams file
    data: str = ""  # optional dataset YAML for class names of formats that do not store them
    imgsz: tuple[int, ...] = (640,)  # inference size: one number, or height width
    conf_thres: float = 0.25
    iou_thres: float = 0.45
    max_det: int = 1000
    device: str = ""
    view_img: bool = False
    save_txt: bool = False
    save_conf: bool = False
    save_crop: bool = False
    save_format: Literal[0, 1] = 0  # --save-txt boxes: 0 = YOLO x_center y_center w h, 1 = x1 y1 x2 y2; normalised
    save_csv: bool = False  # one predictions.csv row per detection: image, frame, class, confidence, box in pixels
    nosave: bool = False
    classes: tuple[int, ...] | None = None  # keep only these class ids
    agnostic_nms: bool = False
    augment: bool = False
    visualize: bool = False  # save every layer's feature maps per image (.pt models): runs/detect/exp/<image>/
    project: str = "runs/detect"
    name: str = "exp"
    exist_ok: bool = False
    line_thickness: int = 3
    hide_labels: bool = False
    hide_conf: bool = False
    half: bool = False  # FP16 on CUDA; bf16 (.pt, OpenVINO) on CPUs with native bf16
    dnn: bool = False  # run .onnx weights with OpenCV's DNN module instead of ONNX Runtime
    vid_stride: int = 1
    tile: int = 0  # > 0: predict each whole image in overlapping tiles of this many px (small objects); 0 = off
    tile_overlap: float = 0.2  # overlap of neighbouring tiles, as a fraction of the tile, in [0, 1)
    tile_full: bool = False  # with tiles: also predict on the whole downscaled image (objects larger than a tile)
    tile_merge: Literal["nms", "nmm"] = "nms"  # joining tiles: keep the best of matching boxes, or merge into unions
    tile_match: Literal["iou", "ios"] = "ios"  # boxes match by IoU or by intersection over the smaller box's area
    tile_match_thres: float = 0.5  # boxes of one class match above this IoU/IoS


@dataclass(frozen=True)
class ExportConfig:
    """Options of ``export.py``."""

    weights: str = ""
    imgsz: tuple[int, ...] = (640, 640)
    batch_size: int = 1
    device: str = "cpu"
    half: bool = False
    dynamic: bool = False  # dynamic batch/height/width axes (ONNX, TensorRT profiles)
    simplify: bool = False  # simplify the ONNX graph with onnxslim
    opset: int = 17
    workspace: float = 4.0  # TensorRT workspace in GiB
    nms: bool = False  # put NMS inside the exported graph
    agnostic_nms: bool = False
    topk_per_class: int = 100
    topk_all: int = 100
    iou_thres: float = 0.45
    conf_thres: float = 0.25
    include: tuple[str, ...] = ("torchscript", "onnx")
    optimize: bool = False  # TorchScript: optimise for mobile (CPU only, needs a PyTorch build with XNNPACK)
    int8: bool = False  # ONNX (ONNX Runtime) / OpenVINO (NNCF): int8 trunk, decode in float; calibrated on --data
    data: str = ""  # dataset YAML: val images for the export checks and --int8 calibration ("" = synthetic/built-in)
    inplace: bool = False  # accepted for YOLOv5 compatibility; no effect (the export head never writes in place)
    project: str = "runs/export"
    name: str = "exp"
    exist_ok: bool = False


@dataclass(frozen=True)
class BenchmarkConfig:
    """Options of ``detector benchmarks`` (YOLOv5's benchmarks.py): each format exported, validated and timed."""

    weights: str = ""  # the .pt to export (ours or YOLOv5's)
    data: str = ""  # dataset YAML to validate on ("" = the built-in dataset)
    imgsz: int = 640
    batch_size: int = 1  # exports' batch and validation batches: 1 times latency, larger batches throughput
    device: str = "cpu"
    half: bool = False  # fp16 exports, validated with val.py's --half (the .pt reference in fp32)
    int8: bool = False  # int8 exports where the format has them (ONNX Runtime, OpenVINO), calibrated on --data
    include: tuple[str, ...] = ("torchscript", "onnx", "openvino")
    hard_fail: bool = False  # stop at the first format that fails (default: its row says why, the others go on)
    project: str = "runs/benchmarks"
    name: str = "exp"
    exist_ok: bool = False


# --------------------------------------------------------------------------------------------------------------------
# Loading and merging


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (plain PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first on line {first_line[key]})", key_node.start_mark
                    )
                first_line[key] = line
            except TypeError:  # an unhashable key: the base class says so
                break
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a one-line error naming the file when it is missing or malformed (a key given
    twice included)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_UniqueKeyLoader)  # a SafeLoader: no Python objects
    except UnicodeDecodeError as e:
        byte = f"byte {e.start} is {e.object[e.start]:#04x}"
        raise ConfigError(f"{path}: not a YAML file (not UTF-8 text: {byte})") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def build_config(cls: type[T], *layers: tuple[str, Mapping[str, Any]]) -> T:
    """Defaults of ``cls`` overridden by each ``(source, mapping)`` layer in turn.

    ``source`` names where a layer came from (a file path, "command line") and appears in every error.
    Nested dataclass fields take a nested mapping (``{"hyp": {"lr0": 0.02}}``) or dotted keys (``"hyp.lr0"``).
    """
    config = cls()
    for source, values in layers:
        config = _apply(config, values, source, prefix="")
    return config


def _apply(config: T, values: Mapping[str, Any], source: str, prefix: str) -> T:
    hints = typing.get_type_hints(type(config))
    names = [f.name for f in dataclasses.fields(config)]
    changes: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(f"{source}: unknown key '{prefix}{head}'{_suggest(head, names, prefix)}")
        if rest:
            nested.setdefault(head, {})[rest] = value
        elif dataclasses.is_dataclass(hints[head]):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: key '{prefix}{head}' expects a mapping, got {value!r}")
            nested.setdefault(head, {}).update(value)
        else:
            changes[head] = coerce(value, hints[head], f"{source}: key '{prefix}{head}'")
    for head, sub in nested.items():
        changes[head] = _apply(getattr(config, head), sub, source, prefix=f"{prefix}{head}.")
    return dataclasses.replace(config, **changes)


def _suggest(key: str, names: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    return f"{hint} (valid keys: {', '.join(names)})"


_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no"}


def coerce(value: Any, type_: Any, where: str) -> Any:
    """Convert ``value`` to ``type_`` (a resolved type hint) or raise ConfigError naming ``where``."""
    origin = typing.get_origin(type_)
    args = typing.get_args(type_)
    if origin in (Union, types.UnionType):
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return coerce(value, option, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[-1] if errors else f"{where} cannot be {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        item_type = args[0] if args else Any
        items = value if isinstance(value, (list, tuple)) else [value]
        if isinstance(value, str) and ("," in value or " " in value.strip()):
            items = [v for v in value.replace(",", " ").split() if v]
        return origin(coerce(v, item_type, where) for v in items)
    if type_ is Any:
        return value
    if type_ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{where} expects true/false/1/0, got {value!r}")
    if type_ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where} expects an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{where} expects an integer, got {value!r}") from None
    if type_ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where} expects a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where} expects a number, got {value!r}") from None
    if type_ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where} expects a string, got {value!r}")
    raise TypeError(f"unsupported config field type {type_!r} at {where}")  # a bug in this module, not user input


def load_hyp(path: str | Path) -> Hyperparameters:
    """Hyperparameters from a YAML file (a name in configs/hyps or a path), strictly checked."""
    return build_config(Hyperparameters, (str(path), load_yaml(resolve_config_path(path, HYP_CONFIG_DIR))))


def resolve_config_path(name: str | Path, folder: Path) -> Path:
    """A path as given if it exists, else the file of that name in ``folder`` (e.g. configs/models/yolov5s.yaml), as
    YOLOv5's ``data/hyps/hyp.scratch-low.yaml`` finds ours. A path to a folder is refused, not taken for the shipped
    YAML of its name (a dataset folder ``~/data/VOC`` would have started data/VOC.yaml's download); a bare name
    (``coco128``) still means the shipped file when a folder of that name lies in the working directory."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = next((c for c in (folder / path.name, folder / f"{path.name}.yaml") if c.is_file()), None)
    if path.is_dir() and (shipped is None or any(sep in str(name) for sep in ("/", os.sep))):
        raise ConfigError(f"{name}: a folder, not a YAML file (a path to one, or a name in {folder})")
    if shipped is not None:
        return shipped
    known = sorted(p.name for p in folder.glob("*.yaml")) if folder.is_dir() else []
    hint = difflib.get_close_matches(path.name, known, n=1)
    suggestion = f"; did you mean '{hint[0]}'?" if hint else ""
    raise ConfigError(f"{name}: file not found (nor in {folder}){suggestion}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML- and checkpoint-safe dict of a config (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as YAML (the resolved options of a run, saved in its folder)."""
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(config_to_dict(config), f, sort_keys=False)


# --------------------------------------------------------------------------------------------------------------------
# train.py's options -> one TrainConfig: defaults <- built-in recipe <- --config <- --hyp <- flags, and --resume

# Options that may differ from the saved run when resuming; anything else would silently change the experiment.
# How the run computes may change too: the same training either way (--grad-checkpoint after running out of memory).
SAFE_RESUME_KEYS = (
    "workers",
    "device",
    "batch_size",
    "epochs",
    "patience",
    "cache_dir",
    "time",
    "logger",
    "ndjson_console",
    "ndjson_file",
    "channels_last",
    "compile",
    "grad_checkpoint",
)
# Where to look for the run (bare --resume searches --project); the run itself stays in its own folder.
RESUME_LOCATION_KEYS = ("project", "name", "exist_ok")


def resolve_train_config(flags: Mapping[str, Any], source: str = "command line") -> TrainConfig:
    """Every layer of train.py's options merged into one TrainConfig, in this order (later wins):

    1. the dataclass defaults;
    2. the built-in dataset's recipe (configs/builtin.yaml), only when training on the built-in dataset;
    3. ``flags["config"]``: a TrainConfig YAML;
    4. ``flags["hyp"]``: a hyp YAML name/path, a mapping or a Hyperparameters, into ``hyp``;
    5. the other ``flags`` (TrainConfig keys, dotted keys such as ``schedule.t0`` for nested ones).

    With ``resume`` set, the run's saved config replaces layers 1-2, only :data:`SAFE_RESUME_KEYS` may differ from
    it, and a run that already finished its epochs is refused in one line saying how to extend it. ``cos_lr`` is
    YOLOv5's alias of ``lr_schedule: cosine``. Nothing is read but YAML files and, for --resume, the checkpoint.
    """
    layers = _train_config_layers(flags, source)
    config = build_config(TrainConfig, *_sizes_together(layers))
    if config.resume:
        config = _resume_train_config(config, layers)
    elif is_builtin_data(config.data):
        recipe = (str(BUILTIN_TRAIN_CONFIG), load_yaml(BUILTIN_TRAIN_CONFIG))
        config = build_config(TrainConfig, *_sizes_together([recipe, *layers]))
    return apply_aliases(config)


def _sizes_together(layers: list[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, Mapping[str, Any]]]:
    """The layers, each less its ``val_imgsz`` when a later layer sets ``imgsz`` and none sets ``val_imgsz``: a
    layer's pair of sizes (the built-in recipe trains at 256 and validates at 320) goes together, so ``--img 640``
    over ``--config configs/builtin.yaml`` trains and validates at 640, as ``--img`` alone does in YOLOv5."""
    result = []
    for index, (source, values) in enumerate(layers):
        later = _given_keys(layers[index + 1 :])
        if "imgsz" in later and "val_imgsz" not in later:
            values = {key: value for key, value in values.items() if _key_name(key) != "val_imgsz"}
        result.append((source, values))
    return result


def _given_keys(layers: list[tuple[str, Mapping[str, Any]]]) -> set[str]:
    """The top-level TrainConfig keys the layers set (``hyp.lr0`` counts as ``hyp``; dashes as underscores)."""
    return {_key_name(key) for _, values in layers for key in values}


def _key_name(key: object) -> str:
    """A layer's key as the TrainConfig field it sets: dashes as underscores, ``hyp.lr0`` as ``hyp``."""
    return str(key).replace("-", "_").split(".")[0]


def apply_aliases(config: TrainConfig) -> TrainConfig:
    """YOLOv5's flags that name a key living elsewhere here, moved to that key: ``cos_lr`` -> ``lr_schedule:
    cosine``, ``label_smoothing`` -> ``hyp.label_smoothing`` (the top-level key wins when > 0, as a flag does),
    ``ndjson_console`` / ``ndjson_file`` -> ``logger`` entries ``ndjson-console`` / ``ndjson``.
    Idempotent; the Trainer applies it too, so a TrainConfig built by hand behaves as one from train.py."""
    if config.cos_lr and config.lr_schedule != "cosine":
        if config.lr_schedule != "linear":
            raise ConfigError(
                f"--cos-lr is an alias of --lr-schedule cosine; it contradicts --lr-schedule {config.lr_schedule}"
            )
        config = dataclasses.replace(config, lr_schedule="cosine")
    if config.label_smoothing:
        hyp = dataclasses.replace(config.hyp, label_smoothing=config.label_smoothing)
        config = dataclasses.replace(config, label_smoothing=0.0, hyp=hyp)
    if config.ndjson_console or config.ndjson_file:
        ndjson = ("ndjson-console",) * config.ndjson_console + ("ndjson",) * config.ndjson_file
        logger = tuple(dict.fromkeys((*config.logger, *ndjson)))
        config = dataclasses.replace(config, logger=logger, ndjson_console=False, ndjson_file=False)
    return config


def is_builtin_data(data: str) -> bool:
    """Whether ``--data`` names the built-in synthetic dataset ("" or "builtin")."""
    return data in ("", "builtin")


def _train_config_layers(flags: Mapping[str, Any], source: str) -> list[tuple[str, Mapping[str, Any]]]:
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


def _refuse_yolov5_resume(path: Path) -> None:
    """A YOLOv5 training checkpoint given to --resume: say what it is and how to train from its weights instead."""
    from detector.models.yolov5_import import read_yolov5_checkpoint  # lazy import: torch

    try:
        read_yolov5_checkpoint(path)
    except CheckpointError:
        return  # not YOLOv5's either: load_checkpoint's message stands
    raise CheckpointError(
        f"--resume {path}: a YOLOv5 checkpoint; --resume continues runs of this trainer only. To train from its "
        f"weights: python train.py --weights {path} --data <your data YAML>"
    )


def _resume_train_config(given: TrainConfig, layers: list[tuple[str, Mapping[str, Any]]]) -> TrainConfig:
    from detector.utils.checkpoint import load_checkpoint  # lazy import: torch only when resuming

    path = resume_checkpoint_path(given.resume, given.project)
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError:
        _refuse_yolov5_resume(path)
        raise
    saved_dict = checkpoint.get("train_config")
    if not isinstance(saved_dict, dict):
        raise CheckpointError(f"{path}: holds no training state (train_config); use --weights {path} to fine-tune")
    saved_dict = {k: v for k, v in saved_dict.items() if k != "resume"}
    saved = build_config(TrainConfig, (str(path), saved_dict))
    merged = build_config(TrainConfig, (str(path), saved_dict), *layers)
    given_keys = _given_keys(layers)
    for key in sorted(given_keys - set(SAFE_RESUME_KEYS) - set(RESUME_LOCATION_KEYS) - {"resume"}):
        if getattr(merged, key) != getattr(saved, key):
            raise ConfigError(
                f"--{key.replace('_', '-')} cannot change when resuming {path} (the run used {getattr(saved, key)!r}); "
                f"only {', '.join('--' + k.replace('_', '-') for k in SAFE_RESUME_KEYS)} may be given"
            )
    done = int(checkpoint.get("epoch", -1)) + 1
    fitted = int(checkpoint.get("epochs", merged.epochs))
    if merged.time > 0 and merged.time == saved.time and done >= fitted:
        raise ConfigError(
            f"{path}: this run has finished ({done} epochs fitted to --time {merged.time:g}); to train it longer pass "
            f"a longer budget, e.g. python train.py --resume {path} --time {2 * merged.time:g}"
        )
    if done >= merged.epochs:
        raise ConfigError(
            f"{path}: this run has finished ({done} of {merged.epochs} epochs); to train it longer pass more epochs, "
            f"e.g. python train.py --resume {path} --epochs {done + merged.epochs}"
        )
    location = {key: getattr(saved, key) for key in RESUME_LOCATION_KEYS}
    return dataclasses.replace(merged, resume=str(path), **location)


_PROBABILITY_KEYS = (
    "flipud",
    "fliplr",
    "mosaic",
    "mosaic9",
    "mixup",
    "copy_paste",
    "cutout",
    "cutmix",
    "gridmask",
    "min_visibility",
    "albumentations",
)


# The largest --seed: NumPy takes unsigned 32-bit seeds, and each rank seeds with seed + 1 + rank.
MAX_SEED = 2**31 - 1


def check_train_config(config: TrainConfig) -> None:
    """One-line ConfigError for options that cannot work, before a run writes anything."""
    positive = {"epochs": config.epochs, "nbs": config.nbs, "imgsz": config.imgsz}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"--{key}: expected a positive number, got {value}")
    if config.val_imgsz < 0:
        raise ConfigError(f"--val-imgsz: expected a positive number, or 0 for --imgsz's; got {config.val_imgsz}")
    if config.batch_size < 1 and config.batch_size != -1:
        raise ConfigError(
            f"--batch-size: expected a positive number of images, or -1 for AutoBatch; got {config.batch_size}"
        )
    for key in ("workers", "patience"):
        if getattr(config, key) < 0:
            raise ConfigError(f"--{key}: expected 0 or more, got {getattr(config, key)}")
    if any(index < 0 for index in config.freeze):
        raise ConfigError(f"--freeze: expected layer counts or indices >= 0, got {list(config.freeze)}")
    for smoothing in (config.label_smoothing, config.hyp.label_smoothing):
        if not 0.0 <= smoothing < 1.0:
            raise ConfigError(f"--label-smoothing (hyp label_smoothing): expected a value in [0, 1), got {smoothing}")
    for key in ("clip_grad", "clip_value", "sam", "sparsity"):
        if getattr(config, key) < 0:
            raise ConfigError(f"--{key.replace('_', '-')}: expected 0 (off) or more, got {getattr(config, key)}")
    if config.sam_adaptive and config.sam == 0:
        raise ConfigError("--sam-adaptive scales SAM's perturbation; it needs --sam RHO > 0 (ASAM: e.g. --sam 0.5)")
    if config.val_period < 1:
        raise ConfigError(f"--val-period: expected 1 (every epoch) or more, got {config.val_period}")
    if not 0 <= config.seed <= MAX_SEED:
        raise ConfigError(f"--seed: expected 0 to {MAX_SEED} (NumPy's seeds are unsigned 32-bit), got {config.seed}")
    if config.lr_schedule == "plateau" and config.noval:
        raise ConfigError(
            "--lr-schedule plateau reacts to the validation fitness of every epoch; it cannot run with --noval"
        )
    hyp = config.hyp
    for key in _PROBABILITY_KEYS:
        if not 0.0 <= getattr(hyp, key) <= 1.0:
            raise ConfigError(f"hyp.{key}: a probability, expected a value in [0, 1], got {getattr(hyp, key)}")
    if hyp.lr0 <= 0 or not 0.0 < hyp.lrf <= 1.0:
        raise ConfigError(f"hyp.lr0 must be positive and hyp.lrf in (0, 1]; got lr0 {hyp.lr0}, lrf {hyp.lrf}")
    if hyp.warmup_epochs < 0:
        raise ConfigError(f"hyp.warmup_epochs: expected 0 or more, got {hyp.warmup_epochs}")
    for key in ("drop_path", "dropout"):
        if not 0.0 <= getattr(hyp, key) < 1.0:
            raise ConfigError(f"hyp.{key}: a probability, expected a value in [0, 1), got {getattr(hyp, key)}")
    if not 0.0 <= hyp.ema_decay < 1.0 or hyp.ema_tau <= 0:
        raise ConfigError(
            f"hyp.ema_decay must be in [0, 1) (0 = no averaging) and hyp.ema_tau positive; got {hyp.ema_decay}, "
            f"{hyp.ema_tau}"
        )
    check_fitness_weights(config.fitness_weights)
    if config.repeat_aug < 1 or config.close_mosaic < 0 or config.time < 0:
        raise ConfigError(
            f"--repeat-aug must be 1 or more, --close-mosaic and --time 0 or more; got {config.repeat_aug}, "
            f"{config.close_mosaic}, {config.time}"
        )
    if config.repeat_aug > config.batch_size > 0:
        raise ConfigError(
            f"--repeat-aug {config.repeat_aug}: each batch must hold every repeat; use --batch-size "
            f">= {config.repeat_aug} (got {config.batch_size})"
        )
    if config.auto_augment:
        from detector.data.policies import check_auto_augment  # the policy names live with the policies

        check_auto_augment(config.auto_augment)
    if not 0.0 <= config.class_balanced <= 1.0:
        raise ConfigError(f"--class-balanced: a fraction of the images in [0, 1], got {config.class_balanced}")
    if config.class_balanced and (config.image_weights or config.rect):
        other = "--image-weights" if config.image_weights else "--rect (its batches follow the image order)"
        raise ConfigError(f"--class-balanced chooses which images are drawn; it cannot be combined with {other}")
    if config.image_weights and config.rect:
        raise ConfigError(
            "--image-weights draws images at random; it cannot be combined with --rect (its batches are images of "
            "one shape, in order)"
        )
    if config.train_tile < 0:
        raise ConfigError(f"--train-tile: expected a tile size in pixels (0 = whole images), got {config.train_tile}")
    if config.train_tile and config.rect:
        raise ConfigError("--train-tile cuts square tiles; it cannot be combined with --rect (whole-image shapes)")
    if config.augment_on_device and config.quad:
        raise ConfigError(
            "--augment-on-device recolours and flips each batch after collation, where --quad has already merged 4 "
            "images into one (they would share one colour jitter and flip); use one of the two"
        )
    _check_teacher_options(config)
    _check_pseudo_options(config)


def _check_teacher_options(config: TrainConfig) -> None:
    """--teacher has two uses, each optional: labelling --unlabeled images, and distillation (hyp distill > 0)."""
    hyp = config.hyp
    if hyp.distill < 0 or hyp.distill_t <= 0:
        raise ConfigError(
            f"--distill (hyp.distill) must be 0 or more and hyp.distill_t positive; got {hyp.distill}, {hyp.distill_t}"
        )
    if config.teacher and not config.unlabeled and hyp.distill == 0:
        raise ConfigError(
            "--teacher labels the --unlabeled images or is distilled into the model (--distill GAIN > 0); pass "
            "--unlabeled DIR or --distill GAIN (or drop --teacher)"
        )
    if hyp.distill > 0 and not config.teacher:
        raise ConfigError(f"--distill {hyp.distill:g} distils a teacher model; pass --teacher WEIGHTS (or --distill 0)")
    if config.teacher and not Path(config.teacher).is_file() and not is_release_name(config.teacher):
        raise ConfigError(f"--teacher {config.teacher}: weights file not found")


def _check_pseudo_options(config: TrainConfig) -> None:
    """--unlabeled and its --pseudo-* options (--teacher: :func:`_check_teacher_options`)."""
    if not config.unlabeled:
        return
    if config.pseudo_every < 0 or not 0.0 <= config.pseudo_conf <= 1.0 or config.pseudo_weight < 0:
        raise ConfigError(
            f"--pseudo-every must be 0 or more, --pseudo-conf in [0, 1] and --pseudo-weight 0 or more; got "
            f"{config.pseudo_every}, {config.pseudo_conf}, {config.pseudo_weight}"
        )
    if config.pseudo_every == 0 and not config.teacher:
        raise ConfigError("--pseudo-every 0 labels the --unlabeled images once at the start, which needs --teacher")
    for flag, on in (("--rect", config.rect), ("--image-weights", config.image_weights)):
        if on:
            raise ConfigError(f"--unlabeled cannot be combined with {flag} (it decides which images an epoch draws)")
    if config.class_balanced:
        raise ConfigError("--unlabeled cannot be combined with --class-balanced (it decides which images are drawn)")


def check_fitness_weights(weights: tuple[float, ...]) -> None:
    """--fitness-weights: four weights >= 0 (P, R, mAP50, mAP50-95), not all zero."""
    if len(weights) != 4 or any(w < 0 for w in weights) or not any(weights):
        raise ConfigError(
            f"--fitness-weights: expected 4 weights >= 0, not all zero, for P R mAP50 mAP50-95; got {list(weights)}"
        )


def check_evolve_config(config: EvolveConfig) -> None:
    """One-line ConfigError for evolution options that cannot work, before anything is written."""
    if config.trials < 1:
        raise ConfigError(f"--evolve: expected a positive number of trials, got {config.trials}")
    if config.population < 2:
        raise ConfigError(f"--evolve-population: expected 2 or more, got {config.population}")
    if config.grace_period < 1 or config.reduction_factor < 2:
        raise ConfigError(
            f"--asha-grace-period must be >= 1 and --asha-reduction-factor >= 2; got {config.grace_period}, "
            f"{config.reduction_factor}"
        )
    if config.concurrency < 0:
        raise ConfigError(f"--evolve-concurrency: expected 0 (as resources allow) or more, got {config.concurrency}")
    if config.backend == "local":
        ray_only = {
            "--evolve-search": (config.search, "ga"),
            "--evolve-scheduler": (config.scheduler, "fifo"),
            "--ray-address": (config.ray_address, ""),
            "--trial-resources": (config.trial_resources, ""),
            "--evolve-concurrency": (config.concurrency, 0),
        }
        for flag, (value, default) in ray_only.items():
            if value != default:
                raise ConfigError(f"{flag} {value} needs --evolve-backend ray (local trials run one by one)")
