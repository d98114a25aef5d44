"""Trainer helpers: config merging and resume rules, weight transfer, freezing, multi-scale, AMP check, seeds."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from killed_worker import loader_whose_worker_dies
from torch import nn

from detector.config import (
    BUILTIN_TRAIN_CONFIG,
    SAFE_RESUME_KEYS,
    TrainConfig,
    check_train_config,
    config_to_dict,
    find_last_checkpoint,
    load_yaml,
    resolve_train_config,
)
from detector.engine.hooks import EarlyStopping, validation_due
from detector.engine.state import TrainState, strip_optimizer
from detector.engine.trainer import (
    Trainer,
    check_amp,
    check_something_trains,
    epoch_seed,
    freeze_layers,
    frozen_layer_indices,
    random_image_size,
    resize_batch,
    resolve_amp,
    set_train_mode,
    transfer_weights,
)
from detector.errors import CheckpointError, ConfigError, LoaderWorkerError
from detector.utils.checkpoint import load_checkpoint, save_checkpoint
from detector.utils.torch_utils import cpu_has_native_bf16


class Layered(nn.Module):
    """A stand-in with DetectionModel's layout: top-level layers in ``self.model`` (names ``model.<i>.``)."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.model = nn.ModuleList(
            [
                nn.Sequential(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1), nn.BatchNorm2d(width))
                for i in range(3)
            ]
        )

    def forward(self, x):
        for layer in self.model:
            x = layer(x)
        return x


# -- config ----------------------------------------------------------------------------------------------------------


def test_resolve_train_config_precedence_defaults_config_hyp_flags(tmp_path):
    config_file = tmp_path / "run.yaml"
    config_file.write_text("epochs: 7\nbatch_size: 8\nhyp:\n  lr0: 0.5\n  momentum: 0.5\n")
    hyp_file = tmp_path / "hyp.yaml"
    hyp_file.write_text("lr0: 0.02\nmosaic: 0.0\n")
    config = resolve_train_config({"config": str(config_file), "hyp": str(hyp_file), "batch_size": 4, "rect": True})
    assert config.epochs == 7  # --config over the default
    assert config.batch_size == 4  # the flag over --config
    assert config.hyp.lr0 == 0.02 and config.hyp.mosaic == 0.0  # --hyp over --config
    assert config.hyp.momentum == 0.5  # --config's hyp key that --hyp does not set survives
    assert config.hyp.weight_decay == 0.0005 and config.rect is True


def test_builtin_recipe_applies_under_the_users_options_and_only_to_the_builtin_dataset(tmp_path):
    recipe = load_yaml(BUILTIN_TRAIN_CONFIG)
    builtin = resolve_train_config({})
    assert builtin.optimizer == recipe["optimizer"] and builtin.nbs == recipe["nbs"]
    assert builtin.hyp.lr0 == recipe["hyp"]["lr0"] and builtin.epochs == recipe["epochs"]
    mine = resolve_train_config({"optimizer": "SGD", "epochs": 3, "hyp": {"lr0": 0.05}})
    assert (mine.optimizer, mine.epochs, mine.hyp.lr0) == ("SGD", 3, 0.05)
    assert mine.hyp.momentum == recipe["hyp"]["momentum"]  # a recipe key the user did not set survives
    other = resolve_train_config({"data": "my.yaml"})
    assert other == TrainConfig(data="my.yaml")  # other datasets get YOLOv5's defaults


def test_builtin_recipe_sizes_go_together():
    """The recipe trains smaller than it validates; --img alone replaces both sizes, --val-img alone only its own."""
    recipe = load_yaml(BUILTIN_TRAIN_CONFIG)
    builtin = resolve_train_config({})
    assert (builtin.imgsz, builtin.val_imgsz) == (recipe["imgsz"], recipe["val_imgsz"])
    assert 0 < recipe["imgsz"] < recipe["val_imgsz"]
    mine = resolve_train_config({"imgsz": 320})
    assert (mine.imgsz, mine.val_imgsz) == (320, 0)  # 0: validate at --imgsz
    both = resolve_train_config({"imgsz": 320, "val_imgsz": 384})
    assert (both.imgsz, both.val_imgsz) == (320, 384)
    assert resolve_train_config({"val_imgsz": 288}).imgsz == recipe["imgsz"]
    assert resolve_train_config({"data": "my.yaml"}).val_imgsz == 0  # other datasets: validate at --imgsz


