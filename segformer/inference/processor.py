"""Pre- and post-processing with the semantics of transformers' ``SegformerImageProcessor``.

Users coming from transformers call ``processor(images, segmentation_maps)`` and
``processor.post_process_semantic_segmentation(outputs, target_sizes)``; this does the same
computation (PIL resize, rescale, normalise, label reduction, as transformers' PIL backend does)
without transformers. ``size={"shortest_edge": s, "longest_edge": l}`` is our evaluation resize
instead: fit inside (l, s) keeping the ratio, rounded to the nearest pixel, OpenCV bilinear, sides
rounded up to ``size_divisor`` -- the test transform eval.py uses (transformers' processor rounds
the long side down and resizes with PIL there). ``preprocessor_config.json`` is read and written
in transformers' format, so both processors load the same file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import albumentations as A
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from segformer.data.datamodule import pad_images
from segformer.data.datasets import IGNORE_INDEX
from segformer.data.transforms import RescaleToScale
from segformer.errors import ConfigError, DataError

CONFIG_NAME = "preprocessor_config.json"
# transformers' IMAGENET_DEFAULT_MEAN / STD, on 0-1 values.
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, as transformers stores it


class BatchFeature(dict):
    """A dict of tensors with attribute access (``inputs.pixel_values``), like transformers'."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: torch.device | str) -> BatchFeature:
        return BatchFeature({k: v.to(device) if isinstance(v, Tensor) else v for k, v in self.items()})


