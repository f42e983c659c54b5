"""The bundled sample dataset: procedurally generated scenes in the ADE20K layout.

Scenes are small (128-192 px) so a B0 learns them from scratch on a CPU in minutes, yet not
trivially: every class draws its colours from the same distribution, so a class is told apart
only by structure. Three texture classes (stripes, dots, checkers) fill random blobs, three
shape classes (disc, box, triangle) are solid-coloured objects, the background is a smooth
gradient; sensor-like noise covers everything. A 1-pixel ignore band (ADE20K's 0 = "other")
runs along every region boundary, as annotation tools leave at edges.

The set is written once into ``root`` (atomically: a temporary folder renamed into place) with
a manifest of generator version, seed and sizes; a later call with the same settings reuses it.
It is read back by the real ADE20K reader.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from segformer.data.datasets import ADE20K
from segformer.errors import DataError

SAMPLE_CLASSES = ("background", "stripes", "dots", "checkers", "disc", "box", "triangle")
SAMPLE_PALETTE = (
    (120, 120, 120),
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
)
GENERATOR_VERSION = 2
MANIFEST = "sample_manifest.json"
SCENE_SIZES = ((160, 160), (144, 192), (192, 144), (128, 192))  # (height, width)

_BACKGROUND, _STRIPES, _DOTS, _CHECKERS, _DISC, _BOX, _TRIANGLE = range(len(SAMPLE_CLASSES))


def _colour(rng: np.random.Generator, away_from: np.ndarray | None = None) -> np.ndarray:
    """A random colour, at least some distance from ``away_from`` so textures stay visible."""
    while True:
        colour = rng.integers(0, 256, 3).astype(np.float32)
        if away_from is None or np.abs(colour - away_from).sum() > 150:
            return colour


def _texture(rng: np.random.Generator, kind: int, height: int, width: int) -> np.ndarray:
    """Boolean pattern of a texture class at a random orientation and period."""
    angle = rng.uniform(0, np.pi)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    if kind == _STRIPES:
        period = rng.uniform(8, 14)
        return (u % period) < period / 2
    if kind == _DOTS:
        period = rng.uniform(9, 14)
        radius = rng.uniform(0.22, 0.32) * period
        return ((u % period) - period / 2) ** 2 + ((v % period) - period / 2) ** 2 < radius**2
    cell = rng.uniform(5, 9)
    return (np.floor(u / cell) + np.floor(v / cell)) % 2 == 0


def _blob(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random star-shaped polygon covering roughly a sixth to a half of the scene."""
    centre = np.array([rng.uniform(0.2, 0.8) * width, rng.uniform(0.2, 0.8) * height])
    radius = rng.uniform(0.3, 0.5) * min(height, width)
    angles = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(6, 10)))
    radii = radius * rng.uniform(0.6, 1.25, len(angles))
    points = centre + np.stack([np.cos(angles), np.sin(angles)], 1) * radii[:, None]
    region = np.zeros((height, width), np.uint8)
    cv2.fillPoly(region, [np.round(points).astype(np.int32)], 1)
    return region.astype(bool)


def _shape(rng: np.random.Generator, kind: int, height: int, width: int) -> np.ndarray:
    """A solid disc, rotated box or triangle at a random place and size."""
    size = rng.uniform(12, 28)
    centre = np.array([rng.uniform(size, width - size), rng.uniform(size, height - size)])
    region = np.zeros((height, width), np.uint8)
    if kind == _DISC:
        cv2.circle(region, tuple(int(c) for c in np.round(centre)), int(round(size)), 1, thickness=-1)
        return region.astype(bool)
    angle = rng.uniform(0, 2 * np.pi)
    if kind == _BOX:
        aspect = rng.uniform(0.6, 1.0)
        corners = np.array([[-1, -aspect], [1, -aspect], [1, aspect], [-1, aspect]]) * size * 0.85
    else:
        corners = np.array([[np.cos(a), np.sin(a)] for a in (0, 2 * np.pi / 3, 4 * np.pi / 3)]) * size * 1.15
        corners += rng.uniform(-0.12, 0.12, corners.shape) * size
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = centre + corners @ rotation.T
    cv2.fillPoly(region, [np.round(points).astype(np.int32)], 1)
    return region.astype(bool)