def test_a_config_files_sizes_go_together_too(tmp_path):
    """The built-in recipe on your data (--config configs/builtin.yaml): --img alone sets both sizes there too."""
    recipe = load_yaml(BUILTIN_TRAIN_CONFIG)
    config = str(BUILTIN_TRAIN_CONFIG)
    as_is = resolve_train_config({"data": "my.yaml", "config": config})
    assert (as_is.imgsz, as_is.val_imgsz) == (recipe["imgsz"], recipe["val_imgsz"])
    mine = resolve_train_config({"data": "my.yaml", "config": config, "imgsz": 640})
    assert (mine.imgsz, mine.val_imgsz, mine.optimizer) == (640, 0, recipe["optimizer"])  # the rest stays
    both = resolve_train_config({"data": "my.yaml", "config": config, "imgsz": 640, "val_imgsz": 704})
    assert (both.imgsz, both.val_imgsz) == (640, 704)
    # any config file's pair: a later --img replaces its imgsz, and its val size goes with it
    later = tmp_path / "later.yaml"
    later.write_text("imgsz: 416\nval-imgsz: 480\n")
    stacked = resolve_train_config({"data": "my.yaml", "config": str(later), "imgsz": 320})
    assert (stacked.imgsz, stacked.val_imgsz) == (320, 0)


def test_resolve_train_config_rejects_typos_with_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'epochs'"):
        resolve_train_config({"epoch": 3})


def test_defaults_are_real_values_and_the_builtin_recipe_sets_its_own():
    recipe = load_yaml(BUILTIN_TRAIN_CONFIG)
    builtin = resolve_train_config({})
    assert (builtin.imgsz, builtin.epochs) == (recipe["imgsz"], recipe["epochs"])
    other = resolve_train_config({"data": "my.yaml", "weights": "x.pt", "imgsz": 320})
    assert (other.imgsz, other.epochs, other.cfg) == (320, 100, "")  # cfg "" = --weights' architecture


def test_cos_lr_is_an_alias_of_the_cosine_schedule():
    assert resolve_train_config({"data": "d.yaml", "cos_lr": True}).lr_schedule == "cosine"
    assert resolve_train_config({"data": "d.yaml", "lr_schedule": "onecycle"}).lr_schedule == "onecycle"
    with pytest.raises(ConfigError, match="contradicts --lr-schedule onecycle"):
        resolve_train_config({"data": "d.yaml", "cos_lr": True, "lr_schedule": "onecycle"})
    config = resolve_train_config({"data": "d.yaml", "lr_schedule": "cosine-restarts", "schedule.t0": "4"})
    assert config.schedule.t0 == 4.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 0}, "--batch-size: expected a positive number of images, or -1 for AutoBatch"),
        ({"batch_size": -2}, "--batch-size"),
        ({"epochs": 0}, "--epochs: expected a positive number"),
        ({"workers": -1}, "--workers"),
        ({"label_smoothing": 1.0}, "--label-smoothing"),
        ({"lr_schedule": "plateau", "noval": True}, "plateau .* cannot run with --noval"),
        ({"val_period": 0}, "--val-period: expected 1"),
        ({"val_imgsz": -1}, "--val-imgsz: expected a positive number, or 0"),
        ({"hyp": {"mosaic": 1.5}}, "hyp.mosaic: a probability"),
        ({"hyp": {"lr0": 0.0}}, "hyp.lr0 must be positive"),
        ({"hyp": {"ema_decay": 1.0}}, r"hyp.ema_decay must be in \[0, 1\)"),
        ({"hyp": {"ema_tau": 0.0}}, "hyp.ema_tau positive"),
        ({"freeze": (-1,)}, "--freeze"),
    ],
)
def test_refused_options_name_the_option(changes, message):
    with pytest.raises(ConfigError, match=message):
        check_train_config(resolve_train_config({"data": "d.yaml", **changes}))
    check_train_config(resolve_train_config({"data": "d.yaml", "batch_size": -1}))  # AutoBatch is allowed


def _saved_run(tmp_path, **changes):
    config = dataclasses.replace(TrainConfig(data="d.yaml", epochs=5, imgsz=64, batch_size=8), **changes)
    path = tmp_path / "runs" / "exp" / "weights" / "last.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint({"train_config": config_to_dict(config), "epoch": 2}, path)
    return path


def test_resume_takes_the_saved_config_and_allows_safe_flags(tmp_path):
    path = _saved_run(tmp_path, hyp=dataclasses.replace(TrainConfig().hyp, lr0=0.03))
    config = resolve_train_config({"resume": str(path), "epochs": 9, "batch_size": 4, "workers": 0, "imgsz": 64})
    assert config.resume == str(path)
    assert (config.data, config.imgsz, config.hyp.lr0) == ("d.yaml", 64, 0.03)  # saved values, imgsz unchanged
    assert (config.epochs, config.batch_size, config.workers) == (9, 4, 0)  # safe to change
    assert set(SAFE_RESUME_KEYS) == {
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
    }


