"""The paper's train/test pipelines: rescale sizes, crop and pad values, cat_max_ratio, photometric;
the aligned resize and the photometric distortion against references written the way mmcv/mmseg
compute them."""

from __future__ import annotations

import random

import cv2
import numpy as np
import pytest
import torch

from segformer.data import (
    CatMaxRatioCrop,
    PhotoMetricDistortion,
    eval_transform,
    train_transform,
)
from segformer.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    RescaleToScale,
    aligned_resize,
    aligned_sizes,
    rescaled_size,
)
from segformer.errors import ConfigError


def seeded(transform, seed: int):
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))
    return transform


def test_rescaled_size_fits_long_and_short_edges_keeping_ratio():
    assert rescaled_size(512, 683, (2048, 512)) == (512, 683)  # typical ADE20K image: unchanged
    assert rescaled_size(683, 512, (2048, 512)) == (683, 512)  # portrait: short side 512 as well
    assert rescaled_size(375, 500, (2048, 512)) == (512, 683)  # upscaled until the short side is 512
    assert rescaled_size(512, 683, (2048, 512), ratio=0.5) == (256, 342)
    assert rescaled_size(512, 683, (2048, 512), ratio=2.0) == (1024, 1366)
    assert rescaled_size(300, 3000, (2048, 512)) == (205, 2048)  # panorama: long side limits
    assert rescaled_size(1024, 2048, (2048, 1024)) == (1024, 2048)  # Cityscapes: unchanged
    assert rescaled_size(375, 500, (2048, 512), size_divisor=32) == (512, 704)
    assert rescaled_size(144, 192, (192, 160)) == (144, 192)  # small custom images stay small


