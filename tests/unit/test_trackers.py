"""--logger trackers: a tiny real training run logged to a local MLflow file store and an offline W&B run, read
back through MLflow's client and wandb's own log reader; resume, a crashed run, unknown names, missing packages."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from tiny_runs import make_tiny, tiny_config

from detector.cli.common import given_flags
from detector.cli.train import build_parser
from detector.config import TrainConfig, resolve_train_config
from detector.engine.callbacks import EpochRecord
from detector.engine.trackers import MLflowLogger, WandbLogger, build_loggers, check_loggers
from detector.engine.trainer import Trainer
from detector.errors import ConfigError

EPOCHS = 2


def mlflow_env(monkeypatch: pytest.MonkeyPatch, root: Path) -> Any:
    """MLflow's client of a local file store under ``root``, which the trackers of this process and its children
    use too (MLflow 3 asks for MLFLOW_ALLOW_FILE_STORE to use one). mlflow is first imported here, after telemetry
    is turned off: no network, nothing written in ~."""
    uri = (root / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    tracking = pytest.importorskip("mlflow.tracking", reason="the dev extra installs mlflow-skinny")
    return tracking.MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """One real 2-epoch run of a tiny model with ``--logger mlflow,wandb`` (offline), plots on."""
    root = tmp_path_factory.mktemp("tracked")
    tiny = make_tiny(root, num_train=4, num_val=2)
    config = tiny_config(tiny, root, epochs=EPOCHS, batch_size=4, noplots=False, logger=("mlflow", "wandb"))
    wandb = pytest.importorskip("wandb", reason="the dev extra installs wandb")
    with pytest.MonkeyPatch.context() as monkeypatch:
        mlflow_env(monkeypatch, root)
        for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):  # nothing in ~
            monkeypatch.setenv(name, str(root / "wandb-files"))
        monkeypatch.setenv("WANDB_MODE", "offline")
        monkeypatch.delenv("WANDB_PROJECT", raising=False)
        trainer = Trainer(config)
        trainer.fit()
        wandb.teardown()  # stop wandb's service process
    with open(trainer.save_dir / "results.csv", newline="", encoding="utf-8") as f:
        rows = [{key.strip(): float(value) for key, value in row.items()} for row in csv.DictReader(f)]
    return SimpleNamespace(trainer=trainer, root=root, rows=rows, wandb_dir=root / "wandb-files")


def test_mlflow_run_holds_the_config_every_results_column_per_epoch_and_the_artifacts(
    tracked_run, monkeypatch, tmp_path
):
    trainer, rows = tracked_run.trainer, tracked_run.rows
    client = mlflow_env(monkeypatch, tracked_run.root)
    run_id = (trainer.save_dir / "mlflow_run_id.txt").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == trainer.save_dir.name
    assert client.get_experiment(run.info.experiment_id).name == "runs"  # the --project folder's name
    params = run.data.params
    assert params["hyp.lr0"] == str(trainer.config.hyp.lr0) and params["hyp.mosaic"] == str(trainer.config.hyp.mosaic)
    assert params["epochs"] == str(EPOCHS) and params["imgsz"] == "64" and params["logger"] == "['mlflow', 'wandb']"

    assert [row["epoch"] for row in rows] == list(range(EPOCHS))
    columns = [column for column in rows[0] if column != "epoch"]
    assert "metrics/mAP_0.5:0.95" in columns and set(run.data.metrics) >= {"metrics/mAP_0.5-0.95", "x/lr0"}
    for column in columns:
        history = client.get_metric_history(run_id, column.replace(":", "-"))
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(EPOCHS)), column
        logged = [m.value for m in sorted(history, key=lambda m: m.step)]
        assert logged == pytest.approx([row[column] for row in rows], rel=1e-5, abs=1e-12), column  # CSV: 6 digits

    assert {"results.png", "results.csv", "confusion_matrix.png"} <= {a.path for a in client.list_artifacts(run_id)}
    assert {a.path for a in client.list_artifacts(run_id, "weights")} == {"weights/best.pt", "weights/last.pt"}
    downloaded = Path(client.download_artifacts(run_id, "weights/best.pt", str(tmp_path)))
    assert downloaded.read_bytes() == (trainer.save_dir / "weights" / "best.pt").read_bytes()  # the final, stripped one
    assert not list(trainer.save_dir.glob("events.out.tfevents*"))  # TensorBoard was not asked for


def test_wandb_offline_run_holds_the_config_metrics_per_epoch_images_and_best_pt(tracked_run):
    trainer, rows = tracked_run.trainer, tracked_run.rows
    run_id = (trainer.save_dir / "wandb_run_id.txt").read_text().strip()
    (log,) = tracked_run.wandb_dir.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    inspected = subprocess.run(  # wandb's own reader of its offline transaction log
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
        capture_output=True,
        text=True,
        check=True,
    )
    records = [json.loads(line) for line in inspected.stdout.splitlines() if line.strip()]
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "runs" and run["display_name"] == trainer.save_dir.name
    assert run["config"]["update"]["hyp"]["lr0"] == trainer.config.hyp.lr0

    history: dict[int, dict] = {}  # step -> every value logged at that step
    for record in records:
        if record["type"] == "history":
            step = int(record["history"].get("step", {}).get("num", 0))
            history.setdefault(step, {}).update(record["history"]["item"])
    assert sorted(history) == list(range(EPOCHS))
    for row in rows:
        logged = history[int(row["epoch"])]
        for column, value in row.items():
            if column != "epoch":
                assert logged[column] == pytest.approx(value, rel=1e-5, abs=1e-12), column
    assert history[EPOCHS - 1]["Results/results._type"] == "image-file"  # the plots, at the last epoch's step
    (artifact,) = [r["artifact"] for r in records if r["type"] == "artifact"]
    assert [entry["path"] for entry in artifact["manifest"]["contents"]] == ["best.pt"]
    assert [r["exit"].get("exit_code", 0) for r in records if r["type"] == "exit"] == [0]


def fake_trainer(save_dir: Path, resume: str = "") -> SimpleNamespace:
    """What MLflowLogger reads of a trainer, for the runs that need no training."""
    save_dir.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(
        save_dir=save_dir,
        is_main=True,
        config=TrainConfig(project=str(save_dir.parent), resume=resume),
        checkpointer=SimpleNamespace(best=save_dir / "weights" / "best.pt", last=save_dir / "weights" / "last.pt"),
        epoch_record=None,
    )


def log_epoch(tracker: MLflowLogger, trainer: SimpleNamespace, epoch: int) -> None:
    trainer.epoch_record = EpochRecord(epoch=epoch, train_losses={"box": 1.0 / (epoch + 1)}, map50=0.1 * epoch)
    tracker.on_epoch_end(trainer)


def test_mlflow_resume_continues_the_same_run(monkeypatch, tmp_path):
    client = mlflow_env(monkeypatch, tmp_path)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "my-experiment")
    save_dir = tmp_path / "runs" / "exp"
    first, tracker = fake_trainer(save_dir), MLflowLogger()
    tracker.on_fit_start(first)
    log_epoch(tracker, first, 0)
    tracker.on_fit_end(first)
    resumed, tracker = fake_trainer(save_dir, resume=str(save_dir / "weights" / "last.pt")), MLflowLogger()
    tracker.on_fit_start(resumed)
    log_epoch(tracker, resumed, 1)
    tracker.on_fit_end(resumed)

    experiment = client.get_experiment_by_name("my-experiment")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "exp"
    history = sorted(client.get_metric_history(run.info.run_id, "train/box_loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (1, 0.5)]


def test_a_process_that_dies_during_training_leaves_its_mlflow_run_failed(monkeypatch, tmp_path):
    client = mlflow_env(monkeypatch, tmp_path)
    save_dir = tmp_path / "runs" / "exp"
    save_dir.mkdir(parents=True)
    script = f"""
