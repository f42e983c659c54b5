"""The evaluation report eval.py writes: ``report.md`` with the run's details, the scores, the
per-class table and chart, the confusion matrix and a few prediction panels, every picture a
PNG beside it (``examples/`` for the panels), so it reads in any Markdown viewer or on GitHub.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import lightning as L
from torch import Tensor

from segformer.data.datasets import SegmentationDataset
from segformer.inference.pictures import (
    MAX_MATRIX_CLASSES,
    batch_samples,
    confusion_matrix_figure,
    make_palette,
    most_confused_classes,
    per_class_iou_figure,
    prediction_figure,
    save_figure,
)


class ReportSamples(L.Callback):
    """Keeps the first ``num_images`` test images of this rank with their labels and predictions
    (``pictures.batch_samples``) for the report's prediction panels."""

    def __init__(self, num_images: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.num_images = int(num_images)
        self.mean, self.std = list(mean), list(std)
        self.samples: list[dict[str, Any]] = []

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Sequence[Tensor],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        missing = self.num_images - len(self.samples)
        if missing > 0:
            self.samples += batch_samples(batch, outputs, self.mean, self.std, missing)


def describe_inference(settings: Mapping[str, Any]) -> str:
    """``data.inference`` in words: whole image or sliding window, scales, flip."""
    if settings["mode"] == "slide":
        (ch, cw), (sh, sw) = settings["crop_size"], settings["stride"]
        words = f"sliding window {ch}x{cw}, stride {sh}x{sw}"
    else:
        words = "whole image"
    scales = [float(s) for s in settings["scales"]]
    if scales != [1.0]:
        words += ", multi-scale " + "/".join(f"{s:g}" for s in scales)
    return words + (" + flip" if settings["flip"] else "")


def describe_dataset(dataset: SegmentationDataset, root: str) -> str:
    """One line: the dataset's reader, root, split, size and number of classes."""
    return (
        f"{type(dataset).__name__} at `{root}`, split `{dataset.split}` "
        f"({len(dataset)} images, {dataset.num_classes} classes)"
    )


def _pct(value: Tensor | float) -> str:
    number = float(value)
    return "-" if math.isnan(number) else f"{100 * number:.2f}"


def per_class_table(results: Mapping[str, Tensor], class_names: Sequence[str]) -> str:
    """Markdown table of per-class IoU and Acc in percent ("-": class absent, no score)."""
    lines = ["| class | IoU | Acc |", "|---|---:|---:|"]
    lines += [f"| {n} | {_pct(i)} | {_pct(a)} |" for n, i, a in zip(class_names, results["IoU"], results["Acc"])]
    return "\n".join(lines)


def write_report(
    directory: str | Path,
    results: Mapping[str, Tensor],
    class_names: Sequence[str],
    palette: Sequence[Sequence[int]] | None,
    *,
    checkpoint: str,
    dataset: str,
    inference: Mapping[str, Any],
    samples: Sequence[Mapping[str, Any]] = (),
    alpha: float = 0.5,
) -> Path:
    """Write ``directory/report.md`` and its pictures; returns the report's path.

    ``dataset`` is a one-line description (``describe_dataset``); ``samples`` are
    ``batch_samples`` entries drawn as image | ground truth | prediction over the image, the
    masks blended in at ``alpha`` with the dataset's ``palette``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = list(class_names)
    colours = make_palette(len(names), palette)
    save_figure(per_class_iou_figure(results, names), directory / "per_class_iou.png")
    save_figure(confusion_matrix_figure(results["confusion_matrix"], names), directory / "confusion_matrix.png")

    lines = [
        "# Evaluation report",
        "",
        "| | |",
        "|---|---|",
        f"| checkpoint | `{checkpoint}` |",
        f"| dataset | {dataset} |",
        f"| mode | {describe_inference(inference)} |",
        "",
        "## Scores",
        "",
        "| aAcc | mIoU | mAcc |",
        "|---:|---:|---:|",
        f"| {_pct(results['aAcc'])} | {_pct(results['mIoU'])} | {_pct(results['mAcc'])} |",
        "",
        "Percent, over the whole split (one confusion matrix, as MMSegmentation and the Cityscapes",
        "script compute them).",
        "",
        "## Per-class IoU",
        "",
        "![per-class IoU](per_class_iou.png)",
        "",
        per_class_table(results, names),
        "",
        "## Confusion matrix",
        "",
        "Rows: true class, columns: predicted class, in percent of each true class's pixels; grey",
        "rows: classes absent from the labels.",
    ]
    if len(names) > MAX_MATRIX_CLASSES:
        shown = most_confused_classes(results["confusion_matrix"], MAX_MATRIX_CLASSES)
        lines.append(
            f"Only the {len(shown)} of {len(names)} classes in the largest confusions are shown "
            f"({', '.join(names[i] for i in shown)}); the last column holds the other classes."
        )
    lines += ["", "![confusion matrix](confusion_matrix.png)"]
    if samples:
        lines += ["", "## Predictions", "", "Image, ground truth and prediction, colours as in the legend.", ""]
        (directory / "examples").mkdir(exist_ok=True)
        for sample in samples:
            relative = f"examples/{sample['name']}.png"
            save_figure(prediction_figure(sample, colours, names, alpha), directory / relative)
            lines += [f"![{sample['name']}]({quote(relative)})", ""]  # quoted: names with spaces
    path = directory / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
