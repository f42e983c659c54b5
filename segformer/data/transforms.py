"""The paper's train and test pipelines as albumentations compositions.

Albumentations does flip, normalize, pad and tensor conversion. Three steps of the SegFormer /
MMSegmentation recipe have no albumentations equivalent and are written here as albumentations
transforms: the keep-ratio rescale against a base scale ``(long, short)`` with a random ratio,
the random crop re-drawn until no class covers more than ``cat_max_ratio`` of it, and the
photometric distortion with MMSegmentation's exact parameter semantics.

Randomness comes from the Compose's own generators (``set_random_state``), which the data
module reseeds per sample from torch so that ``seed_everything(seed, workers=True)`` makes the
pipeline reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.augmentations.crops.transforms import BaseCrop
from albumentations.core.type_definitions import Targets
from albumentations.pytorch import ToTensorV2

from segformer.errors import ConfigError

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def rescaled_size(
    height: int, width: int, scale: Sequence[int], ratio: float = 1.0, size_divisor: int | None = None
) -> tuple[int, int]:
    """Size after fitting (h, w) inside ``scale * ratio`` = (long, short) keeping its ratio.

    The long side ends at most at ``long``, the short side at most at ``short`` (MMSegmentation's
    keep-ratio resize); ``size_divisor`` then rounds both sides up to a multiple of it, as
    NVlabs' AlignedResize does for testing.
    """
    return aligned_sizes(height, width, scale, ratio, size_divisor)[1]


def aligned_sizes(
    height: int, width: int, scale: Sequence[int], ratio: float = 1.0, size_divisor: int | None = None
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two sizes of NVlabs' AlignedResize: mmcv ``imrescale`` keeping the ratio to fit
    ``scale * ratio`` (sides rounded with +0.5), then that size rounded up to a multiple of
    ``size_divisor`` (the same size again without one)."""
    long_edge, short_edge = int(max(scale) * ratio), int(min(scale) * ratio)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    rescaled = max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)
    if not size_divisor:
        return rescaled, rescaled
    return rescaled, (-(-rescaled[0] // size_divisor) * size_divisor, -(-rescaled[1] // size_divisor) * size_divisor)


def aligned_resize(
    image: np.ndarray,
    scale: Sequence[int],
    size_divisor: int | None = None,
    ratio: float = 1.0,
    interpolation: int = cv2.INTER_LINEAR,
) -> np.ndarray:
    """NVlabs' AlignedResize of an (H, W[, C]) array: keep-ratio rescale to ``scale * ratio``,
    then, with ``size_divisor``, a second resize to the sides rounded up to a multiple of it
    (two cv2 resizes, as mmcv does: a single resize to the final size gives other values)."""
    rescaled, aligned = aligned_sizes(image.shape[0], image.shape[1], scale, ratio, size_divisor)
    for height, width in (rescaled, aligned) if aligned != rescaled else (rescaled,):
        image = cv2.resize(image, (width, height), interpolation=interpolation)
    return image


class RescaleToScale(A.DualTransform):
    """Keep-ratio resize to a base scale (long, short), times a ratio drawn from ``ratio_range``;
    with ``size_divisor``, NVlabs' two-step AlignedResize (``aligned_resize``).

    Images use bilinear interpolation and masks nearest, as in MMSegmentation.
    """

    _targets = (Targets.IMAGE, Targets.MASK)

    def __init__(
        self,
        scale: Sequence[int],
        ratio_range: Sequence[float] | None = None,
        size_divisor: int | None = None,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.scale = tuple(int(s) for s in scale)
        self.ratio_range = tuple(float(r) for r in ratio_range) if ratio_range is not None else None
        self.size_divisor = size_divisor

    def get_params(self) -> dict[str, Any]:
        return {"ratio": self.py_random.uniform(*self.ratio_range) if self.ratio_range else 1.0}

    def apply(self, img: np.ndarray, ratio: float, **params: Any) -> np.ndarray:
        return aligned_resize(img, self.scale, self.size_divisor, ratio, cv2.INTER_LINEAR)

    def apply_to_mask(self, mask: np.ndarray, ratio: float, **params: Any) -> np.ndarray:
        return aligned_resize(mask, self.scale, self.size_divisor, ratio, cv2.INTER_NEAREST)

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("scale", "ratio_range", "size_divisor")


class CatMaxRatioCrop(BaseCrop):
    """Random crop re-drawn (up to ``max_tries`` times) while one class covers too much of it.

    A crop is accepted when it holds at least two classes and the largest covers less than
    ``cat_max_ratio`` of the labelled (non-ignore) pixels, as in MMSegmentation's RandomCrop.
    A side shorter than the crop is kept whole; padding comes afterwards.
    """

    _targets = (Targets.IMAGE, Targets.MASK)

    def __init__(
        self,
        height: int,
        width: int,
        cat_max_ratio: float = 0.75,
        max_tries: int = 10,
        ignore_index: int = 255,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.height, self.width = int(height), int(width)
        self.cat_max_ratio = float(cat_max_ratio)
        self.max_tries = int(max_tries)
        self.ignore_index = int(ignore_index)

    @property
    def targets_as_params(self) -> list[str]:
        return ["mask"]

    def _draw(self, height: int, width: int) -> tuple[int, int, int, int]:
        y0 = self.py_random.randint(0, max(height - self.height, 0))
        x0 = self.py_random.randint(0, max(width - self.width, 0))
        return x0, y0, min(x0 + self.width, width), min(y0 + self.height, height)

    def _acceptable(self, mask: np.ndarray, coords: tuple[int, int, int, int]) -> bool:
        x0, y0, x1, y1 = coords
        counts = np.bincount(mask[y0:y1, x0:x1].ravel(), minlength=256)
        counts[self.ignore_index] = 0
        counts = counts[counts > 0]
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        height, width = params["shape"][:2]
        coords = self._draw(height, width)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.max_tries):
                if self._acceptable(data["mask"], coords):
                    break
                coords = self._draw(height, width)
        return {"crop_coords": coords}

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("height", "width", "cat_max_ratio", "max_tries", "ignore_index")


def _affine_lut(alpha: float, beta: float) -> np.ndarray:
    """uint8 table of clip(x * alpha + beta, 0, 255) truncated, MMSegmentation's ``convert``."""
    return np.clip(np.arange(256, dtype=np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class PhotoMetricDistortion(A.ImageOnlyTransform):
    """MMSegmentation's PhotoMetricDistortion on RGB uint8 images, step for step.

    Each step runs with probability ``prob``: brightness (add a delta in +-brightness_delta),
    contrast (multiply by a factor in contrast_range), saturation (multiply HSV saturation by a
    factor in saturation_range, in its own RGB-HSV-RGB round trip), hue (shift HSV hue by an
    integer in [-hue_delta, hue_delta) -- numpy ``randint`` semantics -- on OpenCV's 0-180 scale,
    wrapping, in a second round trip). Contrast happens before or after the colour steps with
    equal odds. Every step clips and truncates to uint8 as the original does, which makes each
    one a 256-entry lookup table. The draws come from the transform's numpy generator in
    mmseg's order (brightness, mode, [contrast], saturation, hue, [contrast]), so a generator
    seeded alike gives mmseg's distortion.
    """

    def __init__(
        self,
        brightness_delta: int = 32,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: int = 18,
        prob: float = 0.5,
        p: float = 1.0,
    ) -> None:
        super().__init__(p=p)
        self.brightness_delta = float(brightness_delta)
        self.contrast_range = tuple(float(v) for v in contrast_range)
        self.saturation_range = tuple(float(v) for v in saturation_range)
        self.hue_delta = int(hue_delta)
        self.prob = float(prob)

    def _happens(self) -> bool:
        # mmseg's ``if random.randint(2)`` when prob is 0.5.
        rng = self.random_generator
        return bool(rng.integers(2)) if self.prob == 0.5 else bool(rng.random() < self.prob)

    def get_params(self) -> dict[str, Any]:
        rng = self.random_generator
        brightness = rng.uniform(-self.brightness_delta, self.brightness_delta) if self._happens() else None
        contrast_first = bool(rng.integers(2))
        contrast = None
        if contrast_first and self._happens():
            contrast = rng.uniform(*self.contrast_range)
        saturation = rng.uniform(*self.saturation_range) if self._happens() else None
        hue = int(rng.integers(-self.hue_delta, self.hue_delta)) if self._happens() else None
        if not contrast_first and self._happens():
            contrast = rng.uniform(*self.contrast_range)
        return {
            "brightness": brightness,
            "contrast": contrast,
            "contrast_first": contrast_first,
            "saturation": saturation,
            "hue": hue,
        }

    def apply(
        self,
        img: np.ndarray,
        brightness: float | None,
        contrast: float | None,
        contrast_first: bool,
        saturation: float | None,
        hue: int | None,
        **params: Any,
    ) -> np.ndarray:
        if brightness is not None:
            img = cv2.LUT(img, _affine_lut(1.0, brightness))
        if contrast is not None and contrast_first:
            img = cv2.LUT(img, _affine_lut(contrast, 0.0))
        if saturation is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 1] = cv2.LUT(hsv[..., 1], _affine_lut(saturation, 0.0))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if hue is not None:
            hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
            hsv[..., 0] = cv2.LUT(hsv[..., 0], ((np.arange(256) + hue) % 180).astype(np.uint8))
            img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
        if contrast is not None and not contrast_first:
            img = cv2.LUT(img, _affine_lut(contrast, 0.0))
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("brightness_delta", "contrast_range", "saturation_range", "hue_delta", "prob")


def _pair(name: str, value: Sequence[Any], kind: type = int) -> tuple[Any, Any]:
    try:
        first, second = (kind(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a pair of two numbers, got {value!r}.") from None
    if first <= 0 or second <= 0:
        raise ConfigError(f"{name} must be positive, got {value!r}.")
    return first, second


def train_transform(
    crop_size: Sequence[int],
    scale: Sequence[int],
    ratio_range: Sequence[float] | None = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    crop_tries: int = 10,
    flip_prob: float = 0.5,
    photometric: dict[str, Any] | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    ignore_index: int = 255,
) -> A.Compose:
    """Rescale, cat-max-ratio crop, flip, photometric distortion, normalize, pad, to tensor.

    ``photometric`` holds PhotoMetricDistortion's arguments (``{}`` gives the paper's values);
    None leaves it out. Padding is bottom/right: 0 for the image, ignore for
    the mask.
    """
    crop_h, crop_w = _pair("crop_size", crop_size)
    _pair("scale", scale)
    if ratio_range is not None:
        _pair("ratio_range", ratio_range, float)
    steps: list[A.BasicTransform] = [
        RescaleToScale(scale, ratio_range),
        CatMaxRatioCrop(crop_h, crop_w, cat_max_ratio, crop_tries, ignore_index),
        A.HorizontalFlip(p=flip_prob),
    ]
    if photometric is not None:
        try:
            steps.append(PhotoMetricDistortion(**photometric))
        except TypeError as error:
            raise ConfigError(f"Unknown photometric distortion option: {error}.") from None
    return A.Compose(
        [
            *steps,
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0),
            A.PadIfNeeded(
                min_height=crop_h,
                min_width=crop_w,
                position="top_left",
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=ignore_index,
            ),
            ToTensorV2(),
        ]
    )


def eval_transform(
    scale: Sequence[int],
    size_divisor: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> A.Compose:
    """Keep-ratio resize to the test scale (sides optionally rounded up to ``size_divisor``),
    normalize, to tensor. Applied to the image only: metrics use the original-size mask."""
    _pair("scale", scale)
    return A.Compose(
        [
            RescaleToScale(scale, None, size_divisor),
            A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=1.0),
            ToTensorV2(),
        ]
    )