def render_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H, W, 3) uint8 RGB image and (H, W) uint8 ADE20K-encoded mask (0 = ignore)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = x * np.cos(direction) + y * np.sin(direction)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    start, end = _colour(rng), _colour(rng)
    image = start + ramp[..., None] * (end - start)
    labels = np.full((height, width), _BACKGROUND, np.uint8)

    for kind in rng.choice([_STRIPES, _DOTS, _CHECKERS], size=rng.integers(2, 4), replace=False):
        region = _blob(rng, height, width)
        first = _colour(rng)
        pattern = _texture(rng, kind, height, width)[..., None]
        image = np.where(region[..., None], np.where(pattern, first, _colour(rng, first)), image)
        labels[region] = kind

    occupied = np.zeros((height, width), bool)
    for _ in range(rng.integers(3, 7)):
        kind = int(rng.choice([_DISC, _BOX, _TRIANGLE]))
        for _attempt in range(10):
            region = _shape(rng, kind, height, width)
            if not (region & occupied).any():
                break
        occupied |= region
        image[region] = _colour(rng)
        labels[region] = kind

    image += rng.normal(0, 6, image.shape)
    mask = labels + 1
    edge = np.zeros_like(occupied)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    mask[edge] = 0
    return np.clip(image, 0, 255).astype(np.uint8), mask


def _write_split(folder: Path, split: str, count: int, rng: np.random.Generator) -> None:
    images, annotations = folder / "images" / split, folder / "annotations" / split
    images.mkdir(parents=True)
    annotations.mkdir(parents=True)
    for index in range(count):
        height, width = SCENE_SIZES[int(rng.integers(len(SCENE_SIZES)))]
        image, mask = render_scene(rng, height, width)
        name = f"scene_{split}_{index:04d}"
        Image.fromarray(image).save(images / f"{name}.jpg", quality=95)
        Image.fromarray(mask).save(annotations / f"{name}.png")


def _manifest(seed: int, num_train: int, num_val: int) -> dict:
    return {
        "generator": "segformer.data.sample",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "num_train": num_train,
        "num_val": num_val,
        "classes": list(SAMPLE_CLASSES),
    }


def _holds(root: Path, manifest: dict) -> bool:
    try:
        return json.loads((root / MANIFEST).read_text()) == manifest
    except (OSError, ValueError):
        return False


def ensure_sample_scenes(root: str | Path, seed: int = 0, num_train: int = 200, num_val: int = 40) -> Path:
    """Write the sample scenes into ``root`` unless it already holds this exact set.

    An older set (another version, seed or size) is replaced; a folder with anything else in it
    is left alone and reported, so user data is never overwritten.
    """
    root = Path(root).expanduser()
    manifest = _manifest(int(seed), int(num_train), int(num_val))
    if _holds(root, manifest):
        return root
    if root.is_dir() and any(root.iterdir()) and not (root / MANIFEST).exists():
        raise DataError(
            f"The sample dataset root {root} is not empty and is not a sample dataset (no {MANIFEST}); "
            "the sample scenes are only written to a new or empty folder. Point data.root elsewhere."
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        rng = np.random.default_rng(manifest["seed"])
        folder = staging / ADE20K.FOLDER
        _write_split(folder, "training", manifest["num_train"], rng)
        _write_split(folder, "validation", manifest["num_val"], rng)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        _move_into_place(staging, root, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _move_into_place(staging: Path, root: Path, manifest: dict) -> None:
    """Rename the finished set onto ``root``; a concurrent writer of the same set may win."""
    stale = None
    if root.is_dir() and any(root.iterdir()):
        stale = root.with_name(f".{root.name}.stale-{uuid.uuid4().hex}")
        try:
            os.rename(root, stale)
        except OSError:
            stale = None
    try:
        os.rename(staging, root)
    except OSError:
        if not _holds(root, manifest):
            raise
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)


class SampleScenes(ADE20K):
    """The sample scenes (written on first use) read through the ADE20K reader."""

    def __init__(
        self, root: str | Path, split: str = "train", seed: int = 0, num_train: int = 200, num_val: int = 40
    ) -> None:
        ensure_sample_scenes(root, seed, num_train, num_val)
        super().__init__(root, split, classes=SAMPLE_CLASSES, palette=SAMPLE_PALETTE)
