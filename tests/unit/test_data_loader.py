"""Loader machinery: collates (standard and quad), the DDP/weighted sampler, seeding, worker counts, weights, and
the shared-memory batch slots (workers' batches arrive intact, kept batches are never overwritten, slots come back)."""

from __future__ import annotations

import functools
import gc
import pickle
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import detector.data.loader as loader_module
from detector.config import Hyperparameters
from detector.data.loader import DetectionSampler, collate_fn, collate_quad, create_dataloader, worker_count
from detector.data.shared_batches import BatchSlots
from detector.data.weights import (
    class_counts,
    labels_to_class_weights,
    labels_to_image_weights,
    repeat_factors,
    reweight_by_map,
)


def make_dataset(root: Path, count: int = 8, size: int = 48) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for index in range(count):
        image = rng.integers(0, 255, (size, size + 8 * (index % 3), 3), dtype=np.uint8)
        cv2.imwrite(str(root / "images" / f"{index}.jpg"), image)
        rows = [f"{index % 3} 0.5 0.5 0.4 0.4", f"{(index + 1) % 3} 0.3 0.3 0.2 0.3"]
        (root / "labels" / f"{index}.txt").write_text("\n".join(rows) + "\n")
    return root / "images"


def item(image: torch.Tensor, labels: list[list[float]]) -> tuple:
    targets = torch.zeros((len(labels), 6))
    if labels:
        targets[:, 1:] = torch.tensor(labels)
    return image, targets, f"{len(labels)}.jpg", None


# --------------------------------------------------------------------------------------------------------------------
# Collates


def test_collate_fills_the_image_index_column() -> None:
    batch = [item(torch.zeros(3, 8, 8, dtype=torch.uint8), [[1, 0.5, 0.5, 0.1, 0.1]] * n) for n in (2, 0, 1)]
    images, targets, paths, shapes = collate_fn(batch)
    assert images.shape == (3, 3, 8, 8) and images.dtype == torch.uint8
    assert targets[:, 0].tolist() == [0, 0, 2] and paths == ("2.jpg", "0.jpg", "1.jpg") and shapes == (None,) * 3


def quad_batch() -> list[tuple]:
    """4 solid images (values 10, 20, 30, 40), each with one centred box of a different class."""
    return [item(torch.full((3, 8, 8), 10 * (i + 1), dtype=torch.uint8), [[i, 0.5, 0.5, 0.5, 0.25]]) for i in range(4)]


def test_quad_collate_tiles_four_images_with_adjusted_labels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_module.torch, "rand", lambda *_: torch.tensor([0.9]))  # the tiling branch
    images, targets, paths, _ = collate_quad(quad_batch())
    assert images.shape == (1, 3, 16, 16) and paths == ("1.jpg",)
    # item 0 top-left, 1 bottom-left, 2 top-right, 3 bottom-right
    assert [images[0, 0, 0, 0], images[0, 0, 8, 0], images[0, 0, 0, 8], images[0, 0, 8, 8]] == [10, 20, 30, 40]
    expected = [[0, 0, 0.25, 0.25, 0.25, 0.125], [0, 1, 0.25, 0.75, 0.25, 0.125], [0, 2, 0.75, 0.25, 0.25, 0.125]]
    expected.append([0, 3, 0.75, 0.75, 0.25, 0.125])
    torch.testing.assert_close(targets, torch.tensor(expected))
    for _, cls, x, y, w, h in targets.tolist():  # each box still covers its own tile's pixels
        x1, y1, x2, y2 = int((x - w / 2) * 16), int((y - h / 2) * 16), int((x + w / 2) * 16), int((y + h / 2) * 16)
        assert (images[0, :, y1:y2, x1:x2] == 10 * (cls + 1)).all()