def test_resume_of_a_finished_run_says_how_to_extend_it(tmp_path):
    path = _saved_run(tmp_path, epochs=3)  # epoch 2 saved: all 3 epochs done
    with pytest.raises(ConfigError, match=r"this run has finished \(3 of 3 epochs\); .* --resume .* --epochs 6"):
        resolve_train_config({"resume": str(path)})
    assert resolve_train_config({"resume": str(path), "epochs": 5}).epochs == 5  # more epochs: resumable


def test_resume_of_a_yolov5_checkpoint_says_what_it_is_and_how_to_train_from_it(yolov5n_weights, tmp_path):
    with pytest.raises(CheckpointError) as raised:
        resolve_train_config({"resume": str(yolov5n_weights)})
    assert str(raised.value) == (
        f"--resume {yolov5n_weights}: a YOLOv5 checkpoint; --resume continues runs of this trainer only. To train "
        f"from its weights: python train.py --weights {yolov5n_weights} --data <your data YAML>"
    )
    (tmp_path / "empty.pt").write_bytes(b"")  # neither ours nor YOLOv5's: the loader's own message
    with pytest.raises(CheckpointError, match=r"empty\.pt: not a detector checkpoint readable with weights_only"):
        resolve_train_config({"resume": str(tmp_path / "empty.pt")})


@pytest.mark.parametrize(
    ("flags", "flag"), [({"imgsz": 128}, "--imgsz"), ({"hyp": {"lr0": 0.5}}, "--hyp"), ({"cos_lr": True}, "--cos-lr")]
)
def test_resume_refuses_other_changes_naming_the_flag(tmp_path, flags, flag):
    path = _saved_run(tmp_path)
    with pytest.raises(ConfigError, match=f"{flag} cannot change when resuming"):
        resolve_train_config({"resume": str(path), **flags})


def test_bare_resume_finds_the_latest_last_pt(tmp_path):
    first = _saved_run(tmp_path)
    second = tmp_path / "runs" / "exp2" / "weights" / "last.pt"
    second.parent.mkdir(parents=True)
    second.write_bytes(first.read_bytes())
    assert find_last_checkpoint(tmp_path / "runs") == second
    config = resolve_train_config({"resume": "auto", "project": str(tmp_path / "runs")})
    assert config.resume == str(second)
    with pytest.raises(ConfigError, match=r"no last\.pt found"):
        find_last_checkpoint(tmp_path / "empty")


def test_resume_from_weights_without_training_state_is_refused(tmp_path):
    path = tmp_path / "w.pt"
    save_checkpoint({"model": {}}, path)
    with pytest.raises(CheckpointError, match="no training state"):
        resolve_train_config({"resume": str(path)})


# -- model helpers ----------------------------------------------------------------------------------------------------


def test_transfer_weights_copies_matching_names_and_shapes_only():
    torch.manual_seed(0)
    source, target = Layered(width=4), Layered(width=4)
    target.model[2] = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6))  # a different "head"
    state = source.state_dict()
    copied = transfer_weights(target, state)
    # layers 0 and 1: conv weight + bias + 5 BN entries each; of layer 2 (other shapes) only the BN's scalar
    # num_batches_tracked matches
    assert len(copied) == 2 * 7 + 1 and "model.2.1.num_batches_tracked" in copied
    assert torch.equal(target.model[0][0].weight, source.model[0][0].weight)
    assert not torch.equal(target.model[2][0].weight[:4], source.model[2][0].weight)
    assert len(transfer_weights(target, state, skip=("model.1.",))) == 7 + 1


def test_freeze_keeps_frozen_batchnorm_statistics_fixed():
    torch.manual_seed(0)
    model = Layered()
    assert frozen_layer_indices((2,)) == [0, 1] and frozen_layer_indices((0,)) == []
    assert frozen_layer_indices((4, 1)) == [1, 4]
    frozen = freeze_layers(model, frozen_layer_indices((2,)))
    assert [p.requires_grad for p in model.parameters()] == [False] * 8 + [True] * 4
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    set_train_mode(model, frozen)
    model(torch.randn(2, 3, 8, 8) * 5 + 3)  # a forward pass in training mode updates unfrozen BN statistics
    after = model.state_dict()
    for name, value in before.items():
        changed = not torch.equal(value, after[name])
        assert changed == name.startswith("model.2."), name
    assert model.training and not model.model[0].training and model.model[2].training