def test_train_pipeline_pads_bottom_right_with_zero_and_ignore():
    image = np.full((40, 50, 3), 100, np.uint8)
    mask = np.zeros((40, 50), np.uint8)
    mask[:, 25:] = 1
    transform = train_transform((64, 96), (50, 40), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=None)
    out = seeded(transform, 0)(image=image, mask=mask)
    pixels, labels = out["image"], out["mask"]
    assert pixels.shape == (3, 64, 96) and pixels.dtype == torch.float32
    assert labels.shape == (64, 96)
    expected = (100 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(pixels[:, :40, :50], expected[:, None, None].expand(3, 40, 50))
    assert (pixels[:, 40:, :] == 0).all() and (pixels[:, :, 50:] == 0).all()
    np.testing.assert_array_equal(labels[:40, :50].numpy(), mask)
    assert (labels[40:, :] == 255).all() and (labels[:, 50:] == 255).all()


def test_train_pipeline_crops_to_crop_size_and_keeps_mask_aligned():
    height, width = 300, 400
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = np.arange(width) % 256  # image column index encodes x, mask encodes y
    mask = (np.arange(height)[:, None] // 30 * np.ones((1, width))).astype(np.uint8)
    transform = train_transform((128, 160), (400, 300), ratio_range=(1.0, 1.0), photometric=None,
                                mean=(0, 0, 0), std=(1, 1, 1))
    flips = 0
    for seed in range(20):
        out = seeded(transform, seed)(image=image, mask=mask)
        pixels, labels = out["image"], out["mask"].numpy()
        assert pixels.shape == (3, 128, 160) and labels.shape == (128, 160)
        assert (labels != 255).all()  # image larger than the crop: nothing padded
        rows = labels[:, 0]
        assert (labels == rows[:, None]).all() and (np.diff(rows.astype(int)) >= 0).all()
        step = np.diff(pixels[0, 0].numpy())
        flips += bool((step[step > -200] < 0).all())
    assert 5 <= flips <= 15  # horizontal flip with p = 0.5


def test_train_rescale_ratio_stays_in_range():
    image = np.zeros((100, 200, 3), np.uint8)
    mask = np.zeros((100, 200), np.uint8)
    transform = train_transform((200, 400), (200, 100), photometric=None)
    heights = []
    for seed in range(200):
        labels = seeded(transform, seed)(image=image, mask=mask)["mask"]
        heights.append(int((labels[:, 0] != 255).sum()))  # crop larger than the image: whole image
    assert min(heights) >= 50 and max(heights) <= 200
    assert min(heights) < 60 and max(heights) > 190


def crop_ratio(mask: np.ndarray, crop: CatMaxRatioCrop, seed: int) -> float:
    out = seeded(crop, seed)(image=np.zeros((*mask.shape, 3), np.uint8), mask=mask)["mask"]
    labelled = out[out != 255]
    counts = np.bincount(labelled.ravel())
    return counts.max() / counts.sum()


def test_cat_max_ratio_redraws_crops_dominated_by_one_class():
    # Class 1 is a band at x in [200, 250); a 100-wide crop keeps class 0 below 75 % only when it
    # starts at x in [126, 224]: 99 of the 301 positions, a third of the crops.
    mask = np.zeros((100, 400), np.uint8)
    mask[:, 200:250] = 1
    with_rule = [crop_ratio(mask, CatMaxRatioCrop(100, 100, 0.75), s) for s in range(200)]
    without_rule = [crop_ratio(mask, CatMaxRatioCrop(100, 100, 1.0), s) for s in range(200)]
    assert np.mean(np.array(without_rule) < 0.75) < 0.45
    assert np.mean(np.array(with_rule) < 0.75) > 0.95  # 1 - (2/3)^11 of the crops pass


def test_cat_max_ratio_ignores_255_and_gives_up_after_max_tries():
    mask = np.full((100, 100), 255, np.uint8)
    mask[:, :20] = 0
    mask[:, 20:40] = 1  # 60 % ignore: classes 0 and 1 share the labelled pixels 50/50
    assert crop_ratio(mask, CatMaxRatioCrop(100, 100, 0.75), 0) == 0.5
    single = np.zeros((100, 300), np.uint8)  # no crop can ever pass: still a crop of the right size
    crop = seeded(CatMaxRatioCrop(50, 60, 0.75, max_tries=10), 0)
    out = crop(image=np.zeros((100, 300, 3), np.uint8), mask=single)
    assert out["image"].shape == (50, 60, 3) and out["mask"].shape == (50, 60)


def test_cat_max_ratio_draws_at_most_max_tries_plus_one_crops():
    draws = []

    class Counting(CatMaxRatioCrop):
        def _draw(self, height, width):
            coords = super()._draw(height, width)
            draws.append(coords)
            return coords

    mask = np.zeros((100, 300), np.uint8)
    seeded(Counting(50, 60, 0.75, max_tries=10), 0)(image=np.zeros((100, 300, 3), np.uint8), mask=mask)
    assert len(draws) == 11
    draws.clear()
    seeded(Counting(50, 60, 1.0, max_tries=10), 0)(image=np.zeros((100, 300, 3), np.uint8), mask=mask)
    assert len(draws) == 1


def distort(image: np.ndarray, **params) -> np.ndarray:
    defaults = {"brightness": None, "contrast": None, "contrast_first": True, "saturation": None, "hue": None}
    return PhotoMetricDistortion().apply(image, **{**defaults, **params})


def test_photometric_steps_follow_mmsegmentation_arithmetic():
    image = np.array([[[10, 100, 250]]], np.uint8)
    # brightness: add, clip to 0..255, truncate to uint8
    np.testing.assert_array_equal(distort(image, brightness=10.7), [[[20, 110, 255]]])
    np.testing.assert_array_equal(distort(image, brightness=-32.0), [[[0, 68, 218]]])
    np.testing.assert_array_equal(distort(image, contrast=1.5), [[[15, 150, 255]]])
    # hue: OpenCV's 0-180 scale, wrapping; saturation: scales HSV S
    red = np.array([[[255, 0, 0]]], np.uint8)
    shifted = distort(red, hue=-18)
    hsv = cv2.cvtColor(red, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (int(hsv[0, 0, 0]) - 18) % 180
    np.testing.assert_array_equal(shifted, cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB))
    assert shifted[0, 0, 2] > 0 and shifted[0, 0, 1] == 0  # red turned towards magenta
    grey_ish = np.array([[[200, 100, 100]]], np.uint8)
    desaturated = distort(grey_ish, saturation=0.5)
    assert desaturated[0, 0, 0] == 200 and 140 <= desaturated[0, 0, 1] <= 152
    # contrast before or after the colour steps gives different results
    assert not np.array_equal(
        distort(grey_ish, contrast=1.5, saturation=1.5, contrast_first=True),
        distort(grey_ish, contrast=1.5, saturation=1.5, contrast_first=False),
    )


def test_photometric_parameters_are_drawn_in_the_paper_ranges():
    distortion = seeded(PhotoMetricDistortion(), 0)
    draws = [distortion.get_params() for _ in range(4000)]
    for key, low, high in (("brightness", -32, 32), ("contrast", 0.5, 1.5), ("saturation", 0.5, 1.5)):
        values = [d[key] for d in draws if d[key] is not None]
        assert 0.45 < len(values) / len(draws) < 0.55  # each step with p = 0.5
        assert low <= min(values) < low + 0.1 * (high - low) and high - 0.1 * (high - low) < max(values) <= high
    # Hue: numpy randint(-18, 18), i.e. -18..17.
    hues = [d["hue"] for d in draws if d["hue"] is not None]
    assert all(isinstance(h, int) for h in hues) and set(hues) == set(range(-18, 18))
    assert 0.45 < np.mean([d["contrast_first"] for d in draws]) < 0.55


def test_train_pipeline_is_deterministic_given_its_random_state():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (120, 160, 3), dtype=np.uint8)
    mask = rng.integers(0, 4, (120, 160), dtype=np.uint8)
    transform = train_transform((64, 64), (160, 120), photometric={})
    first = seeded(transform, 5)(image=image, mask=mask)
    again = seeded(transform, 5)(image=image, mask=mask)
    other = seeded(transform, 6)(image=image, mask=mask)
    torch.testing.assert_close(first["image"], again["image"])
    assert torch.equal(first["mask"], again["mask"])
    assert not torch.equal(first["image"], other["image"])


def test_eval_pipeline_resizes_image_to_test_scale():
    image = np.zeros((375, 500, 3), np.uint8)
    assert eval_transform((2048, 512))(image=image)["image"].shape == (3, 512, 683)
    assert eval_transform((2048, 512), size_divisor=32)(image=image)["image"].shape == (3, 512, 704)


def test_pipeline_options_are_checked():
    with pytest.raises(ConfigError, match="crop_size must be a pair"):
        train_transform((512,), (2048, 512))
    with pytest.raises(ConfigError, match="scale must be positive"):
        eval_transform((2048, 0))
    with pytest.raises(ConfigError, match="photometric distortion option"):
        train_transform((512, 512), (2048, 512), photometric={"brightness": 32})


class _NumpyRandom:
    """``numpy.random``'s legacy calls that mmseg makes, drawn from a Generator."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def randint(self, low, high=None):
        return self.rng.integers(low, high)

    def uniform(self, low, high):
        return self.rng.uniform(low, high)


def _mmseg_photometric(img_bgr: np.ndarray, random, brightness_delta=32, contrast=(0.5, 1.5), saturation=(0.5, 1.5),
                       hue_delta=18) -> np.ndarray:
    """mmseg 0.13 PhotoMetricDistortion.__call__ (mmcv.bgr2hsv / hsv2bgr are cv2.cvtColor)."""

    def convert(img, alpha=1, beta=0):
        img = img.astype(np.float32) * alpha + beta
        img = np.clip(img, 0, 255)
        return img.astype(np.uint8)

    def contrast_step(img):
        if random.randint(2):
            return convert(img, alpha=random.uniform(*contrast))
        return img

    img = img_bgr
    if random.randint(2):
        img = convert(img, beta=random.uniform(-brightness_delta, brightness_delta))
    mode = random.randint(2)
    if mode == 1:
        img = contrast_step(img)
    if random.randint(2):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 1] = convert(img[:, :, 1], alpha=random.uniform(*saturation))
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if random.randint(2):
        img = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        img[:, :, 0] = (img[:, :, 0].astype(int) + random.randint(-hue_delta, hue_delta)) % 180
        img = cv2.cvtColor(img, cv2.COLOR_HSV2BGR)
    if mode == 0:
        img = contrast_step(img)
    return img


def test_photometric_distortion_is_mmsegs_on_a_fixed_rng_sequence():
    image = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    distortion = PhotoMetricDistortion()
    steps = []
    for seed in range(40):
        ours = seeded(distortion, seed)(image=image)["image"]
        theirs = _mmseg_photometric(image[..., ::-1].copy(), _NumpyRandom(seed))[..., ::-1]
        np.testing.assert_array_equal(ours, theirs, err_msg=f"seed {seed}")
        steps.append(seeded(distortion, seed).get_params())
    # The seeds cover every step, both contrast orders, and saturation together with hue (two round trips).
    assert {s["contrast_first"] for s in steps if s["contrast"] is not None} == {True, False}
    assert any(s["saturation"] is not None and s["hue"] is not None for s in steps)
    assert all(any(s[k] is not None for s in steps) for k in ("brightness", "contrast", "saturation", "hue"))


def _mmcv_aligned_resize(img: np.ndarray, scale, size_divisor, interpolation=cv2.INTER_LINEAR) -> np.ndarray:
    """NVlabs AlignedResize._resize_img: mmcv.imrescale (rescale_size, cv2.resize), then _align."""
    h, w = img.shape[:2]
    scale_factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    new_size = int(w * float(scale_factor) + 0.5), int(h * float(scale_factor) + 0.5)
    img = cv2.resize(img, new_size, interpolation=interpolation)
    align_h = int(np.ceil(img.shape[0] / size_divisor)) * size_divisor
    align_w = int(np.ceil(img.shape[1] / size_divisor)) * size_divisor
    return cv2.resize(img, (align_w, align_h), interpolation=interpolation)


@pytest.mark.parametrize("shape", [(375, 500), (512, 683), (300, 1000), (97, 61)])
def test_aligned_resize_is_nvlabs_two_step_resize(shape):
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    mask = rng.integers(0, 5, shape, dtype=np.uint8)
    expected = _mmcv_aligned_resize(image, (2048, 512), 32)
    np.testing.assert_array_equal(aligned_resize(image, (2048, 512), 32), expected)
    np.testing.assert_array_equal(
        aligned_resize(mask, (2048, 512), 32, interpolation=cv2.INTER_NEAREST),
        _mmcv_aligned_resize(mask, (2048, 512), 32, cv2.INTER_NEAREST),
    )
    rescaled, aligned = aligned_sizes(*shape, (2048, 512), size_divisor=32)
    assert aligned == expected.shape[:2] and all(a % 32 == 0 and 0 <= a - r < 32 for a, r in zip(aligned, rescaled))
    # MultiScaleFlipAug's ratio r resizes the original to (int(2048 r), int(512 r)).
    np.testing.assert_array_equal(
        aligned_resize(image, (2048, 512), 32, ratio=0.75), _mmcv_aligned_resize(image, (1536, 384), 32)
    )
    # The eval pipeline is that resize, then the normalisation.
    out = eval_transform((2048, 512), size_divisor=32)(image=image)["image"]
    normalised = (expected.astype(np.float32) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    torch.testing.assert_close(out, torch.from_numpy(normalised.transpose(2, 0, 1)))
    applied = RescaleToScale((2048, 512), None, 32)(image=image, mask=mask)
    np.testing.assert_array_equal(applied["image"], expected)
    assert applied["mask"].shape == expected.shape[:2]


def test_aligned_resize_differs_from_one_resize_to_the_aligned_size():
    image = np.random.default_rng(2).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    _, (height, width) = aligned_sizes(375, 500, (2048, 512), size_divisor=32)
    assert not np.array_equal(aligned_resize(image, (2048, 512), 32), cv2.resize(image, (width, height)))