def test_quad_collate_upscales_the_first_image(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_module.torch, "rand", lambda *_: torch.tensor([0.1]))  # the upscale branch
    images, targets, _, _ = collate_quad(quad_batch() + quad_batch()[:3])  # 7 items -> 1 quad, 3 dropped
    assert images.shape == (1, 3, 16, 16) and images.dtype == torch.uint8 and (images == 10).all()
    torch.testing.assert_close(targets, torch.tensor([[0, 0, 0.5, 0.5, 0.5, 0.25]]))


# --------------------------------------------------------------------------------------------------------------------
# Sampler


def test_ddp_ranks_draw_one_shared_list_and_split_it() -> None:
    per_rank = [list(DetectionSampler(10, shuffle=True, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert all(len(items) == 4 for items in per_rank)  # 10 padded to 12
    single = list(DetectionSampler(10, shuffle=True, seed=3))
    interleaved = [per_rank[i % 3][i // 3] for i in range(10)]
    assert interleaved == single[:10]  # rank r holds entries r, r + 3, ... of the same list
    assert sorted(index for items in per_rank for index, _ in items[:3]) == sorted(i for i, _ in single[:9])


def test_sampler_epochs_and_seeds() -> None:
    sampler = DetectionSampler(50, shuffle=True, seed=0)
    epoch0 = list(sampler)
    assert sorted(i for i, _ in epoch0) == list(range(50)) and epoch0 == list(sampler)
    sampler.set_epoch(1)
    assert [i for i, _ in sampler] != [i for i, _ in epoch0]
    assert [i for i, _ in DetectionSampler(5, shuffle=False)] == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="image weights"):
        sampler.set_image_weights(np.ones(3))


def test_image_weights_move_sampled_class_frequencies_toward_uniform() -> None:
    # 90 images of class 0 only, 10 images of class 1 only: 9:1 imbalance
    labels = [np.array([[0, 0.5, 0.5, 0.1, 0.1]], np.float32)] * 90 + [
        np.array([[1, 0.5, 0.5, 0.1, 0.1]], np.float32)
    ] * 10
    class_weights = labels_to_class_weights(labels, 2).numpy()
    weights = labels_to_image_weights(labels, 2, class_weights)
    sampler = DetectionSampler(100, seed=0, image_weights=weights)
    drawn = []
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn.extend(index for index, _ in sampler)
    rare_fraction = np.mean(np.array(drawn) >= 90)
    assert 0.4 < rare_fraction < 0.6  # from 0.1 without weights to about 0.5
    # after a validation where class 0 is already found well, class 1 is drawn even more
    sampler.set_image_weights(labels_to_image_weights(labels, 2, reweight_by_map(class_weights, np.array([0.9, 0.1]))))
    assert np.mean(np.array([i for i, _ in sampler]) >= 90) > 0.9


def test_class_and_image_weights_hand_computed() -> None:
    labels = [np.array([[0, 0.5, 0.5, 0.1, 0.1], [0, 0.2, 0.2, 0.1, 0.1]]), np.array([[2, 0.5, 0.5, 0.1, 0.1]])]
    labels.append(np.zeros((0, 5)))
    assert class_counts(labels, 3).tolist() == [2, 0, 1]
    # counts (2, 1 for the missing class, 1) -> inverse (0.5, 1, 1) -> normalised by 2.5
    torch.testing.assert_close(labels_to_class_weights(labels, 3), torch.tensor([0.2, 0.4, 0.4]))
    np.testing.assert_allclose(labels_to_image_weights(labels, 3, np.array([0.2, 0.4, 0.4])), [0.4, 0.4, 0.0])
    np.testing.assert_allclose(reweight_by_map(np.array([0.3, 0.6]), np.array([0.5, 1.0])), [0.0375, 0.0])


def test_repeat_factors_hand_computed() -> None:
    """LVIS's repeat factors: class c in a fraction f(c) of the images -> max(1, sqrt(t / f(c))); an image takes
    its classes' largest factor, 1 without objects."""
    box = [0.5, 0.5, 0.1, 0.1]
    labels = [
        np.array([[0, *box], [0, *box]]),  # class 0 twice: counted once for this image
        np.array([[0, *box]]),
        np.array([[0, *box], [1, *box]]),
        np.zeros((0, 5)),
    ]
    # f(0) = 3/4 -> max(1, sqrt(0.5 / 0.75)) = 1; f(1) = 1/4 -> sqrt(0.5 / 0.25) = sqrt(2); class 2: in no image
    np.testing.assert_allclose(repeat_factors(labels, 3, threshold=0.5), [1, 1, np.sqrt(2), 1])
    np.testing.assert_allclose(repeat_factors(labels, 3, threshold=0.1), [1, 1, 1, 1])  # no class below 10%


def test_class_balanced_sampling_draws_rare_class_images_by_their_repeat_factor(tmp_path: Path) -> None:
    images = make_dataset(tmp_path, count=6)  # every image has two of the 3 classes
    for index in range(4):  # the first 4 images become class 0 only; images 4 and 5 keep class 1 or 2
        (tmp_path / "labels" / f"{index}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    loader, dataset = create_dataloader(images, imgsz=64, batch_size=2, workers=0, shuffle=True, class_balanced=0.5,
                                        num_classes=3)  # fmt: skip
    # image 4 has classes 1 and 2, image 5 classes 2 and 0: f(0) = 5/6, f(1) = 1/6, f(2) = 2/6 of the images
    # -> factors 1, sqrt(0.5 * 6), sqrt(0.5 * 3); image 4 takes class 1's, image 5 class 2's
    factors = np.array([1, 1, 1, 1, np.sqrt(3.0), np.sqrt(1.5)])
    np.testing.assert_allclose(repeat_factors(dataset.labels, 3, 0.5), factors)
    drawn = []
    for epoch in range(300):
        loader.sampler.set_epoch(epoch)
        drawn.extend(index for index, _ in loader.sampler)
    frequencies = np.bincount(drawn, minlength=6) / len(drawn)
    np.testing.assert_allclose(frequencies, factors / factors.sum(), atol=0.02)
    with pytest.raises(ValueError, match="choose one"):
        create_dataloader(images, imgsz=64, batch_size=2, workers=0, image_weights=True, class_balanced=0.5)


def test_worker_count_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_module, "usable_cpus", lambda: 4)  # e.g. taskset -c 0-3 on a 16-CPU machine
    assert worker_count(64, 16) == 4
    assert worker_count(8, 1) == 0  # batch of one: the main process is enough
    assert worker_count(8, 16, world_size=2) == 2
    assert worker_count(8, 16, world_size=8) == 0
    assert worker_count(0, 16) == 0


def test_val_loader_workers_get_only_the_cores_a_cpu_forward_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    import detector.engine.validator as validator_module

    monkeypatch.setattr(validator_module, "usable_cpus", lambda: 8)
    monkeypatch.setattr(validator_module.torch, "get_num_threads", lambda: 2)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert validator_module.val_loader_workers(8, cpu) == 6 and validator_module.val_loader_workers(4, "cpu") == 4
    assert validator_module.val_loader_workers(8, gpu) == 8
    monkeypatch.setattr(validator_module, "usable_cpus", lambda: 2)  # this machine: the forward takes both cores
    assert validator_module.val_loader_workers(8, cpu) == 0 and validator_module.val_loader_workers(8, gpu) == 8


# --------------------------------------------------------------------------------------------------------------------
# create_dataloader


def test_same_seed_gives_the_same_batches_with_any_worker_count(tmp_path: Path) -> None:
    images = make_dataset(tmp_path)
    hyp = Hyperparameters(degrees=5.0, mixup=0.5)
    options = {"imgsz": 64, "batch_size": 4, "hyp": hyp, "augment": True, "shuffle": True, "num_classes": 3}
    first, _ = create_dataloader(images, workers=0, seed=1, **options)
    again, _ = create_dataloader(images, workers=2, seed=1, **options)
    other, _ = create_dataloader(images, workers=0, seed=2, **options)
    batches = [list(loader) for loader in (first, again, other)]
    assert len(batches[0]) == 2
    for (images_a, targets_a, paths_a, _), (images_b, targets_b, paths_b, _) in zip(
        batches[0], batches[1], strict=True
    ):
        assert torch.equal(images_a, images_b) and torch.equal(targets_a, targets_b) and paths_a == paths_b
    assert not torch.equal(batches[0][0][0], batches[2][0][0])
    first.sampler.set_epoch(1)
    assert not torch.equal(next(iter(first))[0], batches[0][0][0])  # a new epoch draws new augmentations


def test_main_process_makes_a_batch_on_threads_as_item_by_item(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--workers 0: a batch's items are made on threads (__getitems__), yet each is the item made on its own."""
    images = make_dataset(tmp_path)
    hyp = Hyperparameters(degrees=5.0, mixup=0.5, copy_paste=0.5, cutmix=0.5)
    options = {"imgsz": 64, "batch_size": 8, "hyp": hyp, "augment": True, "shuffle": True, "num_classes": 3}
    threaded, threaded_set = create_dataloader(images, workers=0, seed=3, **options)
    single, single_set = create_dataloader(images, workers=0, seed=3, **options)
    threaded_set.item_threads, single_set.item_threads = 4, 1
    made_on = set()
    make_item = type(threaded_set).__getitem__

    def recording(dataset, key):
        made_on.add(threading.current_thread().name)
        return make_item(dataset, key)

    monkeypatch.setattr(type(threaded_set), "__getitem__", recording)
    for epoch in range(2):
        threaded.sampler.set_epoch(epoch)
        single.sampler.set_epoch(epoch)
        for (images_a, targets_a, paths_a, _), (images_b, targets_b, paths_b, _) in zip(threaded, single, strict=True):
            assert torch.equal(images_a, images_b) and torch.equal(targets_a, targets_b) and paths_a == paths_b
    assert any(name.startswith("dataset-items") for name in made_on)
    assert pickle.loads(pickle.dumps(threaded_set))._pool is None  # what a spawned worker gets: no threads


def test_validation_loader_contract(tmp_path: Path) -> None:
    images = make_dataset(tmp_path)
    loader, dataset = create_dataloader(
        images, imgsz=64, batch_size=3, rect=True, pad=0.5, workers=0, names=["a", "b", "c"]
    )
    batches = list(loader)
    assert sum(len(b[0]) for b in batches) == len(dataset) == 8
    images_batch, targets, paths, shapes = batches[0]
    assert images_batch.dtype == torch.uint8 and images_batch.shape[:2] == (3, 3)
    assert targets.shape[1] == 6 and set(targets[:, 0].tolist()) == {0.0, 1.0, 2.0}
    assert len(paths) == 3 and all(len(s) == 2 for s in shapes)
    assert all(len(lb) == 2 and lb.dtype == np.float32 for lb in dataset.labels) and dataset.shapes.shape == (8, 2)


def test_quad_and_image_weights_through_create_dataloader(tmp_path: Path) -> None:
    images = make_dataset(tmp_path)
    loader, _ = create_dataloader(
        images,
        imgsz=32,
        batch_size=8,
        hyp=Hyperparameters(),
        augment=True,
        workers=0,
        quad=True,
        image_weights=True,
        num_classes=3,
    )
    batch_images, targets, _, _ = next(iter(loader))
    assert batch_images.shape == (2, 3, 64, 64) and set(targets[:, 0].tolist()) <= {0.0, 1.0}
    assert loader.sampler.image_weights is not None and np.isclose(loader.sampler.image_weights.sum(), 1.0)


def test_image_weights_come_from_rank_zero_under_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Checked for real with 2 gloo processes during development; here the broadcast is stubbed (fast)."""
    rank_zero_weights = np.array([0.0, 0.0, 1.0, 0.0])

    def broadcast_object_list(objects: list, src: int) -> None:
        assert src == 0
        objects[0] = rank_zero_weights

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", broadcast_object_list)
    sampler = DetectionSampler(4, seed=0, rank=1, world_size=2)
    sampler.set_image_weights(np.ones(4))  # this rank's own weights are replaced by rank 0's
    assert [index for index, _ in sampler] == [2, 2]


# --------------------------------------------------------------------------------------------------------------------
# Batch slots in shared memory (detector.data.shared_batches)


def in_slots(tensor: torch.Tensor, slots: BatchSlots) -> bool:
    start = slots.memory.data_ptr()
    return start <= tensor.data_ptr() < start + slots.memory.nbytes()


def test_workers_batches_match_the_main_process_and_survive_slot_reuse(tmp_path: Path) -> None:
    """One worker with 4 slots hands out 8 batches that are all kept: the first 4 come in slots, the rest the usual
    way (no slot is free), and every one equals the batch the main process makes itself. Freed, the slots return."""
    images = make_dataset(tmp_path, count=16)
    options = {"imgsz": 64, "batch_size": 2, "augment": True, "shuffle": True, "num_classes": 3, "seed": 5}
    reference, _ = create_dataloader(images, workers=0, **options)
    loader, _ = create_dataloader(images, workers=1, **options)
    slots = loader.collate_fn.keywords["slots"]
    assert isinstance(slots, BatchSlots) and reference.collate_fn.keywords["slots"] is None
    expected, kept = list(reference), list(loader)
    assert len(kept) == 8
    assert [in_slots(batch[0], slots) for batch in kept] == [True] * 4 + [False] * 4
    assert int(slots.taken.sum()) == 4
    for (images_a, targets_a, paths_a, _), (images_b, targets_b, paths_b, _) in zip(expected, kept, strict=True):
        assert torch.equal(images_a, images_b) and torch.equal(targets_a, targets_b) and paths_a == paths_b
    del kept, images_b, targets_b
    gc.collect()
    assert int(slots.taken.sum()) == 0
    # consumed one at a time, as a trainer does, every batch comes in a slot
    assert all(in_slots(batch[0], slots) for batch in loader)


def test_a_slot_is_released_with_the_last_tensor_over_it() -> None:
    slots = BatchSlots(workers=1, capacity=2 * 3 * 4 * 4, slots_per_worker=2)
    slots.taken[0, 1] = 1  # as a worker claims it
    batch = slots.open(0, 1, (2, 3, 4, 4))
    assert batch.shape == (2, 3, 4, 4) and in_slots(batch, slots)
    view = batch[1, :, 1:3]
    del batch
    gc.collect()
    assert slots.taken.tolist() == [[0, 1]]  # the view still reads the slot
    del view
    gc.collect()
    assert slots.taken.tolist() == [[0, 0]]


def test_spawned_workers_fill_slots_and_oversized_batches_fall_back() -> None:
    """With the spawn start method (macOS, Windows) the slots reach the workers pickled; a batch larger than a slot
    is sent the usual way."""
    rng = np.random.default_rng(0)
    items = [
        (torch.from_numpy(rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)), torch.rand(index % 3, 6), f"{index}", None)
        for index in range(12)
    ]
    slots = BatchSlots(workers=2, capacity=3 * 3 * 8 * 8, context="spawn")  # room for batches of 3, not of 4
    loaders = [
        DataLoader(
            items,  # a list is a dataset: nothing to import in the spawned workers
            batch_size=size,
            num_workers=2,
            collate_fn=functools.partial(collate_fn, slots=slots),
            multiprocessing_context="spawn",
        )
        for size in (3, 4)
    ]
    for loader, slotted in zip(loaders, (True, False), strict=True):
        for number, (batch, targets, paths, _) in enumerate(loader):
            chunk = items[number * loader.batch_size : (number + 1) * loader.batch_size]
            assert torch.equal(batch, torch.stack([entry[0] for entry in chunk]))
            assert targets.shape == (sum(len(entry[1]) for entry in chunk), 6)
            assert paths == tuple(entry[2] for entry in chunk)
            assert in_slots(batch, slots) is slotted
            del batch
