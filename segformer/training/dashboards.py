"""Dashboard callbacks: what each validation looked like and a progress bar over the whole run;
how fast training runs is Lightning's ThroughputMonitor (with ``batch_images``), GPU memory its
DeviceStatsMonitor (configs/callbacks/dashboard.yaml).

Each logger gets what it can show: W&B images with prediction and ground-truth masks (class
names on hover), a per-class table, the per-class IoU chart and the confusion matrix
(``inference.pictures``); TensorBoard the overlays, the same two charts and a per-class text
table; CSV one column per class (val/IoU/<class>).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from PIL import Image, ImageDraw
from torch import Tensor

from segformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from segformer.inference.pictures import (
    batch_samples,
    confusion_matrix_figure,
    figure_to_array,
    make_palette,
    overlay,
    per_class_iou_figure,
)
from segformer.inference.report import per_class_table


def _logged_step(trainer: Trainer) -> int:
    # The step number Lightning's own logging uses at this point, so rows and x-axes line up.
    return int(getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step))


class ValidationDashboard(Callback):
    """After each validation (not the sanity check): ``num_images`` validation images of rank 0
    with their predicted and ground-truth masks, the per-class IoU / Acc and the confusion matrix.

    Reads the scores from ``pl_module.val_results`` (summed over all ranks), class names from
    ``pl_module.class_names`` and colours from the data module's palette.
    """

    def __init__(self, num_images: int = 4, confusion_matrix: bool = True, alpha: float = 0.5) -> None:
        self.num_images = num_images
        self.confusion_matrix = confusion_matrix
        self.alpha = alpha
        self._samples: list[dict[str, Any]] = []

    def _active(self, trainer: Trainer) -> bool:
        return bool(trainer.loggers) and not trainer.sanity_checking and trainer.is_global_zero

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._samples = []

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Mapping[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._active(trainer) or len(self._samples) >= self.num_images or not outputs:
            return
        hparams = getattr(trainer.datamodule, "hparams", {}) or {}
        mean, std = hparams.get("mean", IMAGENET_MEAN), hparams.get("std", IMAGENET_STD)
        self._samples += batch_samples(batch, outputs, mean, std, self.num_images - len(self._samples))

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        results: Mapping[str, Tensor] = getattr(pl_module, "val_results", {})
        if not self._active(trainer) or not results:
            return
        names = list(pl_module.class_names)
        palette = make_palette(len(names), getattr(trainer.datamodule, "palette", None))
        step = _logged_step(trainer)
        showing = any(isinstance(logger, (WandbLogger, TensorBoardLogger)) for logger in trainer.loggers)
        charts = self._charts(results, names) if showing else {}
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                self._to_wandb(logger, results, names, charts, step)
            elif isinstance(logger, TensorBoardLogger):
                self._to_tensorboard(logger, results, names, palette, charts, trainer.global_step)
            elif isinstance(logger, CSVLogger):
                self._to_columns(logger, results, names, step)
        self._samples = []

    def _per_class(self, results: Mapping[str, Tensor], names: Sequence[str]) -> list[list[Any]]:
        def value(x: Tensor) -> float | None:
            number = float(x)
            return None if np.isnan(number) else round(number, 6)

        return [[name, value(iou), value(acc)] for name, iou, acc in zip(names, results["IoU"], results["Acc"])]

    def _charts(self, results: Mapping[str, Tensor], names: list[str]) -> dict[str, np.ndarray]:
        # Drawn once per validation, whichever loggers show them.
        charts = {"val/per_class_iou": figure_to_array(per_class_iou_figure(results, names))}
        if self.confusion_matrix:
            matrix = confusion_matrix_figure(results["confusion_matrix"], names)
            charts["val/confusion_matrix"] = figure_to_array(matrix)
        return charts

    def _to_wandb(
        self,
        logger: WandbLogger,
        results: Mapping[str, Tensor],
        names: list[str],
        charts: Mapping[str, np.ndarray],
        step: int,
    ) -> None:
        class_labels = {i: name for i, name in enumerate(names)}
        if self._samples:
            masks = [
                {
                    "predictions": {"mask_data": s["pred"], "class_labels": class_labels},
                    "ground_truth": {"mask_data": s["labels"], "class_labels": {**class_labels, 255: "ignore"}},
                }
                for s in self._samples
            ]
            logger.log_image(
                "val/predictions",
                [s["image"] for s in self._samples],
                step=step,
                masks=masks,
                caption=[s["name"] for s in self._samples],
            )
        rows = self._per_class(results, names)
        logger.log_table("val/per_class", columns=["class", "IoU", "Acc"], data=rows, step=step)
        for tag, image in charts.items():
            logger.log_image(tag, [image], step=step)

    def _to_tensorboard(
        self,
        logger: TensorBoardLogger,
        results: Mapping[str, Tensor],
        names: list[str],
        palette: np.ndarray,
        charts: Mapping[str, np.ndarray],
        step: int,
    ) -> None:
        writer = logger.experiment
        for s in self._samples:
            # image | ground truth over image | prediction over image
            panel = np.concatenate(
                [
                    s["image"],
                    overlay(s["image"], s["labels"], palette, self.alpha),
                    overlay(s["image"], s["pred"], palette, self.alpha),
                ],
                axis=1,
            )
            writer.add_image(f"val/predictions/{s['name']}", panel, step, dataformats="HWC")
        if self._samples:
            writer.add_image("val/legend", _legend(names, palette), step, dataformats="HWC")
        writer.add_text("val/per_class", per_class_table(results, names), step)
        for tag, image in charts.items():
            writer.add_image(tag, image, step, dataformats="HWC")

    def _to_columns(self, logger: Logger, results: Mapping[str, Tensor], names: list[str], step: int) -> None:
        metrics = {f"val/IoU/{name}": iou for name, iou, _ in self._per_class(results, names) if iou is not None}
        if metrics:
            logger.log_metrics(metrics, step=step)


def _legend(names: Sequence[str], palette: np.ndarray) -> np.ndarray:
    """One colour swatch per class, stacked, for reading the TensorBoard overlays."""
    height = 14
    image = Image.new("RGB", (220, height * len(names)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for i, name in enumerate(names):
        draw.rectangle([2, i * height + 2, 14, i * height + height - 2], fill=tuple(int(c) for c in palette[i]))
        draw.text((20, i * height + 1), name, fill=(0, 0, 0))
    return np.asarray(image)


def batch_images(batch: Mapping[str, Tensor]) -> int:
    """Images in a training or evaluation batch: ThroughputMonitor's ``batch_size_fn``."""
    return int(batch["pixel_values"].shape[0])


class StepProgressBar(RichProgressBar):
    """Rich progress bar whose training bar counts optimizer steps up to ``trainer.max_steps``,
    with elapsed and remaining time for the whole run, instead of restarting every epoch (training
    here is iteration-based and spans many epochs). Validation and test bars are Rich's own.

    Rich's bar does its work (tasks, metrics, refreshes); this one only sets the training task's
    total, position and name afterwards, through the public ``progress`` and task id.
    """

    def _by_steps(self) -> bool:
        return self.trainer.max_steps is not None and self.trainer.max_steps > 0

    @property
    def total_train_batches(self) -> int | float:
        return self.trainer.max_steps if self._by_steps() else super().total_train_batches

    def _show_steps(self, trainer: Trainer) -> None:
        if not self._by_steps() or self.is_disabled or self.progress is None or self.train_progress_bar_id is None:
            return
        name = self.train_description
        # A resumed run starts where it stopped; the bar does not restart with each epoch.
        self.progress.update(
            self.train_progress_bar_id,
            completed=trainer.global_step,
            total=trainer.max_steps,
            description=f"[{self.theme.description}]{name}" if self.theme.description else name,
        )
        self.refresh()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._show_steps(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show_steps(trainer)