def test_a_freeze_that_leaves_nothing_to_train_is_refused():
    model = Layered()  # 3 layers with parameters
    for trains in [(2,), (0, 2), (1,)]:
        check_something_trains(model, trains)
    for nothing in [(3,), (100,), (0, 1, 2)]:
        with pytest.raises(ConfigError, match=r"--freeze .*: that freezes every layer with parameters .*0-2"):
            check_something_trains(model, nothing)


def test_random_image_size_is_a_stride_multiple_in_range():
    rng = np.random.default_rng(0)
    sizes = {random_image_size(320, 32, rng) for _ in range(300)}
    assert all(size % 32 == 0 for size in sizes)
    assert min(sizes) == 160 and max(sizes) == 480  # 0.5x .. 1.5x of 320


def test_resize_batch_scales_the_long_side_and_rounds_to_stride():
    images = torch.rand(2, 3, 320, 256)
    resized = resize_batch(images, 160, 32)
    assert resized.shape == (2, 3, 160, 128)
    assert resize_batch(images, 320, 32) is images
    odd = resize_batch(torch.rand(1, 3, 320, 200), 480, 32)  # 200 * 1.5 = 300 -> 320
    assert odd.shape == (1, 3, 480, 320)


def test_epoch_seed_depends_only_on_seed_and_epoch():
    assert epoch_seed(0, 3) == epoch_seed(0, 3)
    assert len({epoch_seed(0, e) for e in range(50)} | {epoch_seed(1, 3)}) == 51


# -- AMP ---------------------------------------------------------------------------------------------------------------


def cpuinfo_flags() -> set[str] | None:
    """The CPU's feature flags as Linux reports them (None elsewhere): an independent view of what torch detects."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def test_resolve_amp_modes():
    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) is None
    assert resolve_amp("bf16", cpu) == torch.bfloat16
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_amp("fp16", cpu)


def test_amp_auto_on_cpu_is_bf16_exactly_where_the_cpu_has_native_bf16(monkeypatch):
    flags = cpuinfo_flags()
    if flags is None:
        pytest.skip("needs /proc/cpuinfo")
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    native = bool({"avx512_bf16", "amx_tile"} & flags)
    assert cpu_has_native_bf16() == native
    assert resolve_amp("auto", torch.device("cpu")) == (torch.bfloat16 if native else None)


_ONEDNN_ISA_PROBE = """
import torch
from detector.utils.torch_utils import cpu_has_native_bf16
conv = torch.nn.Conv2d(64, 64, 3).to(memory_format=torch.channels_last)  # small ones skip oneDNN
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
    conv(torch.rand(1, 64, 64, 64).to(memory_format=torch.channels_last))
