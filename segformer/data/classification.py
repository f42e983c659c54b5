"""Image classification data: image folders, Hugging Face sources, the bundled sample shapes.

Two layouts, both the ImageNet-1K one: ``<root>/<split>/<class>/<image>`` (the class names are
the sorted folder names) and a ``datasets`` source with an image and a label column. The
pipelines are DeiT's: random resized crop, flip and colour jitter for training; resize the short
side to crop / crop_ratio and centre-crop for evaluation. Training order and augmentations come
from the run's seed (``ResumableSampler``), so resumed runs continue exactly.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import lightning as L
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image
from torch.utils.data import Dataset

from segformer.data import sample
from segformer.data.datamodule import SegDataModule, plain
from segformer.data.datasets import _hf_image, _load_hf_split, read_image
from segformer.data.sampler import ResumableSampler
from segformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from segformer.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FOLDER_LAYOUT = "<root>/<split>/<class name>/<image>.jpg|png (one sub-folder per class)"


class ImageFolder(Dataset):
    """``<root>/<split>/<class>/*``: labels are the indices of the sorted class folder names."""

    def __init__(self, root: str | Path, split: str = "train") -> None:
        folder = Path(root).expanduser() / split
        if not folder.is_dir():
            raise DataError(f"Image folder split {split!r}: {folder} does not exist; expected {FOLDER_LAYOUT}.")
        classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not classes:
            raise DataError(f"Image folder {folder} has no class sub-folders; expected {FOLDER_LAYOUT}.")
        self.classes = classes
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(classes):
            files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"Class folder {folder / name} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
            self.samples += [(path, label) for path in files]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.samples[index]
        return {"image": read_image(path), "label": label}


class HFImageClassification(Dataset):
    """A Hugging Face ``datasets`` source (hub name, save_to_disk folder, parquet) with image and
    label columns; class names from the label column's ClassLabel feature, else ``classes``."""

    def __init__(
        self,
        source: str | Path,
        split: str = "train",
        image_column: str = "image",
        label_column: str = "label",
        classes: Sequence[str] | None = None,
        split_names: Mapping[str, str] | None = None,
        cache_dir: str | None = None,
    ) -> None:
        self.source, self.split = str(source), split
        self.data = _load_hf_split(self.source, split, split_names, cache_dir)
        for role, column in (("image", image_column), ("label", label_column)):
            if column not in self.data.column_names:
                raise DataError(
                    f"Hugging Face dataset {self.source} (split {split!r}) has no {role} column {column!r}; its "
                    f"columns are {self.data.column_names} (set data.dataset.{role}_column)."
                )
        self.image_column, self.label_column = image_column, label_column
        names = getattr(self.data.features[label_column], "names", None) or (list(classes) if classes else None)
        if not names:
            raise ConfigError(
                f"Hugging Face dataset {self.source}: column {label_column!r} is not a ClassLabel, so the class "
                "names are unknown; give data.dataset.classes=[...]."
            )
        self.classes = list(names)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        where = f"{self.source} [{self.split} row {index}]"
        try:
            row = self.data[index]
        except (OSError, SyntaxError, ValueError) as error:
            raise DataError(f"Cannot decode {where}: {error}.") from error
        label = int(row[self.label_column])
        if not 0 <= label < len(self.classes):
            raise DataError(f"{where} column {self.label_column!r} holds label {label}, outside 0..{len(self.classes) - 1}.")
        return {"image": _hf_image(row[self.image_column], f"{where} column {self.image_column!r}"), "label": label}


# The sample set: six classes, each drawn in one colour from the same distribution on a grey
# gradient, so only texture or shape tells them apart: the scene generator's stripes, dots and
# checkers (clipped to an ellipse, each at its own scale: thick stripes, fine checkers) and its
# disc, box and triangle (enlarged to half or more of the image). Version 1 (finer textures in two
# colours and small shapes, on colour gradients) kept a MiT-B0 trained from scratch at chance for
# hundreds of CPU steps: it memorised the training images' colours instead.
SAMPLE_CLASSES = sample.SAMPLE_CLASSES[1:]
SAMPLE_VERSION = 2
SAMPLE_SIZE = 64
# A texture is drawn on a grid this many times smaller than the image, then enlarged.
TEXTURE_SCALES = {sample._STRIPES: 1.6, sample._DOTS: 1.25, sample._CHECKERS: 1.0}
_SPLIT_IDS = {"train": 0, "val": 1}


def _contrasting(rng: np.random.Generator, *greys: float) -> np.ndarray:
    """A random colour far (L1 > 200) from each of the background's grey levels."""
    while True:
        colour = rng.integers(0, 256, 3).astype(np.float32)
        if all(np.abs(colour - grey).sum() > 200 for grey in greys):
            return colour


def render_sample(rng: np.random.Generator, kind: int, size: int = SAMPLE_SIZE) -> np.ndarray:
    """One (size, size, 3) uint8 image of sample class ``kind`` (0..5): a texture or a solid shape."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    direction = rng.uniform(0, 2 * np.pi)
    ramp = x * np.cos(direction) + y * np.sin(direction)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    low, high = rng.uniform(60, 200, 2)
    image = np.repeat((low + ramp * (high - low))[..., None], 3, axis=-1)
    colour = _contrasting(rng, low, high)
    scene_kind = kind + 1  # the scene generator's ids (0 is its background)
    if scene_kind in TEXTURE_SCALES:
        small = round(size / TEXTURE_SCALES[scene_kind])
        pattern = cv2.resize(sample._texture(rng, scene_kind, small, small).astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
        region = np.zeros((size, size), np.uint8)
        centre = tuple(int(c) for c in rng.uniform(0.4, 0.6, 2) * size)
        axes = tuple(int(a) for a in rng.uniform(0.32, 0.45, 2) * size)
        cv2.ellipse(region, centre, axes, float(rng.uniform(0, 180)), 0, 360, 1, thickness=-1)
        image[(region & pattern).astype(bool)] = colour
    else:
        mask = sample._shape(rng, scene_kind, size, size).astype(np.uint8)
        rows, columns = np.nonzero(mask)
        mask = mask[rows.min() : rows.max() + 1, columns.min() : columns.max() + 1]
        scale = rng.uniform(0.5, 0.75) * size / max(mask.shape)
        mask = cv2.resize(mask, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST).astype(bool)
        top, left = (int(rng.integers(0, size - extent + 1)) for extent in mask.shape)
        image[top : top + mask.shape[0], left : left + mask.shape[1]][mask] = colour
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def ensure_sample_shapes(root: str | Path, seed: int = 0, per_class_train: int = 40, per_class_val: int = 10) -> Path:
    """Write the sample set into ``root`` (image-folder layout) unless it holds this exact set;
    a folder holding anything else is left alone and reported."""
    root = Path(root).expanduser()
    manifest = {"generator": __name__, "version": SAMPLE_VERSION, "seed": int(seed), "train": int(per_class_train), "val": int(per_class_val)}
    if sample._holds(root, manifest):
        return root
    if root.is_dir() and any(root.iterdir()) and not (root / sample.MANIFEST).exists():
        raise DataError(f"The sample set root {root} is not empty and is not a sample set (no {sample.MANIFEST}); point data.root elsewhere.")
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        for split, count in (("train", manifest["train"]), ("val", manifest["val"])):
            for kind, name in enumerate(SAMPLE_CLASSES):
                (staging / split / name).mkdir(parents=True)
                for index in range(count):
                    # Each image from its own (seed, split, class, index): a larger set holds the smaller.
                    rng = np.random.default_rng([manifest["seed"], _SPLIT_IDS[split], kind, index])
                    Image.fromarray(render_sample(rng, kind)).save(staging / split / name / f"{index:04d}.png")
        (staging / sample.MANIFEST).write_text(json.dumps(manifest, indent=2))
        sample._move_into_place(staging, root, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


class SampleShapes(ImageFolder):
    """The sample set (written on first use) read as an image folder."""

    def __init__(self, root: str | Path, split: str = "train", seed: int = 0, per_class_train: int = 40, per_class_val: int = 10) -> None:
        super().__init__(ensure_sample_shapes(root, seed, per_class_train, per_class_val), split)


def train_transform(
    crop_size: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
    color_jitter: float = 0.4,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """DeiT's train pipeline (without RandAugment / random erasing): random resized crop, flip, colour jitter."""
    return A.Compose([
        A.RandomResizedCrop(size=(crop_size, crop_size), scale=tuple(scale), ratio=tuple(ratio)),
        A.HorizontalFlip(p=flip_prob),
        A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0.0, p=1.0 if color_jitter else 0.0),
        A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0),
        ToTensorV2(),
    ])


def eval_transform(crop_size: int, crop_ratio: float = 0.875, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> A.Compose:
    """Short side to crop_size / crop_ratio (224 -> 256), then the centre crop_size square."""
    if not 0 < crop_ratio <= 1:
        raise ConfigError(f"data.crop_ratio={crop_ratio} must be in (0, 1] (DeiT: 0.875).")
    return A.Compose([
        A.SmallestMaxSize(max_size=int(crop_size / crop_ratio)),
        A.CenterCrop(crop_size, crop_size),
        A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0),
        ToTensorV2(),
    ])


class ClassificationSamples(Dataset):
    """Raw samples through a pipeline -> {"pixel_values", "labels"}; ``(index, seed)`` keys
    (``ResumableSampler``) reseed the pipeline so augmentations repeat on resume."""

    def __init__(self, dataset: Dataset, transform: A.Compose) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = key if isinstance(key, (tuple, list)) else (key, int(torch.randint(0, 2**62, ())))
        raw = self.dataset[int(index)]
        self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        return {"pixel_values": self.transform(image=raw["image"])["image"], "labels": torch.tensor(raw["label"])}


class ClassificationDataModule(SegDataModule):
    """Datasets and loaders of an image classification set (configs/data/cls_*.yaml).

    Shares the segmentation module's loaders, evaluation sampler and resumable train sampler
    state (``state_dict``/``load_state_dict``); only the datasets and pipelines differ.
    """

    ignore_index = -100

    def __init__(
        self,
        dataset: Callable[[str, str], Dataset],
        root: str,
        num_classes: int,
        batch_size: int = 128,
        val_batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        crop_size: int = 224,
        crop_ratio: float = 0.875,
        augment: Mapping[str, Any] | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
    ) -> None:
        L.LightningDataModule.__init__(self)
        self.save_hyperparameters(ignore=["dataset"])
        for key, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if int(value) < 1:
                raise ConfigError(f"data.{key} must be at least 1, got {value}.")
        self.dataset_factory, self.root, self.num_classes = dataset, str(root), int(num_classes)
        self.batch_size, self.val_batch_size, self.num_workers = int(batch_size), int(val_batch_size), int(num_workers)
        self.pin_memory, self.persistent_workers = bool(pin_memory), bool(persistent_workers)
        self.train_transform = train_transform(int(crop_size), mean=plain(mean), std=plain(std), **dict(plain(augment) or {}))
        self.eval_transform = eval_transform(int(crop_size), crop_ratio, mean=plain(mean), std=plain(std))
        self.preprocessing = {"crop_size": int(crop_size), "crop_ratio": float(crop_ratio), "mean": list(plain(mean)), "std": list(plain(std))}
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self._datasets: dict[str, Any] = {}
        self._train_sampler: ResumableSampler | None = None
        self._sampler_state: dict[str, Any] | None = None
        self.inference: dict[str, Any] = {}

    def dataset(self, split: str) -> Any:
        if split not in self._datasets:
            built = self.dataset_factory(self.root, split)
            if len(built.classes) != self.num_classes:
                raise ConfigError(
                    f"data.num_classes is {self.num_classes} but the dataset at {self.root} (split {split!r}) has "
                    f"{len(built.classes)} classes; set data.num_classes={len(built.classes)}."
                )
            self._datasets[split] = built
        return self._datasets[split]

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        samples = ClassificationSamples(self.dataset(self.splits["train"]), self.train_transform)
        self._train_sampler = ResumableSampler(samples)
        if self._sampler_state is not None:
            self._train_sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        return self._loader(samples, self.batch_size, True, None)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(ClassificationSamples(self.dataset(self.splits["val"]), self.eval_transform), self.val_batch_size, False, None)

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(ClassificationSamples(self.dataset(self.splits["test"]), self.eval_transform), self.val_batch_size, False, None)
