"""Pictures: colour masks and image overlays (dashboards, predict.py) as uint8 arrays, and the
charts people read at a glance (confusion matrix, per-class IoU, prediction panels) as
matplotlib Figures.

Figures are built with ``matplotlib.figure.Figure`` on an Agg canvas, never through pyplot, so
no display is needed and no global plotting state changes; ``figure_to_array`` turns one into
the (H, W, 3) uint8 RGB array any logger takes, ``save_figure`` writes a PNG.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image
from torch import Tensor

from segformer.data.labels import generated_palette

IGNORE_COLOUR = (0, 0, 0)
DPI = 100
# Up to this many classes the confusion matrix shows every class; above it, the classes in
# its largest confusions (names and numbers stay readable).
MAX_MATRIX_CLASSES = 25


def make_palette(num_classes: int, palette: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """(num_classes, 3) uint8 colours: ``palette`` when it has one per class, else the generated
    palette datasets without one use (``labels.generated_palette``)."""
    if palette is None or len(palette) < num_classes:
        palette = generated_palette(num_classes)
    return np.asarray(palette[:num_classes], dtype=np.uint8).reshape(num_classes, 3)


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class map (H, W) -> colours (H, W, 3); values outside the palette (255) are black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[:] = IGNORE_COLOUR
    table[: len(palette)] = palette[:256]
    return table[np.clip(mask, 0, 255).astype(np.uint8)]


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` with the mask's colours blended in at ``alpha``; unlabelled pixels stay as they are."""
    coloured = colorize(mask, palette).astype(np.float32)
    blended = (1 - alpha) * image.astype(np.float32) + alpha * coloured
    labelled = (mask < len(palette))[..., None]
    return np.where(labelled, np.rint(blended), image).astype(np.uint8)


def denormalize(pixel_values: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """A normalized (3, H, W) image back to (H, W, 3) uint8 RGB."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    image = pixel_values.detach().float().cpu() * std_t + mean_t
    return image.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an (H, W, 3) uint8 image (the model's input back to the label size)."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def batch_samples(
    batch: Mapping[str, Any], preds: Sequence[Tensor], mean: Sequence[float], std: Sequence[float], limit: int
) -> list[dict[str, Any]]:
    """Up to ``limit`` images of an eval batch as pictures take them: ``name``, ``image`` (RGB),
    ``labels`` and ``pred`` (uint8 class maps), all at the label's (original) size."""
    samples = []
    for i, pred in enumerate(preds[: max(limit, 0)]):
        (h, w), (label_h, label_w) = batch["image_sizes"][i].tolist(), batch["label_sizes"][i].tolist()
        image = denormalize(batch["pixel_values"][i, :, :h, :w], mean, std)
        samples.append(
            {
                "name": batch["names"][i],
                "image": resize_image(image, label_h, label_w),
                "labels": batch["labels"][i, :label_h, :label_w].cpu().numpy().astype(np.uint8),
                "pred": pred.cpu().numpy().astype(np.uint8),
            }
        )
    return samples


def figure_to_array(figure: Figure) -> np.ndarray:
    """The figure rendered on an Agg canvas as (H, W, 3) uint8 RGB, H x W = size in inches x dpi."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_figure(figure: Figure, path: str | Path) -> Path:
    """The figure as a PNG at ``path`` (its own size and dpi: no cropping)."""
    path = Path(path)
    FigureCanvasAgg(figure).print_png(path)
    return path


def new_figure(width: float, height: float) -> Figure:
    """A figure (inches) on an Agg canvas, laid out so labels never overlap or spill over."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _numpy(values: Tensor | np.ndarray) -> np.ndarray:
    return np.asarray(values.cpu() if isinstance(values, Tensor) else values, dtype=np.float64)


def row_shares(confmat: Tensor | np.ndarray) -> np.ndarray:
    """Row-normalised confusion matrix: cell (i, j) is the share of class i's pixels predicted as
    j; NaN rows for classes never labelled."""
    counts = _numpy(confmat)
    rows = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, rows, out=np.full_like(counts, np.nan), where=rows > 0)


def most_confused_classes(confmat: Tensor | np.ndarray, count: int) -> list[int]:
    """The ``count`` classes taking part in the largest confusions, in class order.

    Off-diagonal cells of the row-normalised matrix are taken from the largest down, and both
    classes of each (true, predicted) pair join until ``count`` classes are chosen; when the
    confusions run out, the other labelled classes fill the rest, then the unlabelled ones.
    """
    share = row_shares(confmat)
    k = share.shape[0]
    off = np.nan_to_num(share)
    np.fill_diagonal(off, 0.0)
    order = np.argsort(-off, axis=None, kind="stable")
    chosen: dict[int, None] = {}
    for flat in order:
        if len(chosen) >= count or off.flat[flat] <= 0:
            break
        for cls in divmod(int(flat), k):
            if len(chosen) < count:
                chosen.setdefault(cls)
    labelled = ~np.isnan(share[:, 0])
    for cls in [*np.flatnonzero(labelled), *np.flatnonzero(~labelled)]:
        if len(chosen) >= count:
            break
        chosen.setdefault(int(cls))
    return sorted(chosen)


