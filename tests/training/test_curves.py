"""Training curves: metrics.csv read column by column, the loss / lr / validation pictures, and
the callback that redraws them into the run folder (nothing without a CSV logger)."""

import logging
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import ROOT, load_script, tiny_sample_overrides
from lightning.pytorch.loggers import CSVLogger
from PIL import Image

from segformer import cli
from segformer.training.curves import (
    TrainingCurves,
    curve_figures,
    read_columns,
    running_mean,
)


def _logged(tmp_path, steps=30):
    """A CSVLogger holding what a run logs: loss and lr every step, scores at two validations."""
    logger = CSVLogger(tmp_path, name="csv", version="")
    for step in range(steps):
        logger.log_metrics({"train/loss": 2.0 - step / steps, "train/lr": 1e-4 * (1 - step / steps)}, step=step)
        logger.log_metrics({"lr-AdamW/pg1": 1e-3 * (1 - step / steps)}, step=step)
    logger.log_metrics({"val/mIoU": 0.25, "val/mAcc": 0.4, "val/aAcc": 0.6}, step=14)
    logger.log_metrics({"val/mIoU": 0.5, "val/mAcc": 0.6, "val/aAcc": 0.8}, step=29)
    return logger


def _trainer(loggers):
    return SimpleNamespace(loggers=loggers, is_global_zero=True, sanity_checking=False)


def test_running_mean_averages_the_last_values():
    np.testing.assert_allclose(running_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1, 2, 4, 6])
    np.testing.assert_allclose(running_mean(np.array([2.0, 4.0]), 5), [2, 3])


def test_columns_keep_only_the_rows_with_values(tmp_path):
    logger = _logged(tmp_path)
    logger.save()
    columns = read_columns(logger.experiment.metrics_file_path)
    steps, values = columns["val/mIoU"]
    assert steps.tolist() == [14, 29] and values.tolist() == [0.25, 0.5]
    assert columns["train/loss"][0].tolist() == list(range(30))
    assert "step" not in columns and "epoch" not in columns


def test_figures_plot_every_series_against_the_step(tmp_path):
    logger = _logged(tmp_path)
    logger.save()
    figures = curve_figures(read_columns(logger.experiment.metrics_file_path), smoothing=10)
    assert set(figures) == {"loss", "lr", "val"}
    (loss_axes,) = figures["loss"].axes
    raw, mean = loss_axes.lines  # the loss and its running mean over 10 steps
    np.testing.assert_allclose(mean.get_ydata(), running_mean(raw.get_ydata(), 10))
    assert [t.get_text() for t in figures["lr"].axes[0].get_legend().get_texts()] == ["lr-AdamW/pg1", "train/lr"]
    val_axes = figures["val"].axes[0]
    assert [line.get_label() for line in val_axes.lines] == ["val/mIoU", "val/mAcc", "val/aAcc"]
    np.testing.assert_allclose(val_axes.lines[0].get_ydata(), [25, 50])  # percent
    assert "best mIoU 50.00 at step 29" in val_axes.get_title()
    # Before any validation there is no val picture.
    columns = read_columns(logger.experiment.metrics_file_path)
    assert set(curve_figures({k: v for k, v in columns.items() if not k.startswith("val")})) == {"loss", "lr"}


def test_callback_flushes_the_csv_logger_and_writes_the_pictures(tmp_path):
    logger = _logged(tmp_path)  # nothing flushed to metrics.csv yet
    callback = TrainingCurves(tmp_path / "plots", smoothing=10)
    callback.on_validation_end(_trainer([logger]), None)
    for name in ("loss", "lr", "val"):
        assert Image.open(tmp_path / "plots" / f"{name}.png").size == (700, 400)
    assert not list((tmp_path / "plots").glob(".*"))  # no partial files left


def test_callback_without_a_csv_logger_says_so_once_and_writes_nothing(tmp_path, caplog):
    callback = TrainingCurves(tmp_path / "plots")
    with caplog.at_level(logging.INFO):
        callback.on_validation_end(_trainer([]), None)
        callback.on_train_end(_trainer([]), None)
    assert sum("no CSV logger" in record.getMessage() for record in caplog.records) == 1
    assert not (tmp_path / "plots").exists()


def test_sanity_check_draws_nothing(tmp_path):
    sanity_check = SimpleNamespace(loggers=[_logged(tmp_path)], is_global_zero=True, sanity_checking=True)
    TrainingCurves(tmp_path / "plots").on_validation_end(sanity_check, None)
    assert not (tmp_path / "plots").exists()


@pytest.mark.slow
def test_a_training_run_writes_its_curves_into_the_run_folder(tmp_path):
    overrides = [
        *tiny_sample_overrides(tmp_path / "sample", num_train=4, num_val=2),
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
    ]
    cfg = cli.compose(ROOT / "configs", "train", overrides, run_dir=tmp_path / "run")
    load_script("train").train(cfg)
    plots = tmp_path / "run" / "plots"
    assert sorted(p.name for p in plots.iterdir()) == ["loss.png", "lr.png", "val.png"]
    columns = read_columns(tmp_path / "run" / "csv" / "metrics.csv")
    assert len(columns["val/mIoU"][0]) == 2 and len(columns["train/loss"][0]) == 4