print("native:", cpu_has_native_bf16())
"""


@pytest.mark.parametrize("cap", ["", "AVX512_CORE_VNNI", "AVX2"])
def test_native_bf16_is_what_onednn_says_it_dispatches_under_an_isa_cap(cap):
    """oneDNN's own verbose line names the instruction set it dispatches to ("... with bfloat16 support" where it
    has native bf16); cpu_has_native_bf16 must agree with it, also when ONEDNN_MAX_CPU_ISA caps it."""
    env = {k: v for k, v in os.environ.items() if k not in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")}
    if cap:
        env["ONEDNN_MAX_CPU_ISA"] = cap
    result = subprocess.run(
        [sys.executable, "-c", _ONEDNN_ISA_PROBE], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    isa = [line for line in result.stdout.splitlines() if ",info,cpu,isa:" in line]
    if not isa:
        pytest.skip("this torch build prints no oneDNN ISA line")
    assert f"native: {'bfloat16' in isa[0]}" in result.stdout, (isa[0], result.stdout[-200:])


def test_amp_under_an_isa_cap_stays_fp32_and_the_warning_names_the_cap(monkeypatch, caplog):
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")  # oneDNN takes the value in any case
    assert resolve_amp("auto", torch.device("cpu")) is None
    with caplog.at_level("WARNING"):
        assert resolve_amp("bf16", torch.device("cpu")) == torch.bfloat16
    assert "capped at AVX2 (ONEDNN_MAX_CPU_ISA)" in caplog.text


class AutocastSensitive(nn.Module):
    """Gives garbage under autocast, as a broken AMP implementation would."""

    def forward(self, x):
        out = x.mean(dim=(2, 3), keepdim=True).flatten(1)
        return out * 1000 if torch.is_autocast_enabled("cpu") else out


def test_check_amp_passes_for_bf16_and_catches_wrong_results():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.Conv2d(8, 4, 3)).eval()
    assert check_amp(model, torch.device("cpu"), torch.bfloat16, imgsz=64)
    assert not check_amp(AutocastSensitive(), torch.device("cpu"), torch.bfloat16, imgsz=64)


# -- checkpoints ------------------------------------------------------------------------------------------------------


def test_strip_optimizer_keeps_fp32_weights(tmp_path):
    model = Layered()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(1, 3, 8, 8)).sum().backward()
    optimizer.step()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = tmp_path / "best.pt"
    save_checkpoint({"model": state, "ema": state, "optimizer": optimizer.state_dict(), "epoch": 3}, path)
    size = path.stat().st_size
    strip_optimizer(path, keep_model=False)
    stripped = load_checkpoint(path)
    assert stripped["optimizer"] is None and stripped["model"] is None and stripped["epoch"] == 3
    assert all(torch.equal(stripped["ema"][k], v) and v.dtype == stripped["ema"][k].dtype for k, v in state.items())
    assert path.stat().st_size < size


def _epoch_end(epoch: int, epochs: int = 10, *, patience: int = 2, **config) -> SimpleNamespace:
    """What the epoch-end hooks read of a trainer, at the end of ``epoch``."""
    stops: list[str] = []
    return SimpleNamespace(
        config=TrainConfig(patience=patience, **config),
        state=TrainState(epochs=epochs, epoch=epoch),
        is_main=True,
        stops=stops,
        request_stop=stops.append,
    )


@pytest.mark.parametrize(
    ("options", "validated"),
    [
        ({}, list(range(10))),
        ({"val_period": 3}, [2, 5, 8, 9]),  # every third epoch and the last
        ({"val_period": 20}, [9]),
        ({"noval": True, "val_period": 3}, [9]),
    ],
)
def test_validation_due_every_val_period_epochs_and_the_last(options, validated):
    assert [epoch for epoch in range(10) if validation_due(_epoch_end(epoch, **options))] == validated


def test_best_epoch_and_early_stopping_only_move_on_validated_epochs():
    state = TrainState(epochs=10)
    fitnesses = [None, 0.0, None, 0.0, None, None]  # --val-period 2 on a model that scores 0 (ties count)
    best = []
    for epoch, fitness in enumerate(fitnesses):
        state.epoch, state.fitness = epoch, fitness
        if fitness is not None:
            state.metrics = object()  # record_validation's
        state.update_best()
        best.append(state.best_epoch)
    assert best == [0, 1, 1, 3, 3, 3]  # before any validation an epoch counts as 0; after, never as the best

    trainer = _epoch_end(5, patience=2)  # best at 3: two epochs without improvement, but 5 was not validated
    trainer.state.best_epoch, trainer.state.fitness = 3, None
    EarlyStopping().on_epoch_end(trainer)
    assert trainer.stops == []
    trainer.state.fitness = 0.1  # validated
    EarlyStopping().on_epoch_end(trainer)
    assert len(trainer.stops) == 1
    assert "no improvement in the last 2 epochs; best results at epoch 3" in trainer.stops[0]


@pytest.mark.parametrize("saved", [True, False])
def test_a_killed_loader_worker_ends_training_with_one_line_naming_the_cause_and_the_resume(tmp_path, saved):
    """torch's RuntimeError from a really killed worker becomes a LoaderWorkerError (the CLI prints it as one line)
    with the likely cause and, when an epoch was saved, the command that continues the run."""
    last = tmp_path / "last.pt"
    if saved:
        last.write_bytes(b"")
    trainer = SimpleNamespace(checkpointer=SimpleNamespace(last=last))
    loader = loader_whose_worker_dies()
    with pytest.raises(LoaderWorkerError) as raised, Trainer._loader_worker_deaths_explained(trainer):
        next(iter(loader))
    message = str(raised.value)
    assert message.startswith("DataLoader worker (pid")  # torch's own words: "is killed by signal: Killed." or
    assert "out-of-memory killer" in message and "try fewer --workers" in message  # "exited unexpectedly"
    assert (f"python train.py --resume {last}" in message) == saved and ("no epoch was saved" in message) != saved
    assert "\n" not in message

    # other errors pass through unchanged
    with pytest.raises(RuntimeError, match="another failure"), Trainer._loader_worker_deaths_explained(trainer):
        raise RuntimeError("another failure")