def confusion_matrix_figure(
    confmat: Tensor | np.ndarray,
    class_names: Sequence[str] | None = None,
    max_classes: int = MAX_MATRIX_CLASSES,
) -> Figure:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) in percent, with the
    value in each cell and a colour bar.

    Rows of classes never labelled are grey. With more than ``max_classes`` classes only the
    ``most_confused_classes`` are shown (the title says so), plus an "other classes" column
    holding the rest of each row, so every row still adds up to 100.
    """
    share = row_shares(confmat)
    k = share.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else list(class_names)
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix.")
    title = "Confusion matrix (% of each true class's pixels)"
    if k > max_classes:
        keep = most_confused_classes(confmat, max_classes)
        shown = share[np.ix_(keep, keep)]
        other = np.where(np.isnan(shown[:, :1]), np.nan, 1 - np.nansum(shown, axis=1, keepdims=True))
        shown = np.concatenate([shown, other.clip(min=0)], axis=1)
        rows = [names[i] for i in keep]
        columns = [*rows, "other classes"]
        title += f"\nthe {len(keep)} of {k} classes in the largest confusions"
    else:
        shown, rows, columns = share, names, names
    percent = 100 * shown

    longest = max(len(n) for n in columns)
    cell = 0.42
    label = 0.075 * longest + 0.5  # inches taken by the tick labels at font size 9
    figure = new_figure(len(columns) * cell + label + 1.6, len(rows) * cell + 0.75 * label + 1.1)
    axes = figure.add_subplot()
    cmap = colormaps["Blues"].with_extremes(bad="#d9d9d9")  # grey: rows of classes never labelled
    image = axes.imshow(percent, cmap=cmap, vmin=0, vmax=100, aspect="auto", interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.05, pad=0.02)
    colorbar.set_label("% of the true class's pixels")
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    axes.set_yticks(range(len(rows)), rows, fontsize=9)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(title, fontsize=10)
    axes.tick_params(length=0)
    for i, row in enumerate(percent):
        for j, value in enumerate(row):
            if np.isfinite(value) and round(value) > 0:
                colour = "white" if value > 55 else "black"
                text = axes.text(j, i, f"{value:.0f}", ha="center", va="center", fontsize=8, color=colour)
                text.set_in_layout(False)  # inside its cell; keeps the layout pass fast
    return figure


def per_class_iou_figure(results: Mapping[str, Tensor], class_names: Sequence[str] | None = None) -> Figure:
    """Per-class IoU (%) as horizontal bars, best at the top, with the mIoU as a dashed line.

    Classes absent from both labels and predictions have no IoU: they are left out and counted
    in the title.
    """
    iou = 100 * _numpy(results["IoU"])
    names = [str(i) for i in range(len(iou))] if class_names is None else list(class_names)
    defined = [i for i in np.argsort(-np.nan_to_num(iou, nan=-1.0), kind="stable") if np.isfinite(iou[i])]
    miou = 100 * float(results["mIoU"])
    bar = 0.22
    longest = max((len(names[i]) for i in defined), default=5)
    figure = new_figure(6.0 + 0.075 * longest, max(len(defined), 4) * bar + 1.2)
    axes = figure.add_subplot()
    positions = np.arange(len(defined))
    values = iou[defined]
    axes.barh(positions, values, height=0.7, color="#4c72b0", zorder=2)
    for y, value in zip(positions, values):
        # on a white box: readable where the mIoU line crosses
        text = axes.text(value + 0.8, y, f"{value:.1f}", va="center", fontsize=7, zorder=4)
        text.set_bbox({"facecolor": "white", "edgecolor": "none", "pad": 0.5})
        text.set_in_layout(False)
    title = "Per-class IoU"
    if np.isfinite(miou):
        axes.axvline(miou, color="#c44e52", linestyle="--", linewidth=1.2, zorder=3)
        title += f", mIoU {miou:.1f} (dashed line)"
    if len(defined) < len(iou):
        title += f"\n{len(iou) - len(defined)} classes absent from labels and predictions left out"
    axes.set_yticks(positions, [names[i] for i in defined], fontsize=8)
    axes.set_ylim(len(defined) - 0.5 if defined else 0.5, -0.5)
    axes.set_xlim(0, 108)
    axes.set_xticks(range(0, 101, 20))
    axes.set_xlabel("IoU (%)")
    if len(defined) > 40:  # a long chart: the scale at the top too
        axes.tick_params(labeltop=True, top=True)
    axes.set_title(title, fontsize=10)
    axes.grid(axis="x", alpha=0.3, zorder=0)
    return figure


def prediction_figure(
    sample: Mapping[str, Any], palette: np.ndarray, class_names: Sequence[str], alpha: float = 0.5
) -> Figure:
    """image | ground truth | prediction (masks blended over the image at ``alpha``) for one
    ``batch_samples`` entry, with a legend of the classes in either mask."""
    image, labels, pred = sample["image"], sample["labels"], sample["pred"]
    height, width = image.shape[:2]
    panel = 4.0
    present = np.union1d(np.unique(labels), np.unique(pred))
    present = [int(c) for c in present if c < len(class_names)]
    handles = [
        Patch(facecolor=palette[c] / 255, edgecolor="black", linewidth=0.5, label=class_names[c]) for c in present
    ]
    if (labels >= len(class_names)).any():
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=0.5, label="no label (not scored)"))
    columns = 4 if len(handles) <= 16 else 6
    legend_rows = -(-len(handles) // columns)
    figure = new_figure(3 * panel, panel * height / width + 0.35 + 0.22 * legend_rows + 0.3)
    grid = figure.subplots(1, 3)
    for axes, picture, title in zip(
        grid,
        (image, overlay(image, labels, palette, alpha), overlay(image, pred, palette, alpha)),
        ("image", "ground truth", "prediction"),
    ):
        axes.imshow(picture, interpolation="nearest")
        axes.set_title(title, fontsize=10)
        axes.set_axis_off()
    figure.suptitle(str(sample["name"]), fontsize=9)
    if handles:
        figure.legend(handles=handles, loc="outside lower center", ncols=columns, fontsize=8, frameon=False)
    return figure
