"""``train.py``: YOLOv5's training flags -> TrainConfig -> Trainer (or a self-launched DDP group).

Values merge as defaults <- ``--config`` YAML <- ``--hyp`` YAML (into ``hyp``) <- flags typed here; with
``--resume`` the run's saved config replaces the defaults and only the flags in
:data:`detector.config.SAFE_RESUME_KEYS` may change (see :func:`detector.config.resolve_train_config`).
"""

from __future__ import annotations

import argparse
import os
import sys
import typing
from collections.abc import Sequence
from typing import get_args

from detector.cli.common import CACHE_DIR_HELP, given_flags, new_parser, run_cli
from detector.config import (
    BUILTIN_TRAIN_CONFIG,
    EvolveConfig,
    LRFindConfig,
    TrainConfig,
    build_config,
    load_yaml,
    resolve_train_config,
)
from detector.errors import ConfigError
from detector.utils.torch_utils import device_ids

DESCRIPTION = """Train a detector on a dataset YAML (or the built-in dataset), YOLOv5's flags.

examples:
  python train.py                                              # yolov5n on the built-in dataset, CPU-friendly
  python train.py --data coco128.yaml --weights yolov5n.pt --img 320 --epochs 3    # fine-tune
  python train.py --data my.yaml --cfg yolov5s.yaml --epochs 100 --batch-size 32  # from scratch
  python train.py --resume                                     # continue the latest run (or --resume path/last.pt)
  python train.py --resume runs/train/exp/weights/last.pt --epochs 200             # extend a finished run
  python train.py --evolve 300 --data my.yaml --epochs 10      # evolve the hyperparameters (runs/evolve/exp)
  python train.py --evolve 300 --resume-evolve runs/evolve/exp # continue an interrupted evolution
  python train.py --evolve 64 --evolve-backend ray --ray-address auto --trial-resources cpu=4,gpu=1  # on Ray
  torchrun --nproc_per_node 2 train.py --device 0,1 ...       # DDP (train.py --device 0,1 launches it itself)
  torchrun --nnodes 2 --node_rank 0 --master_addr HOST --master_port 29500 --nproc_per_node 8 train.py ...
"""

DEFAULTS = TrainConfig()
EVOLVE_DEFAULTS = EvolveConfig()
LR_FIND_DEFAULTS = LRFindConfig()
# --lr-find-* flags -> LRFindConfig fields
LR_FIND_FLAGS = {"lr_find_iters": "iterations", "lr_find_min": "min_lr", "lr_find_max": "max_lr"}
BUILTIN_RECIPE = load_yaml(BUILTIN_TRAIN_CONFIG)  # what the built-in dataset uses instead of DEFAULTS


def _default(name: str) -> str:
    value = getattr(DEFAULTS, name)
    shown = repr(value) if not isinstance(value, tuple) else " ".join(map(str, value))
    if name in BUILTIN_RECIPE:
        return f" (default: {shown}; on the built-in dataset {BUILTIN_RECIPE[name]!r}, from configs/builtin.yaml)"
    return f" (default: {shown})"


def _schedule_default(name: str) -> str:
    return f" (default: {getattr(DEFAULTS.schedule, name)!r}; more in configs/default.yaml's schedule)"


