"""Prediction maps written as PNG files in a dataset's own label ids.

One file per image, named after the image (``<name>.png``), holding ``dataset.to_dataset_ids``
of the predicted training ids: ADE20K 1..150, Cityscapes labelIds, so the official Cityscapes
evaluation script and benchmark server read them as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from PIL import Image
from torch import Tensor

from segformer.data.datasets import SegmentationDataset


def write_prediction(directory: Path, name: str, pred: np.ndarray, dataset: SegmentationDataset) -> Path:
    """Save one (H, W) map of training ids as ``directory/<name>.png`` in the dataset's ids
    (as predict.py writes them)."""
    path = directory / f"{name}.png"
    save_label_png(path, dataset.to_dataset_ids(pred))
    return path


def save_label_png(path: Path, ids: np.ndarray) -> None:
    """A map of label ids as a PNG: 8-bit, or 16-bit when an id exceeds 255."""
    Image.fromarray(ids.astype(np.uint8 if ids.max(initial=0) <= 255 else np.uint16)).save(path)


class PredictionWriter(L.Callback):
    """Writes the class maps a test step returns, one PNG per image of the batch."""

    def __init__(self, directory: str | Path, dataset: SegmentationDataset) -> None:
        self.directory = Path(directory)
        self.dataset = dataset

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Sequence[Tensor],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for name, pred in zip(batch["names"], outputs):
            write_prediction(self.directory, name, pred.cpu().numpy(), self.dataset)
