"""The LightningDataModule: datasets of each split, their pipelines and the loaders.

Hydra builds it from ``configs/data/<name>.yaml``: ``dataset`` is a partial factory called as
``dataset(root, split)``, every pipeline number is a config key.
"""

from __future__ import annotations

import inspect
import logging
import random
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import albumentations as A
import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from segformer.data.datasets import IGNORE_INDEX, SegmentationDataset
from segformer.data.sampler import ResumableSampler
from segformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, train_transform
from segformer.data.sampler import EvalSampler
from segformer.errors import ConfigError, DataError
from segformer.inference.inference import InferenceConfig

log = logging.getLogger(__name__)


class TrainSamples(Dataset):
    """Raw samples through the train pipeline -> {"pixel_values", "labels"}.

    Keys are ``(index, seed)`` pairs from ``ResumableSampler``: the pipeline is reseeded with the
    sample's own seed, so an augmentation depends only on the run's seed, the epoch and the index
    (the same in a resumed run, for any number of workers). A plain index draws the seed from
    torch's generator, which ``seed_everything(seed, workers=True)`` controls.

    With ``skip_bad_samples`` a sample that fails to read (``DataError``) is logged with its
    file, counted, and replaced by the next readable index, so batches keep their size.
    """

    def __init__(self, dataset: SegmentationDataset, transform: A.Compose, skip_bad_samples: bool = False) -> None:
        self.dataset, self.transform = dataset, transform
        self.skip_bad_samples = skip_bad_samples
        self.skipped = 0  # bad samples replaced in this process (each loader worker counts its own)

    def __len__(self) -> int:
        return len(self.dataset)

    def _read(self, index: int) -> dict[str, Any]:
        if not self.skip_bad_samples:
            return self.dataset[index]
        for offset in range(len(self.dataset)):
            try:
                return self.dataset[(index + offset) % len(self.dataset)]
            except DataError as error:
                self.skipped += 1
                log.warning("Skipped bad training sample (%d in this loader process): %s", self.skipped, error)
        raise DataError("Every sample of the training split is unreadable (last problem logged above).")

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key if isinstance(key, (tuple, list)) else (key, int(torch.randint(0, 2**62, ())))
        sample = self._read(int(index))
        self.transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.transform(image=sample["image"], mask=sample["mask"])
        return {"pixel_values": out["image"], "labels": out["mask"].long()}


def test_scales(scale: Sequence[int], ratios: Sequence[float]) -> list[tuple[int, int]]:
    """The (long, short) test scale of each ratio, MultiScaleFlipAug's ``int(side * ratio)``."""
    long_side, short_side = max(scale), min(scale)
    return [(int(long_side * r), int(short_side * r)) for r in ratios]