def build_parser() -> argparse.ArgumentParser:
    """The train.py parser: every flag shows its default; absent flags do not override the config."""
    parser = new_parser("train.py", DESCRIPTION)
    add = parser.add_argument
    add(
        "--weights",
        type=str,
        help="initial weights: our .pt or a YOLOv5 release .pt; '' = from scratch" + _default("weights"),
    )
    add(
        "--cfg",
        type=str,
        help="model YAML (name in configs/models or a path); '' = from --weights, else yolov5n.yaml" + _default("cfg"),
    )
    add("--data", type=str, help="dataset YAML; '' = the built-in synthetic dataset" + _default("data"))
    add(
        "--hyp",
        type=str,
        help="hyperparameter YAML (name in configs/hyps or a path) (default: built-in hyp.scratch-low values)",
    )
    add(
        "--config",
        type=str,
        help="TrainConfig YAML with any of these options (see configs/default.yaml) (default: none)",
    )
    add("--epochs", type=int, help="epochs to train" + _default("epochs"))
    add(
        "--batch-size",
        type=int,
        dest="batch_size",
        help="total batch size over all DDP processes; -1 = AutoBatch (CUDA: ~80%% of the GPU memory)"
        + _default("batch_size"),
    )
    add(
        "--imgsz",
        "--img",
        "--img-size",
        type=int,
        dest="imgsz",
        help="train/val image size in pixels" + _default("imgsz"),
    )
    add(
        "--val-imgsz",
        "--val-img",
        type=int,
        dest="val_imgsz",
        help="validate, pick best.pt and make --unlabeled's pseudo-labels at this size instead of --imgsz (FixRes: a "
        "model often tests best above its training size); 0 = --imgsz" + _default("val_imgsz"),
    )
    add("--rect", action="store_true", help="rectangular training batches (no mosaic) (default: False)")
    add("--resume", nargs="?", const="auto", type=str, help="resume the latest run, or the given last.pt (default: no)")
    add("--nosave", action="store_true", help="only save the final checkpoint (default: False)")
    add("--noval", action="store_true", help="only validate after the final epoch (default: False)")
    add(
        "--val-period",
        type=int,
        dest="val_period",
        help="validate every N epochs, and always the last (early stopping then counts from validated epochs)"
        + _default("val_period"),
    )
    add("--noautoanchor", action="store_true", help="skip the AutoAnchor check (default: False)")
    add("--noplots", action="store_true", help="save no plot files (default: False)")
    add(
        "--cache",
        nargs="?",
        const="ram",
        choices=["ram", "disk"],
        help="cache images in 'ram' (bare --cache) or on 'disk' (default: no cache)",
    )
    add(
        "--cache-dir",
        type=str,
        dest="cache_dir",
        help=CACHE_DIR_HELP + _default("cache_dir"),
    )
    add(
        "--image-weights",
        action="store_true",
        dest="image_weights",
        help="weighted image sampling by per-class mAP (default: False)",
    )
    add(
        "--class-balanced",
        nargs="?",
        const=0.1,
        type=float,
        dest="class_balanced",
        metavar="T",
        help="repeat-factor sampling (LVIS): images of classes found in fewer than a fraction T of the images are "
        "drawn sqrt(T / fraction) times as often (bare flag: T 0.1) (default: off)",
    )
    add("--device", type=str, help="cuda device, i.e. 0 or 0,1,2,3 or cpu; '' = CUDA 0 if present" + _default("device"))
    add(
        "--multi-scale",
        action="store_true",
        dest="multi_scale",
        help="vary image size +/- 50%% per batch (default: False)",
    )
    add(
        "--single-cls",
        action="store_true",
        dest="single_cls",
        help="train multi-class data as single-class (default: False)",
    )
    add("--optimizer", choices=_choices("optimizer"), help="optimizer" + _default("optimizer"))
    add(
        "--sparsity",
        type=float,
        metavar="LAMBDA",
        help="network slimming: L1 penalty LAMBDA x sum |gamma| on every BatchNorm scale (e.g. 1e-4, decaying to a "
        "tenth by the last epoch), so that python -m detector.prune can then remove channels (default: 0 = off)",
    )
    add(
        "--clip-grad",
        type=float,
        dest="clip_grad",
        metavar="NORM",
        help="clip the gradients' total L2 norm to NORM before each optimizer step; 0 = off" + _default("clip_grad"),
    )
    add(
        "--clip-value",
        type=float,
        dest="clip_value",
        metavar="V",
        help="clip each gradient element to [-V, V] before each optimizer step (before --clip-grad); 0 = off"
        + _default("clip_value"),
    )
    add(
        "--sam",
        type=float,
        metavar="RHO",
        help="sharpness-aware minimisation (SAM) with neighbourhood radius RHO (typical 0.05) around the optimizer: "
        "two forward/backward passes per batch, the second at the perturbed weights; 0 = off" + _default("sam"),
    )
    add(
        "--sam-adaptive",
        action="store_true",
        dest="sam_adaptive",
        help="ASAM: SAM's perturbation scaled by |w|; use a ~10x larger --sam, e.g. 0.5 (default: False)",
    )
    add("--sync-bn", action="store_true", dest="sync_bn", help="SyncBatchNorm, DDP on CUDA only (default: False)")
    add(
        "--norm",
        metavar="{bn,ghost,brn,cbn}",
        help="normalisation for small per-GPU batches: ghost (Ghost BatchNorm), brn (Batch Renormalization), cbn "
        "(Cross-Iteration BatchNorm); plain BatchNorm in eval and export; options in configs/default.yaml's "
        "norm_options; bn = the model YAML's 'norm' key, else BatchNorm" + _default("norm"),
    )
    add(
        "--virtual-batch-size",
        type=int,
        dest="norm_options.virtual_batch_size",
        metavar="N",
        help=f"--norm ghost: images per virtual batch (default: {DEFAULTS.norm_options.virtual_batch_size})",
    )
    add(
        "--acnet",
        action="store_true",
        help="ACNet: 1x3 and 3x1 conv+BN branches beside every 3x3 Conv in training, folded into the 3x3 conv for "
        "val, detect and export (default: False)",
    )
    add(
        "--workers", type=int, help="max dataloader workers per DDP process (capped by CPU count)" + _default("workers")
    )
    add("--project", type=str, help="save to project/name" + _default("project"))
    add("--name", type=str, help="save to project/name" + _default("name"))
    add(
        "--exist-ok",
        action="store_true",
        dest="exist_ok",
        help="existing project/name ok, do not increment (default: False)",
    )
    add("--quad", action="store_true", help="quad dataloader (default: False)")
    add("--cos-lr", action="store_true", dest="cos_lr", help="alias of --lr-schedule cosine (default: False)")
    add(
        "--lr-schedule",
        dest="lr_schedule",
        metavar="{linear,cosine,onecycle,cosine-restarts,plateau}",
        help="learning rate per iteration: YOLOv5's linear or cosine decay to lrf, onecycle (Smith's 1cycle with "
        "momentum cycling), cosine-restarts (SGDR), plateau (cut on a stalled validation fitness), or a schedule "
        "registered in detector.engine.schedules" + _default("lr_schedule"),
    )
    add(
        "--t0",
        type=float,
        dest="schedule.t0",
        help="cosine-restarts: epochs of the first cycle (SGDR's T_0)" + _schedule_default("t0"),
    )
    add(
        "--t-mult",
        type=int,
        dest="schedule.t_mult",
        help="cosine-restarts: each cycle this many times longer than the last (T_mult)" + _schedule_default("t_mult"),
    )
    add(
        "--onecycle-pct",
        type=float,
        dest="schedule.onecycle_pct",
        help="onecycle: fraction of training spent raising the rate" + _schedule_default("onecycle_pct"),
    )
    add(
        "--plateau-patience",
        type=int,
        dest="schedule.plateau_patience",
        help="plateau: epochs without improvement before the rate is cut" + _schedule_default("plateau_patience"),
    )
    add(
        "--plateau-factor",
        type=float,
        dest="schedule.plateau_factor",
        help="plateau: rate multiplier at each cut" + _schedule_default("plateau_factor"),
    )
    add(
        "--plateau-cooldown",
        type=int,
        dest="schedule.plateau_cooldown",
        help="plateau: epochs of rest after a cut" + _schedule_default("plateau_cooldown"),
    )
    add(
        "--label-smoothing",
        type=float,
        dest="label_smoothing",
        help="label smoothing epsilon: class targets 1 - eps/2 and eps/2; sets hyp label_smoothing, which a --hyp "
        "file may set instead" + _default("label_smoothing"),
    )
    add(
        "--patience",
        type=int,
        help="early stopping patience in epochs without improvement (0 = never)" + _default("patience"),
    )
    add(
        "--freeze",
        nargs="+",
        type=int,
        help="freeze the first N layers (one number) or the listed layer indices (default: 0)",
    )
    add(
        "--save-period",
        type=int,
        dest="save_period",
        help="also save a checkpoint every N epochs (-1 = never)" + _default("save_period"),
    )
    add("--seed", type=int, help="global training seed" + _default("seed"))
    add(
        "--local_rank",
        "--local-rank",
        type=int,
        dest="local_rank",
        help="set by torch.distributed.launch; prefer torchrun (default: -1)",
    )
    add(
        "--class-weights",
        action="store_true",
        dest="class_weights",
        help="weight the class loss by inverse class frequency (default: False)",
    )
    add(
        "--deterministic",
        action="store_true",
        help="deterministic algorithms: bit-exact repeatable runs, slower (default: False)",
    )
    add(
        "--amp",
        choices=_choices("amp"),
        help="mixed precision, used when its check passes: auto = fp16 on CUDA, bf16 on CPUs with native bfloat16 "
        "(AVX512-BF16 or AMX), else fp32; bf16 also forces it" + _default("amp"),
    )
    add(
        "--channels-last",
        nargs="?",
        const="on",
        choices=_choices("channels_last"),
        dest="channels_last",
        help="NHWC (channels_last) memory format for the model and batches: on (bare flag), off (NCHW), or auto = "
        "on for the CPU, off for CUDA" + _default("channels_last"),
    )
    add(
        "--compile",
        action="store_true",
        help="torch.compile the training model (inductor): minutes of compiling at start-up, then faster steps; "
        "where it cannot work, training runs uncompiled after a one-line warning (default: False)",
    )
    add(
        "--grad-checkpoint",
        action="store_true",
        dest="grad_checkpoint",
        help="activation checkpointing: the backbone and neck recompute their activations in backward, for less "
        "memory (a bigger --batch-size or --img) at about a third more compute; same gradients (default: False)",
    )
    add(
        "--fitness-weights",
        nargs=4,
        type=float,
        dest="fitness_weights",
        metavar=("P", "R", "MAP50", "MAP50-95"),
        help="fitness = these weights x (precision, recall, mAP50, mAP50-95); picks best.pt and, with --evolve, the "
        "best trial (default: 0 0 0.1 0.9, YOLOv5's)",
    )
    add(
        "--auto-augment",
        type=str,
        dest="auto_augment",
        metavar="POLICY",
        help="automatic augmentation policy, boxes moved with the image: trivial (TrivialAugment-Wide), "
        "randaugment (N 2 ops at magnitude M 9; randaugment-n3-m12 sets them), detection-v0 (Zoph et al. 2019's "
        "learned detection policy) (default: none)",
    )
    add(
        "--repeat-aug",
        type=int,
        dest="repeat_aug",
        metavar="K",
        help="repeated augmentation: each drawn image appears K times in its batch, each differently augmented; "
        "an epoch still holds as many images as the dataset" + _default("repeat_aug"),
    )
    add(
        "--close-mosaic",
        type=int,
        dest="close_mosaic",
        metavar="N",
        help="the last N epochs train without mosaic, mixup, CutMix, copy-paste, erasing and the auto-augment "
        "policy, and without --multi-scale: at the test resolution, --val-imgsz when set (FixRes)"
        + _default("close_mosaic"),
    )
    add(
        "--augment-on-device",
        action="store_true",
        dest="augment_on_device",
        help="apply the HSV colour jitter and the flips to each batch on the training device instead of per image "
        "in the loader workers, which then do less per image (a GPU waits less for them); mosaic, the affine warp "
        "and mixing stay in the workers. Not with --quad (default: False)",
    )
    add(
        "--time",
        type=float,
        metavar="MINUTES",
        help="train for this many minutes: after the first epoch the epochs that fit are estimated, and the LR "
        "schedule, warmup and --close-mosaic are fitted to them; --epochs becomes a cap (default: 0 = use --epochs)",
    )
    add(
        "--train-tile",
        type=int,
        dest="train_tile",
        metavar="SIZE",
        help="train on random SIZE x SIZE tiles cut from the images at their original resolution (80%% placed "
        "around an object), each augmented as an image at --img (usually --img SIZE); for large images with small "
        "objects; validation stays on whole images (default: 0 = whole images shrunk to --img)",
    )
    add(
        "--logger",
        type=str,
        metavar="NAMES",
        help="experiment trackers, comma-separated: tensorboard, mlflow, wandb (mlflow and wandb: pip install "
        "'detector[tracking]'), or a tracker registered in detector.engine.trackers.LOGGERS; '' = none; the console, "
        "results.csv and plots are always on" + _default("logger"),
    )
    add(
        "--ndjson-console",
        action="store_true",
        dest="ndjson_console",
        help="print each epoch's results (results.csv's columns) as one JSON line on stdout; alias of adding "
        "'ndjson-console' to --logger (default: False)",
    )
    add(
        "--ndjson-file",
        action="store_true",
        dest="ndjson_file",
        help="append each epoch's results as one JSON line to results.ndjson in the run folder; alias of adding "
        "'ndjson' to --logger (default: False)",
    )
    _add_pseudo_label_flags(parser)
    _add_distillation_flags(parser)
    _add_lr_find_flags(parser)
    _add_evolve_flags(parser)
    return parser


