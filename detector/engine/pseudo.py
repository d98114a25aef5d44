"""Pseudo-labels for unlabelled images (``--unlabeled``): a model labels them, and they train with the labelled ones.

How the pieces fit:

- **Data.** :class:`~detector.data.dataset.YOLODataset` appends the ``--unlabeled`` images after the labelled ones
  (``dataset.unlabeled`` marks them). The epoch has labelled + unlabelled items from the start, so the LR schedule,
  which counts iterations, never changes; until the images have pseudo-labels the sampler draws the epoch from
  the labelled images only (``sampler.set_drawable``) and the mixing steps (mosaic, mixup...) do not draw them
  either, so their objects never enter a sample as background. They are never validated on.
- **Labelling.** :class:`PseudoLabeler` labels them with a ``--teacher`` model once before training, and/or with
  the run's EMA model at the start of every ``--pseudo-every`` K-th epoch (K, 2K, ...): eval mode, no gradients, at
  the training ``--img``, NMS at ``--pseudo-conf``, boxes as YOLO rows ``[class, x, y, w, h]`` of the image. Each
  labelling is one generation, written atomically to ``<run>/pseudo_labels.npz`` (:class:`PseudoLabels`), which a
  ``--resume`` continues with and a user can read (``PseudoLabels.load``).
- **Reaching the workers.** Persistent DataLoader workers hold their own dataset copies. The sampler hands every
  item the current generation (``(index, seed, closed, generation)``, like the close-mosaic flag); a copy holding
  an older one reloads the file (``dataset.pseudo_source``) before it builds the item.
- **Loss weight.** A pseudo-label row carries its class as ``class + nc`` through every augmentation (the image
  store adds the offset, so mosaic tiles and pasted objects keep it; an augmentation that drops or clips a row
  drops or clips its mark with it). Right before the loss the trainer turns the mark back into the class and a
  weight (:func:`unmark_pseudo_targets`): ``--pseudo-weight`` for those rows, 1 for labelled ones, which
  :class:`~detector.models.loss.DetectionLoss` applies to the box, class and objectness terms.

An unlabelled image with no box above ``--pseudo-conf`` trains as background, as YOLO trains images without labels.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor, nn

from detector.data.augment import letterbox
from detector.engine import distributed
from detector.engine.callbacks import Callback
from detector.errors import ConfigError
from detector.ops.boxes import scale_boxes, xyxy2xywhn
from detector.ops.nms import non_max_suppression
from detector.utils.checks import round_to_stride
from detector.utils.files import atomic_write

if TYPE_CHECKING:
    from detector.data.dataset import ImageStore, YOLODataset
    from detector.engine.trainer import Trainer

LOGGER = logging.getLogger(__name__)

PSEUDO_LABEL_FILE = "pseudo_labels.npz"  # in the run folder
NMS_IOU = 0.45  # NMS IoU of the labelling: detect.py's default (one box per object, not val.py's recall-hungry 0.6)
MAX_BOXES = 300  # per image, the most confident first
LOADING_THREADS = 8  # image decoding releases the GIL: threads keep the model fed without forking workers


@dataclass(frozen=True)
class PseudoLabels:
    """One generation of pseudo-labels: for each unlabelled image (``files``), its boxes as (n, 5) float32
    ``[class, x_center, y_center, width, height]`` rows normalised to the image (``labels``) and their (n,) float32
    confidences. ``epoch`` is the epoch they were made before (0: before training); ``source`` names the model."""

    generation: int
    epoch: int
    source: str
    files: tuple[str, ...]
    labels: tuple[np.ndarray, ...]
    confidences: tuple[np.ndarray, ...]

    @property
    def num_boxes(self) -> int:
        return sum(len(rows) for rows in self.labels)

    def by_file(self) -> dict[str, np.ndarray]:
        """``{image path: (n, 5) rows}``, what :meth:`YOLODataset.set_pseudo_labels` takes."""
        return dict(zip(self.files, self.labels, strict=True))

    def save(self, path: str | Path) -> None:
        """Write an ``.npz`` of plain arrays (readable with ``allow_pickle=False``), atomically: a worker reading it
        meanwhile sees the old or the new generation, never a torn file."""
        counts = np.array([len(rows) for rows in self.labels], np.int64)
        arrays = {
            "generation": np.int64(self.generation),
            "epoch": np.int64(self.epoch),
            "source": np.str_(self.source),
            "files": np.array(self.files, dtype=str).reshape(-1),
            "counts": counts,
            "labels": np.concatenate([np.zeros((0, 5), np.float32), *self.labels]).astype(np.float32),
            "confidences": np.concatenate([np.zeros(0, np.float32), *self.confidences]).astype(np.float32),
        }
        atomic_write(path, lambda f: np.savez(f, **arrays))

    @classmethod
    def load(cls, path: str | Path) -> PseudoLabels:
        with np.load(path, allow_pickle=False) as data:
            splits = np.cumsum(data["counts"])[:-1]
            return cls(
                generation=int(data["generation"]),
                epoch=int(data["epoch"]),
                source=str(data["source"]),
                files=tuple(str(f) for f in data["files"]),
                labels=tuple(np.split(data["labels"], splits)),
                confidences=tuple(np.split(data["confidences"], splits)),
            )


def read_pseudo_labels(path: str | Path) -> tuple[int, dict[str, np.ndarray]]:
    """(generation, labels by image path) of a pseudo-label file: a dataset's ``pseudo_source``."""
    labels = PseudoLabels.load(path)
    return labels.generation, labels.by_file()


