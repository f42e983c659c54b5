"""Training curves as PNG files in the run folder, for a user without W&B or TensorBoard.

After each validation and when training ends, ``TrainingCurves`` redraws from the CSV logger's
metrics.csv: ``loss.png`` (train/loss and its running mean), ``lr.png`` (train/lr and any
LearningRateMonitor columns) and ``val.png`` (val/mIoU, val/mAcc, val/aAcc in percent), each
against the optimizer step.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.figure import Figure

from segformer.inference.pictures import new_figure, save_figure

VAL_SCORES = ("val/mIoU", "val/mAcc", "val/aAcc")


def read_columns(path: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """metrics.csv as {column: (steps, values)}, keeping only the rows where the column has a
    value (the CSV logger writes one sparse row per logging call)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        step = row.get("step")
        for key, value in row.items():
            if key in ("step", "epoch") or not value or not step:
                continue
            steps, values = columns.setdefault(key, ([], []))
            steps.append(int(float(step)))
            values.append(float(value))
    return {key: (np.asarray(s), np.asarray(v)) for key, (s, v) in columns.items()}


def running_mean(values: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    totals = np.cumsum(np.concatenate([[0.0], values]))
    index = np.arange(1, len(values) + 1)
    start = np.maximum(index - window, 0)
    return (totals[index] - totals[start]) / (index - start)


def _figure(
    series: Mapping[str, tuple[np.ndarray, np.ndarray]],
    title: str,
    ylabel: str,
    smoothing: int = 0,
    markers: bool = False,
) -> Figure:
    figure = new_figure(7.0, 4.0)
    axes = figure.add_subplot()
    for label, (steps, values) in series.items():
        if smoothing > 1 and len(values) > smoothing:
            line = axes.plot(steps, values, alpha=0.3, linewidth=0.8)[0]
            mean = running_mean(values, smoothing)
            axes.plot(steps, mean, color=line.get_color(), label=f"{label} (mean of {smoothing} steps)")
        else:
            axes.plot(steps, values, marker="o" if markers else None, markersize=4, label=label)
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("step")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    return figure


def curve_figures(columns: Mapping[str, tuple[np.ndarray, np.ndarray]], smoothing: int = 20) -> dict[str, Figure]:
    """{"loss", "lr", "val"}: figures of ``read_columns``' output; one whose columns have no
    values yet is left out."""
    figures = {}
    if "train/loss" in columns:
        figures["loss"] = _figure({"train/loss": columns["train/loss"]}, "Training loss", "loss", smoothing)
    rates = {key: columns[key] for key in sorted(columns) if key == "train/lr" or key.startswith("lr-")}
    if rates:
        figures["lr"] = _figure(rates, "Learning rate", "learning rate")
    scores = {key: (columns[key][0], 100 * columns[key][1]) for key in VAL_SCORES if key in columns}
    if scores:
        title = "Validation scores"
        if "val/mIoU" in scores:
            steps, values = scores["val/mIoU"]
            best = int(np.argmax(values))
            title += f" (best mIoU {values[best]:.2f} at step {steps[best]})"
        figures["val"] = _figure(scores, title, "%", markers=True)
    return figures


def plot_curves(
    columns: Mapping[str, tuple[np.ndarray, np.ndarray]], directory: str | Path, smoothing: int = 20
) -> list[Path]:
    """``curve_figures`` as ``directory/<name>.png``, each written beside its place and moved
    in, so a reader never sees half a file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in curve_figures(columns, smoothing).items():
        path, partial = directory / f"{name}.png", directory / f".{name}.png.partial"
        save_figure(figure, partial)
        os.replace(partial, path)
        written.append(path)
    return written


class TrainingCurves(Callback):
    """Redraws ``plot_curves`` into ``dirpath`` after each validation (not the sanity check) and
    at the end of training, on rank 0, from the first CSVLogger's metrics.csv (flushed first).

    Without a CSV logger it does nothing, and says so once.
    """

    def __init__(self, dirpath: str | Path, smoothing: int = 20) -> None:
        self.dirpath = Path(dirpath)
        self.smoothing = int(smoothing)
        self._told = False

    def _csv_logger(self, loggers: Sequence[object]) -> CSVLogger | None:
        found = next((logger for logger in loggers if isinstance(logger, CSVLogger)), None)
        if found is None and not self._told:
            rank_zero_info("TrainingCurves: no CSV logger (logger=csv or logger=many): no training curves drawn.")
            self._told = True
        return found

    def draw(self, trainer: Trainer) -> list[Path]:
        logger = self._csv_logger(trainer.loggers)
        if logger is None or not trainer.is_global_zero:
            return []
        logger.save()
        path = Path(logger.experiment.metrics_file_path)
        if not path.is_file():
            return []
        return plot_curves(read_columns(path), self.dirpath, self.smoothing)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.draw(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.draw(trainer)