from types import SimpleNamespace
from detector.config import TrainConfig
from detector.engine.callbacks import EpochRecord
from detector.engine.trackers import MLflowLogger
config = TrainConfig(project={str(save_dir.parent)!r})
trainer = SimpleNamespace(save_dir={str(save_dir)!r}, is_main=True, config=config)
tracker = MLflowLogger()
tracker.on_fit_start(trainer)
trainer.epoch_record = EpochRecord(epoch=0, train_losses={{"box": 1.0}}, map50=0.25)
tracker.on_epoch_end(trainer)
raise RuntimeError("the loss diverged")
"""
    died = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert died.returncode == 1 and "the loss diverged" in died.stderr, died.stderr
    run = client.get_run((save_dir / "mlflow_run_id.txt").read_text().strip())
    assert run.info.status == "FAILED" and run.data.metrics["metrics/mAP_0.5"] == 0.25


def test_logger_flag_takes_comma_separated_names_and_defaults_to_tensorboard():
    from detector.engine.loggers import TensorBoardLogger

    assert TrainConfig().logger == ("tensorboard",)
    flags = given_flags(build_parser(), ["--logger", "tensorboard,mlflow"])
    assert resolve_train_config(flags).logger == ("tensorboard", "mlflow")
    none = resolve_train_config(given_flags(build_parser(), ["--logger", ""])).logger
    assert build_loggers(none) == []  # only the console, results.csv and plots
    trackers = build_loggers(["wandb", "tensorboard", "wandb"])
    assert [type(tracker) for tracker in trackers] == [WandbLogger, TensorBoardLogger]


def test_an_unknown_logger_is_refused_with_a_suggestion_before_anything_is_written(tmp_path):
    with pytest.raises(ConfigError, match=r"^--logger: unknown logger 'mlfow'; did you mean 'mlflow'\?"):
        check_loggers(["tensorboard", "mlfow"])
    with pytest.raises(ConfigError, match="unknown logger 'tensorbord'"):
        Trainer(TrainConfig(project=str(tmp_path / "runs"), logger=("tensorbord",)))
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("package", ["mlflow", "wandb"])
def test_a_missing_tracker_package_is_named_in_one_line_before_anything_is_written(monkeypatch, tmp_path, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now fails as if it were not installed
    message = f"--logger {package} needs {package}: pip install 'detector[tracking]' (or pip install {package})"
    with pytest.raises(ConfigError) as refused:
        Trainer(TrainConfig(project=str(tmp_path / "runs"), logger=("tensorboard", package)))
    assert str(refused.value) == message
    assert not (tmp_path / "runs").exists()