def _add_pseudo_label_flags(parser: argparse.ArgumentParser) -> None:
    """Pseudo-labels for unlabelled images (detector.engine.pseudo)."""
    group = parser.add_argument_group(
        "pseudo-labels",
        "--unlabeled adds images without labels; a --teacher model and/or the run's own EMA model label them, and "
        "they train with the labelled images, their boxes at --pseudo-weight (run folder: pseudo_labels.npz)",
    )
    add = group.add_argument
    add(
        "--unlabeled",
        type=str,
        metavar="SOURCE",
        help="images without labels: a folder, a glob ('imgs/*.jpg') or a .txt list; they join the training set "
        "(never validation) once they have pseudo-labels (default: '' = none)",
    )
    add(
        "--pseudo-every",
        type=int,
        dest="pseudo_every",
        metavar="K",
        help="the run's EMA model relabels the --unlabeled images every K epochs, from epoch K (before that, "
        "without --teacher, epochs train on the labelled images only); 0 = only --teacher labels them, once"
        + _default("pseudo_every"),
    )
    add(
        "--pseudo-conf",
        type=float,
        dest="pseudo_conf",
        metavar="T",
        help="confidence threshold of pseudo-label boxes" + _default("pseudo_conf"),
    )
    add(
        "--pseudo-weight",
        type=float,
        dest="pseudo_weight",
        metavar="W",
        help="weight of a pseudo-label box in the box, class and objectness losses (labelled boxes: 1)"
        + _default("pseudo_weight"),
    )
    add(
        "--teacher",
        type=str,
        metavar="WEIGHTS",
        help="a trained model (our .pt or a YOLOv5 release .pt, same classes) that labels the --unlabeled images "
        "once before training, and/or is distilled into the model with --distill (default: '' = none; --unlabeled "
        "then has the run's EMA model label them, from epoch --pseudo-every)",
    )


