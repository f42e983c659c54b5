"""A trained model together with the preprocessing and inference it was evaluated with.

predict.py segments image files with a ``Predictor`` through ``segment``, the engine
``SegFormer.predict`` runs too; ``segformer.export`` writes a predictor out with a preprocessor
config and a model card. The settings come, in this order, from the command line
(``scale=``, ``inference.<key>=``), from a dataset config (``data=<name>``), from the training run
the checkpoint belongs to (``<run>/.hydra/config.yaml``), or else from the paper's ADE20K test
setting. Only an explicit dataset gives the class palette and the dataset's own label ids (its
files must be on disk); otherwise predictions stay in training ids with a generated palette.
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from segformer.data.datamodule import eval_transforms, eval_views, pad_images, plain
from segformer.data.datasets import IMAGE_SUFFIXES, SegmentationDataset
from segformer.data.labels import generated_palette
from segformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from segformer.errors import CheckpointError, ConfigError, DataError
from segformer.inference import InferenceConfig, predict_batch
from segformer.inference.processor import to_rgb_array
from segformer.inference.pictures import colorize, make_palette, overlay
from segformer.inference.writers import save_label_png
from segformer.model.segformer import MIN_INPUT_SIZE, SegFormer

# The paper's ADE20K test scale (the data module's default), for checkpoints of unknown origin.
DEFAULT_SCALE = (2048, 512)

# Sub-folders of predict.py's output and the suffix of the files written there.
OUTPUTS = {"labels": ".png", "colour": ".png", "overlay": ".jpg"}


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation transform's settings: keep-ratio resize to fit ``scale`` = (long, short),
    sides rounded up to ``size_divisor``, normalisation with ``mean``/``std`` on 0-255 values."""

    scale: tuple[int, int] = DEFAULT_SCALE
    size_divisor: int | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any]) -> Preprocessing:
        """From a data config (``configs/data/*.yaml`` keys); missing keys keep the defaults."""
        values = plain({key: node.get(key) for key in ("scale", "size_divisor", "mean", "std")})
        default = cls()
        divisor = values["size_divisor"]
        if divisor is not None and not (isinstance(divisor, int) and divisor > 0):
            raise ConfigError(f"size_divisor must be a positive integer or null, got {divisor!r}.")
        preprocessing = cls(
            default.scale,
            divisor,
            tuple(float(v) for v in values["mean"] or default.mean),
            tuple(float(v) for v in values["std"] or default.std),
        )
        return preprocessing.with_scale(values["scale"] or default.scale)

    def with_scale(self, scale: Sequence[int]) -> Preprocessing:
        values = list(plain(scale))
        if len(values) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            raise ConfigError(f"scale must be [long, short], two positive integers, got {scale!r}.")
        return Preprocessing((max(values), min(values)), self.size_divisor, tuple(self.mean), tuple(self.std))

    def transforms(self, ratios: Sequence[float] = (1.0,)) -> list[A.Compose]:
        """The evaluation transform of every test-time ratio (``inference.scales``)."""
        return eval_transforms(self.scale, ratios, self.size_divisor, mean=self.mean, std=self.std)


