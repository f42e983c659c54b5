"""Turning a model's 1/4-resolution logits into full-resolution predictions.

Validation, eval.py, predict.py and ``SegFormer.predict`` all go through ``predict_batch``, and
it and ``batch_probs`` share one engine (``_scores``), so they can never disagree. Semantics follow MMSegmentation (and the
NVlabs code built on it):

- whole: run the model on the image, upsample the logits bilinearly to the image size;
- slide: run crop-sized windows (the last row / column shifted back to end at the border,
  clipped to the image when it is smaller than the crop), upsample each window's logits to the
  window size, and average overlapping logits;
- test-time augmentation (MultiScaleFlipAug): the data pipeline resizes the **original** image
  once per test scale (``segformer.data.datamodule.EvalSamples``); each of these views and, with
  ``flip``, its horizontal mirror is predicted, its logits resized to the original size, softmax
  taken, and the passes averaged.

A batch carries the first test scale as ``pixel_values`` / ``image_sizes`` (zero-padded, each
image's valid size) and every further scale as one (pixel_values, image_sizes) pair in
``scale_views``. Only one image's accumulators are alive at a time, in float32 on the image's
device; nothing is kept across images.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from segformer.errors import ConfigError
from segformer.model.resize import add_upsampled_rows, interpolation_matrix, resized_rows

Model = Callable[[Tensor], Tensor]
Window = tuple[int, int, int, int]  # y1, y2, x1, x2 (end exclusive)

MODES = ("whole", "slide")

# Values per band of a slide window's upsampled logits (classes x rows x crop width): 1 MiB.
BAND_ELEMENTS = 1 << 18


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _pair(key: str, value: Any) -> tuple[int, int]:
    items = [value, value] if isinstance(value, int) else list(value)
    if len(items) != 2 or not all(_is_number(v) and isinstance(v, int) and v > 0 for v in items):
        raise ConfigError(
            f"inference.{key} must be a positive integer or a [height, width] pair of positive "
            f"integers, got {value!r}."
        )
    return items[0], items[1]


@dataclass(frozen=True)
class InferenceConfig:
    """How predictions are made; ``crop_size`` and ``stride`` are [height, width] in pixels of the
    (test-resized) model input, ``window_batch`` is how many slide windows share one forward pass."""

    mode: str = "whole"
    crop_size: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False
    window_batch: int = 1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"inference.mode must be one of {list(MODES)}, got {self.mode!r}.")
        crop = None if self.crop_size is None else _pair("crop_size", self.crop_size)
        stride = None if self.stride is None else _pair("stride", self.stride)
        if self.mode == "slide" and (crop is None or stride is None):
            raise ConfigError(
                "inference.mode 'slide' needs inference.crop_size and inference.stride "
                f"(got crop_size={self.crop_size!r}, stride={self.stride!r})."
            )
        if crop is not None and stride is not None and (stride[0] > crop[0] or stride[1] > crop[1]):
            raise ConfigError(
                f"inference.stride {list(stride)} is larger than inference.crop_size {list(crop)}: "
                "windows would leave pixels unpredicted; use a stride no larger than the crop."
            )
        scales = [self.scales] if isinstance(self.scales, (int, float)) else list(self.scales)
        if not scales or not all(_is_number(s) and math.isfinite(s) and s > 0 for s in scales):
            raise ConfigError(
                f"inference.scales must be a non-empty list of positive numbers, got {self.scales!r}."
            )
        if not isinstance(self.flip, bool):
            raise ConfigError(f"inference.flip must be true or false, got {self.flip!r}.")
        batch = self.window_batch
        if not (_is_number(batch) and isinstance(batch, int) and batch > 0):
            raise ConfigError(
                f"inference.window_batch must be a positive integer, got {self.window_batch!r}."
            )
        object.__setattr__(self, "crop_size", crop)
        object.__setattr__(self, "stride", stride)
        object.__setattr__(self, "scales", tuple(float(s) for s in scales))

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any] | None = None, **overrides: Any) -> InferenceConfig:
        """Build from a dict or DictConfig (e.g. ``datamodule.inference``); overrides win."""
        given = {**dict(settings or {}), **overrides}
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(given) - set(allowed))
        if unknown:
            raise ConfigError(f"Unknown inference setting(s) {unknown}; allowed keys are {allowed}.")
        return cls(**given)


def slide_windows(
    height: int, width: int, crop_size: Sequence[int], stride: Sequence[int]
) -> list[Window]:
    """MMSeg's window grid: max(ceil((H - crop) / stride), 0) + 1 rows (same for columns); the
    last window is shifted back to end at the border, and clipped when the image is smaller."""
    (crop_h, crop_w), (stride_h, stride_w) = crop_size, stride
    rows = max(math.ceil((height - crop_h) / stride_h), 0) + 1
    cols = max(math.ceil((width - crop_w) / stride_w), 0) + 1
    windows = []
    for row in range(rows):
        y2 = min(row * stride_h + crop_h, height)
        y1 = max(y2 - crop_h, 0)
        for col in range(cols):
            x2 = min(col * stride_w + crop_w, width)
            x1 = max(x2 - crop_w, 0)
            windows.append((y1, y2, x1, x2))
    return windows


def _resize(logits: Tensor, size: Sequence[int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def whole_logits(model: Model, images: Tensor) -> Tensor:
    """Logits (B, K, h, w) at the size of ``images`` (B, 3, h, w)."""
    return _resize(model(images).float(), images.shape[-2:])


def slide_logits(
    model: Model,
    image: Tensor,
    crop_size: Sequence[int],
    stride: Sequence[int],
    window_batch: int = 1,
    band_elements: int = BAND_ELEMENTS,
) -> Tensor:
    """Logits (1, K, h, w) of one image (1, 3, h, w), averaged over overlapping windows.

    All windows of an image have the same size, so ``window_batch`` of them are stacked into one
    forward pass. Each window's logits are upsampled a band of rows at a time (about
    ``band_elements`` values, `add_upsampled_rows`) straight into the accumulator: no upsampled
    window exists (at 19 classes a 1024x1024 window's is 80 MiB, which page-faults afresh each
    time). The accumulator and the count map are the only full-size tensors. An image that one
    window covers is whole inference.
    """
    height, width = image.shape[-2:]
    windows = slide_windows(height, width, crop_size, stride)
    if len(windows) == 1:
        return whole_logits(model, image)
    count = torch.zeros((1, 1, height, width), dtype=torch.float32, device=image.device)
    total: Tensor | None = None
    for start in range(0, len(windows), window_batch):
        group = windows[start : start + window_batch]
        crops = torch.cat([image[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group])
        logits = model(crops).float().contiguous()  # add_upsampled_rows: the accumulator's layout
        if total is None:
            total = torch.zeros((1, logits.shape[1], height, width), dtype=torch.float32, device=image.device)
            crop_h, crop_w = crops.shape[-2:]
            matrix = interpolation_matrix(logits.shape[2], crop_h, torch.float32, image.device)
            rows = max(1, band_elements // (logits.shape[1] * crop_w))
        for (y1, y2, x1, x2), window_logits in zip(group, logits):
            region = total[:, :, y1:y2, x1:x2]
            if window_logits.shape[-2:] == region.shape[-2:]:
                region += window_logits
            else:
                for band in range(0, crop_h, rows):
                    add_upsampled_rows(region[:, :, band : band + rows], window_logits[None], matrix, band)
            count[:, :, y1:y2, x1:x2] += 1
    assert total is not None  # slide_windows always yields at least one window
    return total.div_(count)


def forward_logits(model: Model, image: Tensor, config: InferenceConfig) -> Tensor:
    """Logits (1, K, h, w) of one image at its own size, by the configured mode."""
    return _resize(_pass_logits(model, image, config, flip=False), image.shape[-2:])


def _pass_logits(model: Model, view: Tensor, config: InferenceConfig, flip: bool) -> Tensor:
    """One (view, flip) pass's logits (1, K, h, w) before their resize to the view's size: whole
    mode (and a slide whose one window is the image) keeps the model's 1/4-resolution logits, so
    the two resizes, to the view and on to the output size, run together band by band."""
    image = view.flip(-1) if flip else view
    windows = slide_windows(*image.shape[-2:], config.crop_size, config.stride) if config.mode == "slide" else []
    if len(windows) > 1:
        assert config.crop_size is not None and config.stride is not None  # checked by the config
        logits = slide_logits(model, image, config.crop_size, config.stride, config.window_batch)
    else:
        logits = model(image).float()
    # Resizing commutes with a horizontal flip, so the low-resolution logits flip back.
    return logits.flip(-1) if flip else logits


def _resize_plan(logits: Tensor, view_size: Sequence[int], out_size: Sequence[int]) -> tuple[Tensor | None, list[int]]:
    """The height matrix and widths of `resized_rows` that take ``logits`` to the view's size and
    then to ``out_size`` (each step skipped where the size already matches)."""
    heights = [logits.shape[-2], view_size[0], out_size[0]]
    matrix = None
    for size_in, size_out in zip(heights, heights[1:]):
        if size_in != size_out:
            step = interpolation_matrix(size_in, size_out, torch.float32, logits.device)
            matrix = step if matrix is None else step @ matrix
    widths = [logits.shape[-1], view_size[1], out_size[1]]
    return matrix, [w for w_in, w in zip(widths, widths[1:]) if w != w_in]


def _scores(
    model: Model, views: Tensor | Sequence[Tensor], out_size: Sequence[int], config: InferenceConfig, softmax: bool
) -> Iterator[tuple[int, int, Tensor]]:
    """Bands (start, stop, scores (K, rows, W)) of the averaged softmax over every (view, flip)
    pass at ``out_size``, or of the logits themselves for one pass without ``softmax``.

    Each pass's logits are resized a band of output rows (about ``BAND_ELEMENTS`` values) at a
    time, so no resized (K, H, W) tensor is made: for ADE20K-sized images at 150 classes one was
    200 MiB per pass, resized, soft-maxed and reduced in passes over memory. Whole-image passes
    keep only their 1/4-resolution logits, so all of them are resized band by band together;
    several sliding-window passes (full-resolution logits each) go one at a time into one
    accumulator instead of being held together.
    """
    views = [views] if isinstance(views, Tensor) else list(views)
    if len(views) != len(config.scales):
        raise ConfigError(
            f"inference.scales lists {len(config.scales)} test scale(s) {list(config.scales)} but the "
            f"image comes in {len(views)}: build the evaluation samples with the same scales "
            "(SegDataModule and the predictor do so from their inference settings)."
        )
    flips = (False, True) if config.flip else (False,)
    count = len(views) * len(flips)
    passes = (
        (logits[0], *_resize_plan(logits, view.shape[-2:], out_size))
        for view in views
        for logits in (_pass_logits(model, view, config, flip) for flip in flips)
    )
    softmax = softmax or count > 1
    height, width = out_size

    def bands(classes: int) -> Iterator[tuple[int, int]]:
        rows = max(1, BAND_ELEMENTS // (classes * width))
        return ((start, min(start + rows, height)) for start in range(0, height, rows))

    def band_scores(plan: tuple[Tensor, Tensor | None, list[int]], start: int, stop: int) -> Tensor:
        band = resized_rows(plan[0], plan[1], start, stop, plan[2])
        return band.softmax(dim=0) if softmax else band

    if config.mode == "slide" and count > 1:
        total = None
        for plan in passes:
            total = plan[0].new_zeros(plan[0].shape[0], height, width) if total is None else total
            for start, stop in bands(total.shape[0]):
                total[:, start:stop] += band_scores(plan, start, stop)
        assert total is not None  # there is at least one pass
        total.div_(count)
        yield from ((start, stop, total[:, start:stop]) for start, stop in bands(total.shape[0]))
        return
    plans = list(passes)
    for start, stop in bands(plans[0][0].shape[0]):
        scores = [band_scores(plan, start, stop) for plan in plans]
        yield start, stop, torch.stack(scores).mean(dim=0) if count > 1 else scores[0]


@torch.no_grad()
def predict_probs(
    model: Model, views: Tensor | Sequence[Tensor], out_size: Sequence[int], config: InferenceConfig
) -> Tensor:
    """Class probabilities (K, H, W) of one image at ``out_size`` = (H, W), its original size.

    ``views`` holds the image (1, 3, h_s, w_s) resized from the original once per test scale of
    ``config.scales`` (one tensor for a single scale). The softmax of each (view, flip) pass is
    taken after resizing its logits to the view's size and on to the output size, and the passes
    are averaged (MMSeg's aug_test); with one view and no flip this is the softmax of the resized
    logits, so its argmax is the plain prediction.
    """
    probs = None
    for start, stop, scores in _scores(model, views, out_size, config, softmax=True):
        probs = scores.new_empty(scores.shape[0], *out_size) if probs is None else probs
        probs[:, start:stop] = scores
    assert probs is not None  # an image has at least one row
    return probs


@torch.no_grad()
def predict_labels(
    model: Model, views: Tensor | Sequence[Tensor], out_size: Sequence[int], config: InferenceConfig
) -> Tensor:
    """The label map (H, W), long, of one image: the argmax of ``predict_probs``, band by band.

    One pass (one scale, no flip) takes the argmax of the resized logits themselves: the softmax
    does not change their order. ``max(dim=0)`` finds the first maximum as argmax does, three
    times faster over the class dimension of a (K, H, W) tensor on CPU.
    """
    labels = None
    for start, stop, scores in _scores(model, views, out_size, config, softmax=False):
        labels = torch.empty(tuple(out_size), dtype=torch.long, device=scores.device) if labels is None else labels
        labels[start:stop] = scores.max(dim=0).indices
    assert labels is not None  # an image has at least one row
    return labels


def batch_views(batch: Mapping[str, Any]) -> list[tuple[Tensor, Tensor]]:
    """(pixel_values, image_sizes) of every test scale of a batch, the first scale first."""
    return [(batch["pixel_values"], batch["image_sizes"]), *batch.get("scale_views", ())]


def _images(batch: Mapping[str, Any]) -> Iterator[tuple[list[Tensor], tuple[int, ...]]]:
    """Each image's views (1, 3, h, w), cut out of the zero-padded batch so padding never changes
    a prediction, and its original label size."""
    views = batch_views(batch)
    for i in range(views[0][0].shape[0]):
        crops = []
        for pixel_values, image_sizes in views:
            h, w = (int(v) for v in image_sizes[i])
            crops.append(pixel_values[i : i + 1, :, :h, :w])
        yield crops, tuple(int(v) for v in batch["label_sizes"][i])


def batch_probs(model: Model, batch: Mapping[str, Any], config: InferenceConfig) -> Iterator[Tensor]:
    """Per-image probabilities (K, H_i, W_i) at each image's original label size, one at a time."""
    for crops, out_size in _images(batch):
        yield predict_probs(model, crops, out_size, config)


def predict_batch(model: Model, batch: Mapping[str, Any], config: InferenceConfig) -> list[Tensor]:
    """Per-image label maps (H_i, W_i), long, at each image's original label size (`predict_labels`)."""
    return [predict_labels(model, crops, out_size, config) for crops, out_size in _images(batch)]