def _add_distillation_flags(parser: argparse.ArgumentParser) -> None:
    """Knowledge distillation from --teacher (detector.models.distill)."""
    group = parser.add_argument_group(
        "distillation",
        "--teacher WEIGHTS --distill GAIN: the teacher (same classes, strides and anchors per cell) runs on every "
        "training batch and its objectness, classes and boxes become extra targets (the distill_loss column)",
    )
    group.add_argument(
        "--distill",
        type=float,
        dest="hyp.distill",
        metavar="GAIN",
        help="gain of the distill loss term: 1 weighs matching the teacher like matching the labels; the temperature "
        f"is hyp distill_t ({DEFAULTS.hyp.distill_t:g}) (default: {DEFAULTS.hyp.distill:g} = off; hyp distill)",
    )


def _add_lr_find_flags(parser: argparse.ArgumentParser) -> None:
    """The learning-rate range test: train.py --lr-find with the training flags above (detector.engine.lr_find)."""
    group = parser.add_argument_group(
        "learning-rate range test",
        "train.py --lr-find trains a throwaway model with the learning rate growing geometrically per optimizer step "
        "and writes lr_find.csv and lr_find.png (loss vs LR, the suggested lr0 marked) into the run folder; no "
        "checkpoint, no validation",
    )
    add = group.add_argument
    add(
        "--lr-find",
        action="store_true",
        dest="lr_find",
        help="run the LR range test (Smith 2017) instead of training; logs a suggested lr0 (default: False)",
    )
    add(
        "--lr-find-iters",
        type=int,
        dest="lr_find_iters",
        metavar="N",
        help="optimizer steps of the test; it stops earlier when the loss diverges "
        f"(default: {LR_FIND_DEFAULTS.iterations})",
    )
    add(
        "--lr-find-min",
        type=float,
        dest="lr_find_min",
        metavar="LR",
        help=f"learning rate of the first step (default: {LR_FIND_DEFAULTS.min_lr:g})",
    )
    add(
        "--lr-find-max",
        type=float,
        dest="lr_find_max",
        metavar="LR",
        help=f"learning rate of the last step (default: {LR_FIND_DEFAULTS.max_lr:g})",
    )