def unmark_pseudo_targets(targets: Tensor, num_classes: int, weight: float) -> tuple[Tensor, Tensor]:
    """Targets (N, 6) ``[image, class, x, y, w, h]`` whose pseudo-label rows carry ``class + num_classes`` ->
    (the targets with their real classes, float (N,) weights: ``weight`` for pseudo-label rows, 1 for the others)."""
    pseudo = targets[:, 1] >= num_classes
    targets = targets.clone()
    targets[pseudo, 1] -= num_classes
    weights = torch.ones(len(targets), dtype=torch.float32, device=targets.device)
    weights[pseudo] = weight
    return targets, weights


# --------------------------------------------------------------------------------------------------------------------
# Labelling


@torch.no_grad()
def predict_labels(
    model: nn.Module,
    images: Sequence[np.ndarray],
    *,
    size: int,
    conf_thres: float,
    amp_dtype: torch.dtype | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """YOLO label rows of BGR (H, W, 3) uint8 ``images`` from an eval-mode detection model: each image letterboxed
    to ``size`` square, NMS at ``conf_thres`` (IoU :data:`NMS_IOU`); per image ((n, 5) float32 ``[class, xywhn]``
    normalised to that image, (n,) float32 confidences), most confident first. Degenerate boxes are dropped."""
    device = next(model.parameters()).device
    stride = int(model.stride.max())
    boxed = [letterbox(image, round_to_stride(size, stride), stride=stride) for image in images]
    batch = np.stack([image.transpose(2, 0, 1)[::-1] for image, _ in boxed])  # HWC BGR -> CHW RGB
    tensor = torch.from_numpy(batch).to(device).float().div_(255)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
    with autocast:
        output = model(tensor)
    detections = non_max_suppression(output.float(), conf_thres, NMS_IOU, max_det=MAX_BOXES)
    results = []
    for found, (_, info), image in zip(detections, boxed, images, strict=True):
        height, width = image.shape[:2]
        boxes = scale_boxes(found[:, :4].clone(), tuple(tensor.shape[2:]), (height, width), (info.ratio, info.pad))
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        rows = torch.cat((found[keep, 5:6], xyxy2xywhn(boxes[keep], width, height)), dim=1)
        results.append((rows.cpu().numpy().astype(np.float32), found[keep, 4].cpu().numpy().astype(np.float32)))
    return results


def label_images(
    model: nn.Module,
    store: ImageStore,
    indices: Sequence[int],
    *,
    size: int,
    conf_thres: float,
    batch_size: int,
    amp_dtype: torch.dtype | None = None,
    single_cls: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(labels, confidences) of :func:`predict_labels` for the store's images ``indices``, decoded by threads one
    batch ahead of the model. ``single_cls`` makes every class 0 (a multi-class teacher for ``--single-cls``)."""
    labels: list[np.ndarray] = []
    confidences: list[np.ndarray] = []
    batches = [indices[start : start + batch_size] for start in range(0, len(indices), batch_size)]
    with ThreadPoolExecutor(max_workers=min(LOADING_THREADS, os.cpu_count() or 1)) as pool:
        loading = pool.map(lambda batch: [store.load_image(int(i)) for i in batch], batches)
        for images in loading:
            for rows, scores in predict_labels(model, images, size=size, conf_thres=conf_thres, amp_dtype=amp_dtype):
                if single_cls:
                    rows[:, 0] = 0
                labels.append(rows)
                confidences.append(scores)
    return labels, confidences


# --------------------------------------------------------------------------------------------------------------------
# The hook


class PseudoLabeler(Callback):
    """Labels the ``--unlabeled`` images and keeps every rank's sampler and dataset on the current generation.

    ``on_fit_start``: on ``--resume`` continues with the run's pseudo_labels.npz; otherwise ``--teacher`` (if given)
    labels the images now. ``on_epoch_start`` of epoch K, 2K, ... (``--pseudo-every`` K > 0): the EMA model
    relabels them. Rank 0 labels and writes the file; every rank then reads it. ``current`` is the generation held.
    """

    def __init__(self) -> None:
        self.current: PseudoLabels | None = None
        self.path: Path | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        dataset = self._check_trainer(trainer)
        config = trainer.config
        self.path = trainer.save_dir / PSEUDO_LABEL_FILE
        dataset.pseudo_source = functools.partial(read_pseudo_labels, self.path)
        if config.resume and self.path.is_file():
            self._use(trainer, PseudoLabels.load(self.path))
            LOGGER.info(
                "Pseudo-labels: continuing with generation %d (%d boxes on %d images) from %s",
                self.current.generation,
                self.current.num_boxes,
                len(self.current.files),
                self.path,
            )
        elif config.teacher:
            self.relabel(trainer, "teacher", config.teacher)
        else:
            LOGGER.info(
                "Pseudo-labels: %d unlabelled images join training from epoch %d, when the EMA model first labels them",
                int(dataset.unlabeled.sum()),
                config.pseudo_every,
            )

    def on_epoch_start(self, trainer: Trainer) -> None:
        every, epoch = trainer.config.pseudo_every, trainer.state.epoch
        due = every > 0 and epoch > 0 and epoch % every == 0
        if due and (self.current is None or self.current.epoch != epoch):  # not if a resumed run made them already
            self.relabel(trainer, "EMA")

    def relabel(self, trainer: Trainer, kind: str, weights: str = "") -> PseudoLabels:
        """A new generation from the ``kind`` "teacher" (loaded from ``weights``) or "EMA" model, made by rank 0 and
        taken up by every rank."""
        made = self._label(trainer, kind, weights) if trainer.is_main else None
        distributed.barrier(trainer.context)
        self._use(trainer, made if made is not None else PseudoLabels.load(self.path))
        return self.current

    def _label(self, trainer: Trainer, kind: str, weights: str) -> PseudoLabels:
        """Label the unlabelled images, write the file, log one line."""
        started = time.perf_counter()
        model = self._teacher(trainer, weights) if kind == "teacher" else trainer.ema.ema
        dataset = trainer.train_dataset
        indices = np.flatnonzero(dataset.unlabeled)
        labels, confidences = label_images(
            model,
            dataset.store,
            indices,
            size=trainer.val_imgsz,  # the size the run's model is validated (and best.pt chosen) at
            conf_thres=trainer.config.pseudo_conf,
            batch_size=trainer.batch_size * 2,
            amp_dtype=trainer.amp_dtype,
            single_cls=trainer.config.single_cls,
        )
        made = PseudoLabels(
            generation=(self.current.generation if self.current is not None else 0) + 1,
            epoch=trainer.state.epoch,
            source=f"teacher {weights}" if kind == "teacher" else f"EMA model of epoch {trainer.state.epoch - 1}",
            files=tuple(dataset.im_files[i] for i in indices),
            labels=tuple(labels),
            confidences=tuple(confidences),
        )
        made.save(self.path)
        LOGGER.info(
            "Pseudo-labels generation %d by the %s: %d images, %d boxes kept at conf >= %g, %.1f s -> %s",
            made.generation,
            made.source,
            len(made.files),
            made.num_boxes,
            trainer.config.pseudo_conf,
            time.perf_counter() - started,
            self.path,
        )
        return made

    def _use(self, trainer: Trainer, labels: PseudoLabels) -> None:
        """Hold ``labels``: this process's dataset takes them, and the sampler draws every image from now on and
        tells the workers' dataset copies the new generation."""
        self.current = labels
        trainer.train_dataset.set_pseudo_labels(labels.generation, labels.by_file())
        sampler = trainer.train_loader.sampler
        sampler.set_drawable(None)
        sampler.set_generation(labels.generation)

    @staticmethod
    def _teacher(trainer: Trainer, weights: str) -> nn.Module:
        from detector.models.loading import load_model

        model = load_model(weights, device=trainer.device)
        if model.nc != len(trainer.names) and not trainer.config.single_cls:
            raise ConfigError(
                f"--teacher {weights}: predicts {model.nc} classes, the dataset has {len(trainer.names)} "
                "(use a teacher trained on the same classes, or --single-cls)"
            )
        return model

    @staticmethod
    def _check_trainer(trainer: Trainer) -> YOLODataset:
        """The training dataset with unlabelled images, a sampler that can hold them back, and a loss that takes
        per-target weights; one-line ConfigError otherwise (a custom loader or loss)."""
        dataset = trainer.train_dataset
        sampler = getattr(trainer.train_loader, "sampler", None)
        if not hasattr(dataset, "set_pseudo_labels") or not getattr(dataset, "unlabeled", np.zeros(0)).any():
            raise ConfigError("--unlabeled needs the training loader's dataset to be a YOLODataset with those images")
        if not hasattr(sampler, "set_generation"):
            raise ConfigError("--unlabeled needs the training loader's sampler to be a DetectionSampler")
        try:
            inspect.signature(trainer.loss_fn).bind(None, None, None)
        except TypeError as e:
            raise ConfigError(
                f"--unlabeled: the loss {type(trainer.loss_fn).__name__} takes no per-target weights (a third "
                "argument, weights (N,), as DetectionLoss has)"
            ) from e
        return dataset
