"""``detector benchmarks``: every deployment format of one model, exported, validated and timed on this machine.

YOLOv5's ``benchmarks.py`` for this project: the ``.pt`` is validated as it is, then each format of ``--include``
is exported by :class:`~detector.export.Exporter` (``--dynamic``, so each file is validated on the same
rectangular batches as the ``.pt`` and any difference in mAP is the format's own) and validated by
:func:`~detector.engine.validator.run_validation`, the code val.py runs. A format that cannot be exported here
(a runtime not installed, TensorRT without CUDA) or fails its export check gets a row saying why, and the others
go on (``--hard-fail`` stops instead). The table goes to the log and to ``benchmarks.csv`` / ``benchmarks.md`` in
``runs/benchmarks/exp*``.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from detector.config import BenchmarkConfig, ExportConfig, ValConfig, build_config
from detector.errors import ConfigError, DetectorError
from detector.utils.files import file_size_mb, increment_path

if TYPE_CHECKING:
    from detector.ops.metrics import Metrics

LOGGER = logging.getLogger(__name__)

COLUMNS = ("format", "precision", "size_mb", "map50", "map50_95", "inference_ms", "export_s", "status")


@dataclass(frozen=True)
class BenchmarkRow:
    """One format's figures; ``status`` is "ok" or why it has none."""

    format: str
    precision: str = ""
    size_mb: float = 0.0
    map50: float = 0.0
    map50_95: float = 0.0
    inference_ms: float = 0.0  # per image, at the benchmark's batch size
    export_s: float = 0.0
    status: str = "ok"


def benchmarks(weights: str | Path, **options: Any) -> list[BenchmarkRow]:
    """Python API: ``detector.benchmarks("best.pt", data="my.yaml", imgsz=640)`` -> the table's rows; ``options`` are
    BenchmarkConfig fields (the command's flags with underscores)."""
    from detector.utils.logging import setup_logging

    setup_logging()  # the same console output as the command (idempotent)
    config = build_config(BenchmarkConfig, ("detector.benchmarks()", {**options, "weights": str(weights)}))
    return run_benchmarks(config)[0]


def run_benchmarks(config: BenchmarkConfig) -> tuple[list[BenchmarkRow], Path]:
    """The rows (the ``.pt`` first, then ``config.include`` in order) and the run folder they were written to."""
    from detector.engine.validator import run_validation
    from detector.export.base import format_for_include
    from detector.models.release import resolve_release_weights

    if not config.weights:
        raise ConfigError("--weights is required: the .pt to export and benchmark")
    weights = resolve_release_weights(config.weights)
    if weights.suffix.lower() not in (".pt", ".pth"):
        raise ConfigError(f"--weights {weights}: benchmarks start from a .pt checkpoint, which every format is made of")
    if not weights.is_file():
        raise ConfigError(f"--weights {weights}: weights file not found")
    for name in config.include:
        format_for_include(name)  # an unknown format is an error before anything runs
    if config.data:
        from detector.data.dataset_config import load_dataset_config

        load_dataset_config(config.data)  # a wrong --data too
    save_dir = increment_path(Path(config.project) / config.name, exist_ok=config.exist_ok)
    val = ValConfig(
        data=config.data,
        imgsz=config.imgsz,
        batch_size=config.batch_size,
        device=config.device,
        project=str(save_dir / "val"),
        exist_ok=True,
    )
    # the reference row: its failure (a wrong --data, a bad --imgsz) is the options' fault, so it stops the run
    metrics = run_validation(dataclasses.replace(val, weights=str(weights), name="pytorch"), plots=False)
    rows = [_row_with(BenchmarkRow("PyTorch", "fp32", file_size_mb(weights)), metrics)]
    for name in config.include:
        rows.append(_export_and_validate(name, weights, config, save_dir, val))
        if config.hard_fail and rows[-1].status != "ok":
            raise ConfigError(f"{rows[-1].format}: {rows[-1].status} (--hard-fail)")
    _write_tables(rows, save_dir)
    LOGGER.info("Benchmarks of %s at %d, batch %d:\n%s", weights, config.imgsz, config.batch_size, markdown(rows))
    LOGGER.info("Results saved to %s", save_dir)
    return rows, save_dir


def _export_and_validate(
    name: str, weights: Path, config: BenchmarkConfig, save_dir: Path, val: ValConfig
) -> BenchmarkRow:
    from detector.export import Exporter
    from detector.export.base import format_for_include

    title = format_for_include(name).title
    export = ExportConfig(
        weights=str(weights),
        imgsz=(config.imgsz, config.imgsz),
        batch_size=config.batch_size,
        device=config.device,
        half=config.half,
        int8=config.int8,
        dynamic=True,
        data=config.data,
        include=(name,),
        project=str(save_dir),
        name=f"export-{name}",
        exist_ok=True,
    )
    try:
        (result,) = Exporter(export).run()
    except DetectorError as e:  # a skipped format ("nothing exported: X skipped (why)") or a failed export
        return BenchmarkRow(title, status=str(e).removeprefix("nothing exported: "))
    row = BenchmarkRow(title, result.precision, result.size_mb, export_s=result.seconds)
    # run as val.py --half runs the file: an OpenVINO IR then computes in bf16 on a CPU with native bf16
    return _validated(row, result.path, dataclasses.replace(val, half=config.half), name)


def _validated(row: BenchmarkRow, weights: Path | None, val: ValConfig, label: str) -> BenchmarkRow:
    from detector.engine.validator import run_validation

    try:
        metrics = run_validation(dataclasses.replace(val, weights=str(weights), name=label), plots=False)
    except DetectorError as e:
        return dataclasses.replace(row, status=f"not validated: {e}")
    return _row_with(row, metrics)


def _row_with(row: BenchmarkRow, metrics: Metrics) -> BenchmarkRow:
    return dataclasses.replace(row, map50=metrics.map50, map50_95=metrics.map, inference_ms=metrics.speed.inference)


def markdown(rows: list[BenchmarkRow]) -> str:
    """The rows as a Markdown table."""
    lines = [
        "| format | precision | size (MB) | mAP50 | mAP50-95 | inference (ms/img) | export (s) | status |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        size = f"{r.size_mb:.1f}" if r.size_mb else ""
        export = f"{r.export_s:.1f}" if r.export_s else ""
        figures = f"{r.map50:.4f} | {r.map50_95:.4f} | {r.inference_ms:.1f}" if r.status == "ok" else " |  | "
        lines.append(f"| {r.format} | {r.precision} | {size} | {figures} | {export} | {r.status} |")
    return "\n".join(lines)


def _write_tables(rows: list[BenchmarkRow], save_dir: Path) -> None:
    save_dir.mkdir(parents=True, exist_ok=True)
    with open(save_dir / "benchmarks.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for r in rows:
            writer.writerow([getattr(r, column) for column in COLUMNS])
    (save_dir / "benchmarks.md").write_text(markdown(rows) + "\n", encoding="utf-8")