def _add_evolve_flags(parser: argparse.ArgumentParser) -> None:
    """Hyperparameter evolution: train.py --evolve N with the training flags above (detector.evolve)."""
    group = parser.add_argument_group(
        "hyperparameter evolution", "train.py --evolve [N] trains N trials of --epochs each, in runs/evolve/exp"
    )
    add = group.add_argument
    add(
        "--evolve",
        nargs="?",
        const=EVOLVE_DEFAULTS.trials,
        type=int,
        metavar="N",
        help=f"evolve the hyperparameters over N trials (bare --evolve: {EVOLVE_DEFAULTS.trials}); writes evolve.csv, "
        "hyp_evolve.yaml (use it with --hyp) and evolve.png (default: no evolution)",
    )
    add(
        "--evolve-space",
        metavar="FILE",
        help="search space YAML: bounds, scale (linear/log), evolve or not, per hyp key "
        "(default: configs/evolve/default.yaml)",
    )
    add(
        "--evolve-strategy",
        metavar="{genetic,yolov5}",
        help="genetic: tournament selection, crossover, Gaussian mutation scaled to each key's range, elitism; "
        f"yolov5: YOLOv5's single-parent mutation (default: {EVOLVE_DEFAULTS.strategy})",
    )
    add(
        "--evolve-population",
        type=int,
        metavar="N",
        help=f"genetic: trials per generation and parents kept (default: {EVOLVE_DEFAULTS.population})",
    )
    add(
        "--evolve-parent",
        choices=["single", "weighted"],
        help="yolov5: mutate one of the best 5 trials (single) or their fitness-weighted mean (weighted) "
        f"(default: {EVOLVE_DEFAULTS.parent})",
    )
    add(
        "--evolve-hyps",
        nargs="+",
        metavar="FILE",
        help="more starting hyp YAMLs besides --hyp: trained first and bred from (default: none)",
    )
    add(
        "--resume-evolve",
        metavar="DIR",
        help="continue the evolution in DIR (e.g. runs/evolve/exp) up to --evolve N trials in all; re-running the "
        "same command with --exist-ok --name exp does the same (default: no)",
    )
    add(
        "--evolve-backend",
        choices=["local", "ray"],
        help="local: trials one by one in this process; ray: several at once with Ray Tune, on this machine or a "
        f'cluster (pip install "detector[tune]") (default: {EVOLVE_DEFAULTS.backend})',
    )
    add(
        "--ray-address",
        metavar="ADDRESS",
        help="ray: 'auto' or HOST:PORT of a running Ray cluster (default: start a local Ray instance)",
    )
    add(
        "--trial-resources",
        metavar="cpu=N,gpu=N",
        help="ray: resources of each trial, e.g. cpu=2,gpu=1 (a trial is one process: it trains on its first GPU) "
        "(default: cpu=1, and gpu=1 when the cluster has GPUs)",
    )
    add(
        "--evolve-concurrency",
        type=int,
        metavar="N",
        help="ray: at most N trials at once (default: 0 = as many as the resources allow)",
    )
    add(
        "--evolve-search",
        choices=["ga", "random", "optuna"],
        help="ray: our genetic proposals (ga, as --evolve-strategy says), Ray's random search, or Optuna's TPE "
        f"(default: {EVOLVE_DEFAULTS.search})",
    )
    add(
        "--evolve-scheduler",
        choices=["fifo", "asha"],
        help="ray: run every trial to the end (fifo) or stop poor trials early on their per-epoch fitness (asha) "
        f"(default: {EVOLVE_DEFAULTS.scheduler})",
    )
    add(
        "--asha-grace-period",
        type=int,
        metavar="EPOCHS",
        help=f"asha: epochs a trial always trains (default: {EVOLVE_DEFAULTS.grace_period})",
    )
    add(
        "--asha-reduction-factor",
        type=int,
        metavar="F",
        help=f"asha: 1/F of the trials go on at each rung (default: {EVOLVE_DEFAULTS.reduction_factor})",
    )


