"""Pictures: colour masks and image overlays (dashboards, predict.py), a confusion-matrix heatmap.

numpy and Pillow only (no plotting library at run time); every function returns an (H, W, 3)
uint8 RGB array that any logger takes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from segformer.data.labels import generated_palette

IGNORE_COLOUR = (0, 0, 0)


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


def confusion_matrix_image(
    confmat: Tensor | np.ndarray, class_names: Sequence[str] | None = None, max_named: int = 40
) -> np.ndarray:
    """Heatmap of the row-normalised confusion matrix (rows: label, columns: prediction).

    Cell (i, j) is the share of class i's pixels predicted as j, from white (0) to dark blue
    (1), so the diagonal reads as per-class accuracy; classes never labelled have an empty row.
    Class names are written along the rows when there are at most ``max_named`` classes.
    """
    counts = np.asarray(confmat.cpu() if isinstance(confmat, Tensor) else confmat, dtype=np.float64)
    k = counts.shape[0]
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    cell = int(np.clip(480 // max(k, 1), 2, 32))
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    heat = (white + share[..., None] * (blue - white)).round().astype(np.uint8)
    heat = np.kron(heat, np.ones((cell, cell, 1), dtype=np.uint8))
    named = class_names is not None and k <= max_named
    font = ImageFont.load_default()
    margin = 0
    if named:
        margin = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n in class_names)
    canvas = Image.new("RGB", (margin + heat.shape[1] + 1, heat.shape[0] + 1), (255, 255, 255))
    canvas.paste(Image.fromarray(heat), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle([margin, 0, margin + heat.shape[1], heat.shape[0]], outline=(128, 128, 128))
    if named:
        for i, name in enumerate(class_names):
            draw.text((4, i * cell + max(cell - 11, 0) // 2), name, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)