@dataclass
class Predictor:
    """A model ready to segment photos the way it was evaluated."""

    model: SegFormer
    preprocessing: Preprocessing
    inference: InferenceConfig
    palette: list[list[int]]
    dataset: SegmentationDataset | None
    settings_from: str
    run_dir: Path | None
    run_config: DictConfig | None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def class_names(self) -> list[str]:
        return [self.model.id2label[k] for k in range(self.model.num_classes)]

    @property
    def dataset_name(self) -> str | None:
        """The dataset's class name (ADE20K, Cityscapes, ...), from data= or the training run."""
        if self.dataset is not None:
            return type(self.dataset).__name__
        target = OmegaConf.select(self.run_config, "data.dataset._target_") if self.run_config is not None else None
        return str(target).rsplit(".", 1)[-1] if target else None

    @property
    def reduces_labels(self) -> bool:
        """True when the dataset's ids are training ids + 1 with 0 = unlabelled (ADE20K-style)."""
        if self.dataset is None:
            return False
        train_ids = np.arange(self.model.num_classes)
        return bool(np.array_equal(self.dataset.to_dataset_ids(train_ids), train_ids + 1))

    def to_dataset_ids(self, pred: np.ndarray) -> np.ndarray:
        return self.dataset.to_dataset_ids(pred) if self.dataset is not None else pred

    def describe(self) -> str:
        p, i = self.preprocessing, self.inference
        mode = i.mode if i.mode == "whole" else f"slide {list(i.crop_size or ())} stride {list(i.stride or ())}"
        extras = (f", scales {list(i.scales)}" if i.scales != (1.0,) else "") + (", flip" if i.flip else "")
        divisor = f" (sides rounded up to x{p.size_divisor})" if p.size_divisor else ""
        return (
            f"SegFormer-{self.model.variant.upper()}, {self.model.num_classes} classes, on {self.device}; "
            f"resize to fit {list(p.scale)}{divisor}, {mode} inference{extras} (settings from {self.settings_from})"
        )


def load_predictor(
    ckpt_path: str | os.PathLike,
    data: DictConfig | None = None,
    scale: Sequence[int] | None = None,
    inference: Mapping[str, Any] | None = None,
    device: str | None = None,
) -> Predictor:
    """Build a ``Predictor``: ``data`` is a ``configs/data`` node (``cfg.data``), ``scale`` and the
    non-null ``inference`` keys override the settings found, ``device`` None picks CUDA if present."""
    target = _device(device)
    model = SegFormer.from_pretrained(ckpt_path).eval().to(target)
    run_dir = training_run_dir(ckpt_path)
    run_config = OmegaConf.load(run_dir / ".hydra" / "config.yaml") if run_dir is not None else None
    dataset = None
    if data is not None:
        datamodule = hydra.utils.instantiate(data)
        dataset = _dataset(datamodule, ckpt_path, model)
        preprocessing = Preprocessing.from_mapping(data)
        base_inference: Mapping[str, Any] = datamodule.inference
        settings_from = f"the data config ({type(dataset).__name__})"
    elif run_config is not None and run_config.get("data") is not None:
        preprocessing = Preprocessing.from_mapping(run_config.data)
        base_inference = plain(run_config.data.get("inference")) or {}
        settings_from = f"the training run {run_dir}"
    else:
        preprocessing, base_inference = Preprocessing(), {}
        settings_from = "defaults (the paper's ADE20K test setting)"
    if scale is not None:
        preprocessing = preprocessing.with_scale(scale)
        settings_from += ", scale from the command line"
    overrides = {key: value for key, value in plain(inference or {}).items() if value is not None}
    if dataset is not None and _placeholder_names(model):
        model.id2label = dict(enumerate(dataset.classes))
    return Predictor(
        model=model,
        preprocessing=preprocessing,
        inference=InferenceConfig.from_mapping(base_inference, **overrides),
        palette=dataset.palette if dataset is not None else generated_palette(model.num_classes),
        dataset=dataset,
        settings_from=settings_from,
        run_dir=run_dir,
        run_config=run_config,
    )


def training_run_dir(ckpt_path: str | os.PathLike) -> Path | None:
    """The train.py run folder a checkpoint was saved in (``<run>/checkpoints/best.ckpt``), if any."""
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        return None
    for folder in (path.parent, path.parent.parent) if path.is_file() else (path, path.parent):
        if (folder / ".hydra" / "config.yaml").is_file():
            return folder
    return None


def _device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device: use cpu, cuda or cuda:<index> (null picks one).") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but no CUDA GPU is available; use device=cpu or leave device unset.")
    return device


def _dataset(datamodule: Any, ckpt_path: str | os.PathLike, model: SegFormer) -> SegmentationDataset:
    try:
        dataset = datamodule.dataset(datamodule.splits["test"])
    except DataError as error:
        raise DataError(
            "data=... reads the class palette and the dataset's own label ids from the dataset on disk: "
            "point data.root at it, or leave data= out to write training ids (and set scale=[long,short] "
            f"to its test scale). {error}"
        ) from error
    if dataset.num_classes != model.num_classes:
        raise CheckpointError(
            f"Checkpoint {str(ckpt_path)!r} predicts {model.num_classes} classes but {type(dataset).__name__} "
            f"has {dataset.num_classes}: give the data config the model was trained on."
        )
    return dataset