def eval_transforms(
    scale: Sequence[int],
    ratios: Sequence[float] = (1.0,),
    size_divisor: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> list[A.Compose]:
    """One test transform per test-time ratio, each resizing the original image to its scale."""
    return [eval_transform(s, size_divisor, mean=mean, std=std) for s in test_scales(scale, ratios)]


def eval_views(image: np.ndarray, transforms: Sequence[A.Compose]) -> list[torch.Tensor]:
    """The (3, h, w) model input of ``image`` (H, W, 3 uint8) at every test scale."""
    return [transform(image=image)["image"] for transform in transforms]


class EvalSamples(Dataset):
    """Raw samples for validation/testing: the image resized from the original once per test
    scale (``transforms``, the first as ``pixel_values``, the others as ``scale_views``), the mask
    kept at original resolution."""

    def __init__(self, dataset: SegmentationDataset, transforms: Sequence[A.Compose]) -> None:
        self.dataset, self.transforms = dataset, list(transforms)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = self.dataset[index]
        pixel_values, *more = eval_views(sample["image"], self.transforms)
        labels = torch.from_numpy(sample["mask"]).long()
        out = {
            "pixel_values": pixel_values,
            "labels": labels,
            "name": sample["name"],
        }
        if more:
            out["scale_views"] = more
        return out


def pad_images(images: Sequence[torch.Tensor], fill: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, ..., H, W) padded bottom/right with ``fill`` to the largest image, and each one's (h, w)."""
    sizes = torch.tensor([list(image.shape[-2:]) for image in images])
    height, width = sizes.max(0).values.tolist()
    padded = images[0].new_full((len(images), *images[0].shape[:-2], height, width), fill)
    for i, image in enumerate(images):
        padded[i, ..., : image.shape[-2], : image.shape[-1]] = image
    return padded, sizes


def collate_eval(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack differently-sized eval samples: images zero-padded, labels 255-padded (bottom/right)."""
    pixel_values, image_sizes = pad_images([s["pixel_values"] for s in samples])
    labels, label_sizes = pad_images([s["labels"] for s in samples], IGNORE_INDEX)
    batch = {
        "pixel_values": pixel_values,
        "labels": labels,
        "image_sizes": image_sizes,
        "label_sizes": label_sizes,
        "names": [s["name"] for s in samples],
    }
    if "scale_views" in samples[0]:
        count = len(samples[0]["scale_views"])
        batch["scale_views"] = [pad_images([s["scale_views"][k] for s in samples]) for k in range(count)]
    return batch


def plain(value: Any) -> Any:
    """Hydra hands nested config as DictConfig/ListConfig; the pipeline wants plain values."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _check_keys(name: str, given: Mapping[str, Any], function: Callable[..., Any], skip: Sequence[str]) -> None:
    allowed = [p for p in inspect.signature(function).parameters if p not in skip]
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"Unknown key(s) {unknown} in data.{name}; allowed keys are {allowed}.")


class SegDataModule(L.LightningDataModule):
    """Datasets and loaders for one segmentation dataset.

    Args:
        dataset: factory ``dataset(root, split) -> SegmentationDataset`` (a Hydra partial).
        root: where the dataset lives (a hub name or path for Hugging Face sources).
        num_classes: expected number of classes; must match the dataset's.
        batch_size / val_batch_size: per device; validation images keep their own sizes and are
            padded to a common size when val_batch_size > 1.
        crop_size: train crop [h, w]; scale: base scale [long, short] of the train rescale and
            the test resize, so small custom images are not blown up to ADE20K's size.
        augment: train options of ``train_transform`` (ratio_range, cat_max_ratio, crop_tries,
            flip_prob, photometric).
        size_divisor: round test sizes up to a multiple of this (NVlabs uses 32 for ADE20K).
        inference: how the dataset is evaluated (mode whole|slide, crop_size, stride, scales,
            flip, window_batch); read by the inference code, stored here because it belongs to the dataset.
        skip_bad_samples: a train sample that cannot be read is logged and replaced by the next
            one instead of stopping the run (validation and test data are always strict).

    The train order and augmentations are drawn from the run's seed (``ResumableSampler``); the
    sampler's position is saved in checkpoints (``state_dict``), so a resumed run continues
    mid-epoch with the batches the interrupted run had not used yet.
    """

    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        dataset: Callable[[str, str], SegmentationDataset],
        root: str,
        num_classes: int,
        batch_size: int = 2,
        val_batch_size: int = 1,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        crop_size: Sequence[int] = (512, 512),
        scale: Sequence[int] = (2048, 512),
        augment: Mapping[str, Any] | None = None,
        size_divisor: int | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        inference: Mapping[str, Any] | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "val",
        skip_bad_samples: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["dataset"])
        self.dataset_factory = dataset
        self.root = str(root)
        self.num_classes = int(num_classes)
        for key, value in (("batch_size", batch_size), ("val_batch_size", val_batch_size)):
            if int(value) < 1:
                raise ConfigError(f"data.{key} must be at least 1, got {value}.")
        if int(num_workers) < 0:
            raise ConfigError(f"data.num_workers must be 0 or more, got {num_workers}.")
        self.batch_size, self.val_batch_size = int(batch_size), int(val_batch_size)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.persistent_workers = bool(persistent_workers)
        self.crop_size = [int(v) for v in plain(crop_size)]
        self.scale = [int(v) for v in plain(scale)]
        self.augment = dict(plain(augment) or {})
        _check_keys("augment", self.augment, train_transform, ("crop_size", "scale", "mean", "std", "ignore_index"))
        self.train_transform = train_transform(
            self.crop_size, self.scale, mean=plain(mean), std=plain(std), ignore_index=IGNORE_INDEX, **self.augment
        )
        self.inference = self._inference_settings(plain(inference) or {})
        self.eval_transforms = eval_transforms(
            self.scale, self.inference["scales"], size_divisor, mean=plain(mean), std=plain(std)
        )
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self._datasets: dict[str, SegmentationDataset] = {}
        self.skip_bad_samples = bool(skip_bad_samples)
        self._train_sampler: ResumableSampler | None = None
        self._sampler_state: dict[str, Any] | None = None

    def _inference_settings(self, given: Mapping[str, Any]) -> dict[str, Any]:
        settings = {
            "mode": "whole",
            "crop_size": list(self.crop_size),
            "stride": [max(c * 2 // 3, 1) for c in self.crop_size],
            "scales": [1.0],
            "flip": False,
            "window_batch": 1,
        }
        unknown = sorted(set(given) - set(settings))
        if unknown:
            raise ConfigError(f"Unknown key(s) {unknown} in data.inference; allowed keys are {list(settings)}.")
        settings.update(given)
        try:
            InferenceConfig.from_mapping(settings)
        except ConfigError as error:
            raise ConfigError(f"data.{error}") from None
        return settings

    def dataset(self, split: str) -> SegmentationDataset:
        """The raw dataset of ``split`` (a dataset split name such as train/val/test), built once."""
        if split not in self._datasets:
            built = self.dataset_factory(self.root, split)
            if built.num_classes != self.num_classes:
                raise ConfigError(
                    f"data.num_classes is {self.num_classes} but {type(built).__name__} at {self.root} "
                    f"has {built.num_classes} classes; set data.num_classes={built.num_classes}."
                )
            self._datasets[split] = built
        return self._datasets[split]

    def _reference(self) -> SegmentationDataset:
        return next(iter(self._datasets.values())) if self._datasets else self.dataset(self.splits["val"])

    @property
    def classes(self) -> list[str]:
        return self._reference().classes

    @property
    def palette(self) -> list[list[int]]:
        return self._reference().palette

    def prepare_data(self) -> None:
        # Building a dataset validates its layout (and writes the sample scenes when needed)
        # once, before any process starts training.
        self.dataset(self.splits["train"])

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.dataset(self.splits["train"])
        if stage in (None, "fit", "validate"):
            self.dataset(self.splits["val"])
        if stage in (None, "test"):
            self.dataset(self.splits["test"])

    def _loader(self, samples: Dataset, batch_size: int, train: bool, collate: Callable | None) -> DataLoader:
        return DataLoader(
            samples,
            batch_size=batch_size,
            # Under DDP each evaluation image goes to one rank only (no padding, no double counting).
            sampler=self._train_sampler if train else EvalSampler(samples),
            drop_last=train and len(samples) >= batch_size,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            collate_fn=collate,
        )

    def train_dataloader(self) -> DataLoader:
        # Lightning calls a mid-epoch resume unreliable unless the loader has state_dict(); ours is exact.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        samples = TrainSamples(self.dataset(self.splits["train"]), self.train_transform, self.skip_bad_samples)
        self._train_sampler = ResumableSampler(samples)
        if self._sampler_state is not None:
            self._train_sampler.load_state_dict(self._sampler_state)
            self._sampler_state = None
        return self._loader(samples, self.batch_size, True, None)

    def state_dict(self) -> dict[str, Any]:
        """The train sampler's seed, epoch and position, saved in every checkpoint."""
        if self._train_sampler is None or self.trainer is None:
            return {}
        # Batches the training loop has used this epoch (the loader itself reads ahead).
        used = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"train_sampler": self._train_sampler.state_dict(consumed=used * self.batch_size)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict.get("train_sampler")
        if state is None:
            return
        if self._train_sampler is not None:
            self._train_sampler.load_state_dict(state)
        else:
            self._sampler_state = state

    def val_dataloader(self) -> DataLoader:
        samples = EvalSamples(self.dataset(self.splits["val"]), self.eval_transforms)
        return self._loader(samples, self.val_batch_size, False, collate_eval)

    def test_dataloader(self) -> DataLoader:
        samples = EvalSamples(self.dataset(self.splits["test"]), self.eval_transforms)
        return self._loader(samples, self.val_batch_size, False, collate_eval)