def _choices(name: str) -> list[str]:
    """The values a Literal-typed TrainConfig field accepts (e.g. the optimizers)."""
    return list(get_args(typing.get_type_hints(TrainConfig)[name]))


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: train_from_flags(argv))


def train_from_flags(argv: Sequence[str] | None = None) -> int:
    flags = given_flags(build_parser(), argv)
    local_rank = flags.pop("local_rank", None)
    if local_rank is not None and local_rank >= 0 and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)  # torch.distributed.launch passes it as a flag, torchrun as env
    lr_find = flags.pop("lr_find", False)
    lr_find_options = {field: flags.pop(flag) for flag, field in LR_FIND_FLAGS.items() if flag in flags}
    if lr_find_options and not lr_find:
        raise ConfigError("--lr-find-iters, --lr-find-min and --lr-find-max set the LR range test; add --lr-find")
    if lr_find and ("evolve" in flags or "resume_evolve" in flags):
        raise ConfigError("--lr-find and --evolve are separate modes; run one at a time")

    if "evolve" in flags or "resume_evolve" in flags:
        from detector.evolve.search import command_line, run_evolution  # lazy import: keep `--help` fast

        run_evolution(flags, command_line(argv))
        return 0

    from detector.engine import distributed  # lazy import: keep `train.py --help` fast
    from detector.engine.trainer import Trainer

    config = resolve_train_config(flags)
    devices = device_ids(config.device)
    if len(devices) > 1 and "WORLD_SIZE" not in os.environ:
        given = list(sys.argv[1:] if argv is None else argv)
        return distributed.launch(given, nproc=len(devices))
    if lr_find:
        from detector.engine.lr_find import LRFinder

        LRFinder(config, build_config(LRFindConfig, ("command line", lr_find_options))).run()
        return 0
    Trainer(config).fit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