def _placeholder_names(model: SegFormer) -> bool:
    return all(name == f"class_{k}" for k, name in model.id2label.items())


def find_images(pattern: str | os.PathLike) -> list[Path]:
    """The image files (by suffix) of a file, a folder (not its sub-folders) or a glob (``**`` recurses)."""
    text = os.path.expanduser(str(pattern))
    path = Path(text)
    if path.is_file():
        return [path]
    if path.is_dir():
        found, where = sorted(path.iterdir()), f"the folder {path} holds"
    elif glob.has_magic(text):
        found, where = sorted(Path(p) for p in glob.glob(text, recursive=True)), f"the pattern {text!r} matches"
    else:
        raise DataError(
            f"input={str(pattern)!r} does not exist: give an image file, a folder of images or a glob "
            "such as 'photos/*.jpg'."
        )
    images = [p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise DataError(f"input: {where} no image files ({', '.join(IMAGE_SUFFIXES)}).")
    return images


def output_paths(output: Path, image: Path) -> dict[str, Path]:
    """Where the label map, the palette image and the overlay of ``image`` go."""
    return {kind: output / kind / f"{image.stem}{suffix}" for kind, suffix in OUTPUTS.items()}


def check_outputs(images: Sequence[Path], output: Path, overwrite: bool) -> None:
    """Refuse two inputs writing the same files, and existing files unless ``overwrite``."""
    by_stem: dict[str, list[Path]] = {}
    for image in images:
        by_stem.setdefault(image.stem, []).append(image)
    clashes = [paths for paths in by_stem.values() if len(paths) > 1]
    if clashes:
        shown = "; ".join(" and ".join(str(p) for p in paths) for paths in clashes[:3])
        raise DataError(
            f"Inputs with the same file name would write the same outputs: {shown}"
            f"{' ...' if len(clashes) > 3 else ''}. Predict them into separate output folders."
        )
    if overwrite:
        return
    existing = [p for image in images for p in output_paths(output, image).values() if p.exists()]
    if existing:
        shown = ", ".join(str(p) for p in existing[:3])
        raise ConfigError(
            f"output={str(output)!r} already holds {len(existing)} file(s) this run would write ({shown}"
            f"{', ...' if len(existing) > 3 else ''}); choose another output folder or pass overwrite=true."
        )


def read_photo(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB as image viewers show it: EXIF orientation applied (phone photos), as
    transformers' pipeline does too. Dataset readers do not, their masks follow the stored pixels."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read {path}: {error}") from error


class ImageFiles(Dataset):
    """Images read (from a path) or converted (PIL, numpy, tensor) and resized in DataLoader
    workers, once per test scale (``transforms``) as evaluation does; an unreadable or too small
    image becomes an ``error`` item instead of stopping the loader."""

    def __init__(self, images: Sequence[Any], transforms: Sequence[A.Compose]) -> None:
        self.images, self.transforms = list(images), list(transforms)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.images[index]
        path = Path(item) if isinstance(item, (str, os.PathLike)) else f"image {index}"
        try:
            image = read_photo(path) if isinstance(path, Path) else to_rgb_array(item)
        except DataError as error:
            return {"path": path, "error": str(error)}
        views = eval_views(image, self.transforms)
        smallest = min(min(view.shape[-2:]) for view in views)
        if smallest < MIN_INPUT_SIZE:
            return {
                "path": path,
                "error": f"{path} is {image.shape[0]}x{image.shape[1]}; resized for the model its shorter "
                f"side is {smallest} px, below the {MIN_INPUT_SIZE} px SegFormer needs",
            }
        return {"path": path, "image": image, "views": views}


def collate_images(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch in the eval layout (zero-padded ``pixel_values``, ``image_sizes``, ``scale_views``,
    ``label_sizes`` = original sizes) plus the original ``images`` and ``paths``, and the ``failed``
    (path, reason)."""
    good = [s for s in samples if "error" not in s]
    batch: dict[str, Any] = {"failed": [(s["path"], s["error"]) for s in samples if "error" in s], "paths": []}
    if not good:
        return batch
    (pixel_values, image_sizes), *scale_views = [
        pad_images([s["views"][k] for s in good]) for k in range(len(good[0]["views"]))
    ]
    batch.update(
        pixel_values=pixel_values,
        image_sizes=image_sizes,
        label_sizes=torch.tensor([list(s["image"].shape[:2]) for s in good]),
        images=[s["image"] for s in good],
        paths=[s["path"] for s in good],
    )
    if scale_views:
        batch["scale_views"] = scale_views
    return batch


def segment(
    model: SegFormer,
    images: Sequence[Any],
    preprocessing: Preprocessing,
    inference: InferenceConfig,
    batch_size: int = 4,
    num_workers: int = 0,
) -> Iterator[tuple[dict[str, Any], list[Tensor]]]:
    """Each ``collate_images`` batch of ``images`` (paths or in-memory images) with its class maps
    (training ids, on the model's device) at the original sizes: ``SegFormer.predict`` and
    predict.py both run this."""
    device = next(model.parameters()).device
    files = ImageFiles(images, preprocessing.transforms(inference.scales))
    loader = DataLoader(
        files,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images,
        pin_memory=device.type == "cuda",
    )
    for batch in loader:
        if not batch["paths"]:
            yield batch, []
            continue
        views = {key: batch[key] for key in ("image_sizes", "label_sizes")}
        views["pixel_values"] = batch["pixel_values"].to(device)
        views["scale_views"] = [(pixels.to(device), sizes) for pixels, sizes in batch.get("scale_views", ())]
        yield batch, predict_batch(model, views, inference)


def write_outputs(
    predictor: Predictor, output: Path, path: Path, image: np.ndarray, pred: np.ndarray, alpha: float
) -> dict[str, Path]:
    """Write the label PNG (dataset ids, 16-bit when they exceed 255), palette PNG and overlay."""
    paths = output_paths(output, path)
    palette = make_palette(len(predictor.palette), predictor.palette)
    save_label_png(paths["labels"], predictor.to_dataset_ids(pred))
    Image.fromarray(colorize(pred, palette)).save(paths["colour"])
    Image.fromarray(overlay(image, pred, palette, alpha)).save(paths["overlay"], quality=90)
    return paths


def predict_images(
    predictor: Predictor,
    images: Sequence[Path],
    output: str | os.PathLike,
    batch_size: int = 4,
    num_workers: int = 2,
    overwrite: bool = False,
    overlay_alpha: float = 0.5,
    progress: bool = True,
) -> list[tuple[Path, str]]:
    """Segment ``images`` into ``output``/{labels,colour,overlay}/; returns the (path, reason) of
    every image that could not be segmented, each also reported on stderr as it is skipped."""
    if not 0.0 <= overlay_alpha <= 1.0:
        raise ConfigError(f"overlay_alpha must be between 0 and 1, got {overlay_alpha}.")
    if batch_size < 1 or num_workers < 0:
        raise ConfigError(
            f"batch_size must be at least 1 and num_workers at least 0, got {batch_size} and {num_workers}."
        )
    output = Path(output).expanduser()
    check_outputs(images, output, overwrite)
    for kind in OUTPUTS:
        (output / kind).mkdir(parents=True, exist_ok=True)
    failed: list[tuple[Path, str]] = []
    with tqdm(total=len(images), unit="image", disable=not progress) as bar:
        batches = segment(
            predictor.model, images, predictor.preprocessing, predictor.inference, batch_size, num_workers
        )
        for batch, preds in batches:
            for path, reason in batch["failed"]:
                tqdm.write(f"skipped {reason}", file=sys.stderr)
                failed.append((path, reason))
            for path, image, pred in zip(batch["paths"], batch["images"], preds, strict=True):
                write_outputs(predictor, output, path, image, pred.cpu().numpy(), overlay_alpha)
            bar.update(len(batch["paths"]) + len(batch["failed"]))
    return failed