def to_rgb_array(image: Any) -> np.ndarray:
    """One image (PIL, numpy or tensor; HWC or CHW; grey, RGB or RGBA; uint8, or float in 0-1 or
    0-255) as (H, W, 3) uint8 RGB. Floats are rounded to 8 bits, as every resize here works on them."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise DataError(
            f"Cannot read a {type(image).__name__} as an image: give a PIL image, a numpy array or a tensor "
            "(H x W x 3, 3 x H x W or H x W), or a file path."
        )
    array = _channels_last(image)
    if array.dtype != np.uint8:
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)) or array.size == 0:
            raise DataError(f"Cannot read an array of dtype {array.dtype} and shape {image.shape} as an image.")
        values = array.astype(np.float64)
        if np.issubdtype(array.dtype, np.floating) and values.max(initial=0) <= 1.0:
            values = values * 255
        if values.min(initial=0) < 0 or values.max(initial=0) > 255:
            raise DataError(
                f"Image values must lie in 0-255 (or 0-1 for floats), got {values.min():g}..{values.max():g}."
            )
        array = np.rint(values).astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array[:, :, :3])


def _channels_last(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image[:, :, None]
    if image.ndim == 3 and image.shape[-1] in (1, 3, 4):
        return image
    if image.ndim == 3 and image.shape[0] in (1, 3, 4):
        return image.transpose(1, 2, 0)
    raise DataError(
        f"Cannot read an array of shape {tuple(image.shape)} as one image: expected H x W, H x W x C or "
        "C x H x W with 1, 3 or 4 channels."
    )


def _label_array(label: Any) -> np.ndarray:
    if isinstance(label, Image.Image):
        label = np.asarray(label)
    if isinstance(label, Tensor):
        label = label.detach().cpu().numpy()
    label = np.asarray(label)
    if label.ndim == 3 and 1 in (label.shape[0], label.shape[-1]):
        label = label.reshape(label.shape[1:] if label.shape[0] == 1 else label.shape[:-1])
    if label.ndim != 2 or not (np.issubdtype(label.dtype, np.integer) or np.issubdtype(label.dtype, np.floating)):
        raise DataError(f"A segmentation map must be one H x W array of class ids, got shape {label.shape}.")
    return label.astype(np.int64)


def _label_list(maps: Any) -> list[Any]:
    """One (H, W) map, a list of maps or a (B, H, W) array/tensor, as a list of maps."""
    if isinstance(maps, (list, tuple)):
        return list(maps)
    if isinstance(maps, (np.ndarray, Tensor)) and maps.ndim == 3:
        return list(maps)
    return [maps]


def is_single_image(images: Any) -> bool:
    """True for one image, False for a list of images or a 4-D batch array/tensor."""
    if isinstance(images, (list, tuple)):
        return False
    return not (isinstance(images, (np.ndarray, Tensor)) and images.ndim == 4)


def as_image_list(images: Any) -> list[Any]:
    """One image, a list of images or a 4-D batch, as a list of single images."""
    if is_single_image(images):
        return [images]
    return list(images)


class SegFormerImageProcessor:
    """transformers' ``SegformerImageProcessor``: resize, rescale, normalise and label reduction.

    ``size`` is {"height", "width"} (transformers' fixed-size resize with PIL ``resample``) or
    {"shortest_edge", "longest_edge"} (our evaluation resize, see the module docstring, with
    ``size_divisor``). ``image_mean`` / ``image_std`` apply after rescaling (0-1 values).
    ``do_reduce_labels`` maps 0 to 255 and k to k - 1 (ADE20K's "other" becomes ignore).
    """

    def __init__(
        self,
        do_resize: bool = True,
        size: Mapping[str, int] | None = None,
        resample: int = BILINEAR,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        image_std: Sequence[float] = IMAGENET_DEFAULT_STD,
        do_reduce_labels: bool = False,
        size_divisor: int | None = None,
    ) -> None:
        self.do_resize = bool(do_resize)
        self.size = dict(size or {"height": 512, "width": 512})
        if set(self.size) not in ({"height", "width"}, {"shortest_edge", "longest_edge"}) or not all(
            isinstance(v, int) and v > 0 for v in self.size.values()
        ):
            raise ConfigError(
                f"size must be {{'height': H, 'width': W}} (a fixed size) or {{'shortest_edge': S, "
                f"'longest_edge': L}} (keep-ratio evaluation resize) with positive integers, got {size!r}."
            )
        if size_divisor is not None and not (isinstance(size_divisor, int) and size_divisor > 0):
            raise ConfigError(f"size_divisor must be a positive integer or None, got {size_divisor!r}.")
        self.resample = int(resample)
        self.do_rescale, self.rescale_factor = bool(do_rescale), float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        self.image_mean = [float(v) for v in image_mean]
        self.image_std = [float(v) for v in image_std]
        self.do_reduce_labels = bool(do_reduce_labels)
        self.size_divisor = size_divisor

    @property
    def keeps_ratio(self) -> bool:
        return "shortest_edge" in self.size

    # ------------------------------------------------------------------ config files

    def to_dict(self) -> dict[str, Any]:
        """The preprocessor_config.json content, in transformers' format."""
        config = {
            "image_processor_type": "SegformerImageProcessor",
            "do_resize": self.do_resize,
            "size": dict(self.size),
            "resample": self.resample,
            "do_rescale": self.do_rescale,
            "rescale_factor": self.rescale_factor,
            "do_normalize": self.do_normalize,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "do_reduce_labels": self.do_reduce_labels,
        }
        if self.size_divisor is not None:
            config["size_divisor"] = self.size_divisor  # ours: transformers reads and ignores it
        return config

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> SegFormerImageProcessor:
        keys = (
            "do_resize",
            "size",
            "resample",
            "do_rescale",
            "rescale_factor",
            "do_normalize",
            "image_mean",
            "image_std",
            "do_reduce_labels",
            "size_divisor",
        )
        settings = {k: config[k] for k in keys if k in config}
        if "reduce_labels" in config and "do_reduce_labels" not in config:  # older transformers files
            settings["do_reduce_labels"] = config["reduce_labels"]
        return cls(**settings)

    @classmethod
    def from_test_settings(
        cls,
        scale: Sequence[int],
        size_divisor: int | None,
        mean: Sequence[float],
        std: Sequence[float],
        reduce_labels: bool = False,
    ) -> SegFormerImageProcessor:
        """Our evaluation transform (fit to ``scale`` = (long, short), mean/std on 0-255 values)."""
        return cls(
            size={"shortest_edge": int(min(scale)), "longest_edge": int(max(scale))},
            size_divisor=size_divisor,
            image_mean=[m / 255 for m in mean],
            image_std=[s / 255 for s in std],
            do_reduce_labels=reduce_labels,
        )

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory).expanduser()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / CONFIG_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike) -> SegFormerImageProcessor:
        """From a folder holding preprocessor_config.json, the file itself, a hub id or a preset name."""
        path = Path(source).expanduser()
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.exists():
            path = _download_config(str(source))
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"Cannot read {str(path)!r} as a preprocessor config: {error}.") from None
        return cls.from_dict(config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({json.dumps(self.to_dict(), indent=2)})"

    # ------------------------------------------------------------------ preprocessing

    def __call__(self, images: Any, segmentation_maps: Any = None, **overrides: Any) -> BatchFeature:
        return self.preprocess(images, segmentation_maps, **overrides)

    def preprocess(self, images: Any, segmentation_maps: Any = None, **overrides: Any) -> BatchFeature:
        """``pixel_values`` (B, 3, H, W) float32 and, with ``segmentation_maps``, ``labels``
        (B, H, W) int64. Images of different sizes (keep-ratio resize) are zero-padded bottom/right,
        labels with 255, and ``image_sizes`` (B, 2) gives each one's own size. Keyword overrides
        (``do_reduce_labels=True``, ``size=...``) apply to this call only, as in transformers."""
        if overrides:
            return type(self).from_dict({**self.to_dict(), **overrides}).preprocess(images, segmentation_maps)
        arrays = [to_rgb_array(image) for image in as_image_list(images)]
        pixel_values = [self._image(array) for array in arrays]
        out: dict[str, Any] = {}
        out["pixel_values"], sizes, padded = _stack(pixel_values, 0.0)
        if segmentation_maps is not None:
            maps = _label_list(segmentation_maps)
            if len(maps) != len(arrays):
                raise DataError(f"Got {len(arrays)} image(s) but {len(maps)} segmentation map(s).")
            labels = [self._label(_label_array(m), a.shape[:2]) for m, a in zip(maps, arrays)]
            out["labels"], _, _ = _stack(labels, IGNORE_INDEX)
        if padded:
            out["image_sizes"] = sizes
        return BatchFeature(out)

    def _resize_pil(self, array: np.ndarray, resample: int) -> np.ndarray:
        height, width = self.size["height"], self.size["width"]
        return np.asarray(Image.fromarray(array).resize((width, height), resample=resample))

    def _keep_ratio(self) -> A.Compose:
        scale = (self.size["longest_edge"], self.size["shortest_edge"])
        return A.Compose([RescaleToScale(scale, None, self.size_divisor)])

    def _image(self, array: np.ndarray) -> Tensor:
        if self.do_resize:
            array = (
                self._keep_ratio()(image=array)["image"] if self.keeps_ratio else self._resize_pil(array, self.resample)
            )
        values = array.astype(np.float32)
        if self.do_rescale:
            values = (array.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, np.float32)
            std = np.asarray(self.image_std, np.float32)
            values = (values - mean) / std
        return torch.from_numpy(np.ascontiguousarray(values.transpose(2, 0, 1)))

    def _label(self, label: np.ndarray, image_size: tuple[int, int]) -> Tensor:
        if label.shape != image_size:
            raise DataError(f"A segmentation map of size {label.shape} belongs to an image of size {image_size}.")
        if self.do_reduce_labels:
            label = np.where(label == 0, 255, label - 1)
            label[label == 254] = 255
        if self.do_resize:
            if label.min() < 0 or label.max() > 255:
                raise DataError("Segmentation maps are resized as 8-bit images: class ids must lie in 0-255.")
            small = label.astype(np.uint8)
            if self.keeps_ratio:
                dummy = np.zeros((*small.shape, 3), np.uint8)
                small = self._keep_ratio()(image=dummy, mask=small)["mask"]
            else:
                small = self._resize_pil(small, Image.Resampling.NEAREST)
            label = small.astype(np.int64)
        return torch.from_numpy(np.ascontiguousarray(label))

    # ------------------------------------------------------------------ post-processing

    def post_process_semantic_segmentation(
        self, outputs: Any, target_sizes: Sequence[Sequence[int]] | Tensor | None = None
    ) -> list[Tensor]:
        """One (H, W) class map per image: the argmax of the logits, resized bilinearly to
        ``target_sizes[i]`` first when given (else at the logits' 1/4 resolution). ``outputs`` is
        the logits tensor or anything with ``.logits`` (ours or transformers')."""
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        if target_sizes is None:
            return list(logits.argmax(dim=1))
        if len(target_sizes) != len(logits):
            raise ValueError(
                f"Got {len(target_sizes)} target sizes for {len(logits)} images: give one (height, width) per image."
            )
        sizes = target_sizes.tolist() if isinstance(target_sizes, Tensor) else target_sizes
        return [
            F.interpolate(logits[i : i + 1], size=tuple(int(v) for v in size), mode="bilinear", align_corners=False)[
                0
            ].argmax(dim=0)
            for i, size in enumerate(sizes)
        ]


def _stack(tensors: list[Tensor], fill: float) -> tuple[Tensor, Tensor, bool]:
    """Stacked tensors, each one's (h, w), and whether they needed padding to stack."""
    if len({t.shape for t in tensors}) == 1:
        return torch.stack(tensors), torch.tensor([list(t.shape[-2:]) for t in tensors]), False
    return *pad_images(tensors, fill), True


def _download_config(source: str) -> Path:
    from segformer.model.presets import resolve_source

    repo_id = resolve_source(source)
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, CONFIG_NAME))
    except Exception as error:  # noqa: BLE001 - every hub failure becomes one clear message
        raise ConfigError(
            f"No local {CONFIG_NAME} at {source!r}, and fetching it from the Hugging Face hub as {repo_id!r} "
            f"failed ({type(error).__name__}). Offline, download it elsewhere "
            f"(huggingface-cli download {repo_id} {CONFIG_NAME} --local-dir DIR) and pass the folder."
        ) from None
