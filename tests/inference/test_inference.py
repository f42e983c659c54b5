"""Whole / slide / multi-scale + flip inference and batch handling, on tiny conv models."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from segformer.data.datamodule import EvalSamples, collate_eval, eval_transforms
from segformer.errors import ConfigError
from segformer.inference import inference as inference_module
from segformer.inference import (
    InferenceConfig,
    batch_probs,
    predict_batch,
    predict_labels,
    predict_probs,
    slide_logits,
    slide_windows,
    whole_logits,
)

K = 5


def stride4_model(symmetric: bool = False) -> nn.Module:
    """(B,3,h,w) -> (B,K,ceil(h/4),ceil(w/4)), like SegFormer's output size."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, K, kernel_size=7, stride=4, padding=3)
    if symmetric:  # mirror-symmetric kernels: flip-equivariant when (w - 1) % 4 == 0
        with torch.no_grad():
            conv.weight.copy_((conv.weight + conv.weight.flip(-1)) / 2)
    return conv.eval()


def pointwise_model() -> nn.Module:
    """Every output pixel depends on its input pixel only, so any window grid gives whole's logits."""
    torch.manual_seed(1)
    return nn.Conv2d(3, K, kernel_size=1).eval()


def image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


def upsampled(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    with torch.no_grad():
        return F.interpolate(model(x), size=size, mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- window grid


def test_window_grid_last_window_shifted_back_to_the_border() -> None:
    assert slide_windows(100, 100, (64, 64), (48, 48)) == [
        (0, 64, 0, 64),
        (0, 64, 36, 100),
        (36, 100, 0, 64),
        (36, 100, 36, 100),
    ]
    # Cityscapes: 1024x2048, crop 1024, stride 768 -> one row, three columns.
    assert slide_windows(1024, 2048, (1024, 1024), (768, 768)) == [
        (0, 1024, 0, 1024),
        (0, 1024, 768, 1792),
        (0, 1024, 1024, 2048),
    ]
    # An exact fit needs no shift.
    assert slide_windows(64, 112, (64, 64), (48, 48)) == [(0, 64, 0, 64), (0, 64, 48, 112)]


def test_window_grid_clips_to_an_image_smaller_than_the_crop() -> None:
    assert slide_windows(20, 30, (64, 64), (48, 48)) == [(0, 20, 0, 30)]
    assert slide_windows(20, 100, (64, 64), (48, 48)) == [(0, 20, 0, 64), (0, 20, 36, 100)]


@pytest.mark.parametrize("h,w", [(1, 1), (63, 65), (97, 200), (128, 128)])
def test_window_grid_covers_every_pixel_with_equal_sized_windows(h: int, w: int) -> None:
    windows = slide_windows(h, w, (64, 48), (40, 32))
    covered = torch.zeros(h, w, dtype=torch.bool)
    for y1, y2, x1, x2 in windows:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        covered[y1:y2, x1:x2] = True
    assert covered.all()
    assert len({(y2 - y1, x2 - x1) for y1, y2, x1, x2 in windows}) == 1


# ----------------------------------------------------------------------------- slide


def test_slide_equals_whole_when_one_window_covers_the_image() -> None:
    model, x = stride4_model(), image(30, 37)
    with torch.no_grad():
        whole = whole_logits(model, x)
        assert torch.equal(slide_logits(model, x, (30, 37), (20, 20)), whole)  # crop == image
        assert torch.equal(slide_logits(model, x, (64, 64), (48, 48)), whole)  # crop > image
    assert whole.shape == (1, K, 30, 37)


def test_slide_averages_overlapping_windows_by_hand() -> None:
    model, x = stride4_model(), image(10, 14)
    # crop 8, stride 6: rows (0,8), (2,10); columns (0,8), (6,14)
    total = torch.zeros(1, K, 10, 14)
    count = torch.zeros(1, 1, 10, 14)
    for y1, x1 in [(0, 0), (0, 6), (2, 0), (2, 6)]:
        total[..., y1 : y1 + 8, x1 : x1 + 8] += upsampled(model, x[..., y1 : y1 + 8, x1 : x1 + 8], (8, 8))
        count[..., y1 : y1 + 8, x1 : x1 + 8] += 1
    with torch.no_grad():
        result = slide_logits(model, x, (8, 8), (6, 6))
    torch.testing.assert_close(result, total / count, rtol=0, atol=1e-6)


def test_slide_of_a_pointwise_model_equals_whole() -> None:
    model, x = pointwise_model(), image(41, 57)
    with torch.no_grad():
        torch.testing.assert_close(
            slide_logits(model, x, (16, 24), (10, 7)), whole_logits(model, x), rtol=0, atol=1e-6
        )


def test_batched_windows_equal_one_window_at_a_time() -> None:
    model, x = stride4_model(), image(45, 70)
    with torch.no_grad():
        one = slide_logits(model, x, (24, 24), (16, 16), window_batch=1)
        for window_batch in (3, 100):
            torch.testing.assert_close(
                slide_logits(model, x, (24, 24), (16, 16), window_batch=window_batch), one, rtol=0, atol=1e-6
            )


def _straightforward_slide(model: nn.Module, x: torch.Tensor, crop: tuple[int, int], stride: tuple[int, int]):
    """mmseg's slide_inference written out: each window's logits upsampled whole, summed, divided."""
    total = torch.zeros(1, K, *x.shape[-2:])
    count = torch.zeros(1, 1, *x.shape[-2:])
    for y1, y2, x1, x2 in slide_windows(x.shape[-2], x.shape[-1], crop, stride):
        total[..., y1:y2, x1:x2] += upsampled(model, x[..., y1:y2, x1:x2], (y2 - y1, x2 - x1))
        count[..., y1:y2, x1:x2] += 1
    return total / count


@pytest.mark.parametrize("band_elements", [1, 5 * 7 * 29, 1 << 18])
def test_banded_window_upsampling_equals_the_straightforward_slide(band_elements: int) -> None:
    """Windows' logits go into the accumulator a band of rows at a time (1 row, 7 rows, whole)."""
    model, x = stride4_model(), image(53, 71)
    with torch.no_grad():
        for crop, stride, window_batch in (((27, 29), (13, 11), 4), ((32, 40), (24, 16), 1)):
            expected = _straightforward_slide(model, x, crop, stride)
            result = slide_logits(model, x, crop, stride, window_batch=window_batch, band_elements=band_elements)
            torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)


def test_accumulates_in_float32_when_the_model_returns_bfloat16() -> None:
    model, x = stride4_model(), image(20, 20)

    def bf16_model(pixels: torch.Tensor) -> torch.Tensor:
        return model(pixels).to(torch.bfloat16)

    with torch.no_grad():
        assert slide_logits(bf16_model, x, (12, 12), (8, 8)).dtype == torch.float32
    probs = predict_probs(bf16_model, x, (20, 20), InferenceConfig())
    assert probs.dtype == torch.float32


# ----------------------------------------------------------------------------- TTA


def test_one_scale_without_flip_is_the_softmax_of_whole() -> None:
    model, x = stride4_model(), image(22, 31)
    probs = predict_probs(model, x, (44, 62), InferenceConfig(scales=[1.0], flip=False))
    expected = F.interpolate(
        upsampled(model, x, (22, 31)), size=(44, 62), mode="bilinear", align_corners=False
    )
    torch.testing.assert_close(probs, expected.softmax(dim=1)[0], rtol=0, atol=1e-6)
    assert probs.shape == (K, 44, 62)


def test_flip_on_a_flip_equivariant_model_changes_nothing() -> None:
    model, x = stride4_model(symmetric=True), image(18, 33)  # (33 - 1) % 4 == 0
    plain = predict_probs(model, x, (18, 33), InferenceConfig(flip=False))
    flipped = predict_probs(model, x, (18, 33), InferenceConfig(flip=True))
    torch.testing.assert_close(flipped, plain, rtol=0, atol=1e-6)


def test_multi_scale_flip_averages_softmax_of_every_view_at_the_output_size() -> None:
    model = stride4_model()
    out = (20, 30)
    views = [image(10, 15, seed=1), image(20, 30, seed=2), image(30, 45, seed=3)]
    expected = torch.zeros(1, K, *out)
    for view in views:
        for flip in (False, True):
            inp = view.flip(-1) if flip else view
            logits = upsampled(model, inp, inp.shape[-2:])
            logits = logits.flip(-1) if flip else logits
            expected += F.interpolate(logits, size=out, mode="bilinear", align_corners=False).softmax(dim=1)
    expected /= 6
    probs = predict_probs(model, views, out, InferenceConfig(scales=[0.5, 1.0, 1.5], flip=True))
    torch.testing.assert_close(probs, expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(dim=0), torch.ones(out), rtol=0, atol=1e-5)


def test_views_must_match_the_configured_scales() -> None:
    message = r"inference.scales lists 2 test scale\(s\) \[0.5, 1.0\] but the image comes in 1"
    with pytest.raises(ConfigError, match=message):
        predict_probs(stride4_model(), image(32, 32), (32, 32), InferenceConfig(scales=[0.5, 1.0]))


def test_multi_scale_runs_slide_at_every_scale() -> None:
    model, x = stride4_model(), image(40, 40)
    half = image(20, 20, seed=5)
    config = InferenceConfig(mode="slide", crop_size=[16, 16], stride=[12, 12], scales=[0.5, 1.0])
    with torch.no_grad():
        expected = sum(
            upsampled(lambda t: slide_logits(model, t, (16, 16), (12, 12)), inp, (40, 40)).softmax(dim=1)
            for inp in (half, x)
        ) / 2
    torch.testing.assert_close(predict_probs(model, [half, x], (40, 40), config), expected[0], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- batches


def _padded(images: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images padded with a non-zero value (it must never be seen) and their sizes."""
    height, width = max(img.shape[2] for img in images), max(img.shape[3] for img in images)
    pixel_values = torch.full((len(images), 3, height, width), 7.0)
    for i, img in enumerate(images):
        pixel_values[i, :, : img.shape[2], : img.shape[3]] = img[0]
    return pixel_values, torch.tensor([img.shape[2:] for img in images])


@pytest.mark.parametrize(
    "config",
    [
        InferenceConfig(),
        InferenceConfig(mode="slide", crop_size=16, stride=12, window_batch=2, flip=True),
        InferenceConfig(scales=[1.0, 0.75], flip=True),
    ],
)
def test_padded_batch_gives_the_predictions_of_single_images(config: InferenceConfig) -> None:
    model = stride4_model()
    images = [image(20, 28, seed=1), image(32, 24, seed=2), image(17, 33, seed=3)]
    smaller = [image(15, 21, seed=4), image(24, 18, seed=5), image(13, 25, seed=6)]
    label_sizes = [(40, 56), (32, 24), (34, 66)]
    pixel_values, image_sizes = _padded(images)
    batch = {
        "pixel_values": pixel_values,
        "labels": torch.full((3, 40, 66), 255),
        "image_sizes": image_sizes,
        "label_sizes": torch.tensor(label_sizes),
        "names": ["a", "b", "c"],
    }
    if len(config.scales) > 1:
        batch["scale_views"] = [_padded(smaller)]

    preds = predict_batch(model, batch, config)
    probs = list(batch_probs(model, batch, config))
    for i, (size, pred, prob) in enumerate(zip(label_sizes, preds, probs)):
        views = [images[i], smaller[i]][: len(config.scales)]
        single = predict_probs(model, views, size, config)
        assert pred.shape == size and pred.dtype == torch.long
        assert prob.shape == (K, *size)
        torch.testing.assert_close(prob, single, rtol=0, atol=1e-6)
        assert torch.equal(pred, single.argmax(dim=0))


# ----------------------------------------------------------------------------- labels


def _straightforward_probs(model, views: list[torch.Tensor], out: tuple[int, int], config: InferenceConfig) -> torch.Tensor:
    """Each pass as MMSeg writes it: logits at the view's size (upsampled, or slid), flipped back,
    resized to the output size, soft-maxed; the passes averaged."""
    total, passes = 0, 0
    for view in views:
        for flip in (False, True) if config.flip else (False,):
            inp = view.flip(-1) if flip else view
            with torch.no_grad():
                if config.mode == "slide":
                    logits = _straightforward_slide(model, inp, config.crop_size, config.stride)
                else:
                    logits = upsampled(model, inp, inp.shape[-2:])
            logits = logits.flip(-1) if flip else logits
            total = total + F.interpolate(logits, size=out, mode="bilinear", align_corners=False).softmax(dim=1)
            passes += 1
    return (total / passes)[0]


def _channels_last(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda pixels: model(pixels).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("band_elements", [1, 5 * 3 * 59, 1 << 18])  # a row, three rows, the image
@pytest.mark.parametrize(
    "config, channels_last",
    [
        (InferenceConfig(), False),
        (InferenceConfig(), True),
        (InferenceConfig(mode="slide", crop_size=[16, 20], stride=[10, 12], window_batch=3), False),
        (InferenceConfig(mode="slide", crop_size=[16, 20], stride=[10, 12], scales=[1.0, 1.5], flip=True), False),
        (InferenceConfig(flip=True), False),
        (InferenceConfig(scales=[1.0, 1.5], flip=True), False),
    ],
)
def test_labels_and_probabilities_match_the_straightforward_computation(
    config: InferenceConfig, channels_last: bool, band_elements: int, monkeypatch
) -> None:
    """Resized a band of output rows at a time, both resizes (to the view, on to the output size)
    together: the same probabilities, and labels that are their argmax wherever the top two
    classes are apart by more than rounding."""
    monkeypatch.setattr(inference_module, "BAND_ELEMENTS", band_elements)
    model = stride4_model()
    views = [image(22, 31, seed=1), image(33, 46, seed=2)][: len(config.scales)]
    out = (41, 59)  # neither view's size
    expected = _straightforward_probs(model, views, out, config)
    run = _channels_last(model) if channels_last else model
    probs = predict_probs(run, views, out, config)
    labels = predict_labels(run, views, out, config)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    assert labels.shape == out and labels.dtype == torch.long
    top2 = expected.topk(2, dim=0).values
    clear = top2[0] - top2[1] > 1e-5
    assert clear.float().mean() > 0.99
    assert torch.equal(labels[clear], expected.argmax(dim=0)[clear])


# ----------------------------------------------------------------------------- config


def test_config_normalises_sizes_and_reads_a_mapping() -> None:
    config = InferenceConfig.from_mapping(
        {"mode": "slide", "crop_size": [1024, 1024], "stride": 768, "scales": [0.5, 1], "flip": True},
        window_batch=4,
    )
    assert config == InferenceConfig("slide", (1024, 1024), (768, 768), (0.5, 1.0), True, 4)
    assert InferenceConfig.from_mapping(None) == InferenceConfig()
    from_yaml = OmegaConf.create({"mode": "slide", "crop_size": [32, 48], "stride": [16, 24], "scales": [1.0]})
    assert InferenceConfig.from_mapping(from_yaml) == InferenceConfig("slide", (32, 48), (16, 24))


@pytest.mark.parametrize(
    "settings,key",
    [
        ({"mode": "sliding"}, "inference.mode"),
        ({"mode": "slide", "crop_size": 512}, "inference.mode 'slide' needs"),
        ({"mode": "slide", "crop_size": [512, 512], "stride": [600, 300]}, "inference.stride"),
        ({"crop_size": [512]}, "inference.crop_size"),
        ({"crop_size": [512, 0]}, "inference.crop_size"),
        ({"stride": [1.5, 2]}, "inference.stride"),
        ({"scales": []}, "inference.scales"),
        ({"scales": [1.0, -0.5]}, "inference.scales"),
        ({"flip": "yes"}, "inference.flip"),
        ({"window_batch": 0}, "inference.window_batch"),
        ({"batch": 2}, "Unknown inference setting"),
    ],
)
def test_bad_config_names_the_key(settings: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        InferenceConfig.from_mapping(settings)


def test_real_segformer_b0_through_slide_and_whole() -> None:
    from segformer import SegFormer

    torch.manual_seed(0)
    model = SegFormer(variant="b0", num_classes=3).eval()
    x = image(45, 70)  # not multiples of 4: logits are 12x18
    with torch.no_grad():
        whole = whole_logits(model, x)
        assert whole.shape == (1, 3, 45, 70)
        assert torch.equal(slide_logits(model, x, (48, 72), (32, 32)), whole)
    config = InferenceConfig(mode="slide", crop_size=[45, 40], stride=[30, 30])
    probs = predict_probs(model, x, (90, 140), config)
    assert probs.shape == (3, 90, 140)
    torch.testing.assert_close(probs.sum(dim=0), torch.ones(90, 140), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- from the original image


def _mmseg_multi_scale_flip(
    model: nn.Module, img: np.ndarray, img_scale: tuple[int, int], ratios, flip: bool, size_divisor: int | None = None
):
    """mmseg 0.13 MultiScaleFlipAug + (NVlabs Aligned)Resize(keep_ratio) + Normalize + whole
    inference + aug_test, written out: each ratio rescales the ORIGINAL image (mmcv.imrescale, +0.5
    rounding, cv2 bilinear), then with a divisor resizes again to the sides rounded up to it."""
    mean, std = np.array([123.675, 116.28, 103.53]), np.array([58.395, 57.12, 57.375])
    h, w = img.shape[:2]
    total = 0
    passes = 0
    for ratio in ratios:
        scale = (int(img_scale[0] * ratio), int(img_scale[1] * ratio))
        factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
        resized = cv2.resize(img, (int(w * factor + 0.5), int(h * factor + 0.5)), interpolation=cv2.INTER_LINEAR)
        if size_divisor:
            aligned = [-(-side // size_divisor) * size_divisor for side in resized.shape[1::-1]]
            resized = cv2.resize(resized, tuple(aligned), interpolation=cv2.INTER_LINEAR)
        normalised = ((resized.astype(np.float32) - mean) / std).astype(np.float32)
        tensor = torch.from_numpy(normalised.transpose(2, 0, 1).copy())[None]
        for flipped in (False, True) if flip else (False,):
            inp = tensor.flip(-1) if flipped else tensor
            with torch.no_grad():
                logits = F.interpolate(model(inp), size=inp.shape[-2:], mode="bilinear", align_corners=False)
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            probs = logits.softmax(dim=1)
            total = total + (probs.flip(-1) if flipped else probs)
            passes += 1
    return (total / passes)[0]


@pytest.mark.parametrize("size_divisor", [None, 32])
def test_multi_scale_flip_resizes_the_original_image_as_mmseg(size_divisor) -> None:
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 90)[None, :, None]
    images = [np.clip(ramp + rng.normal(0, 60, (h, 90, 3)), 0, 255).astype(np.uint8) for h in (61, 47)]
    dataset = [{"image": im, "mask": np.zeros(im.shape[:2], np.uint8), "name": str(i)} for i, im in enumerate(images)]
    ratios, scale = [0.5, 0.75, 1.25], (128, 96)
    config = InferenceConfig(scales=ratios, flip=True)
    samples = EvalSamples(dataset, eval_transforms(scale, ratios, size_divisor))
    batch = collate_eval([samples[0], samples[1]])
    assert len(batch["scale_views"]) == 2
    model = stride4_model()
    for img, probs in zip(images, batch_probs(model, batch, config)):
        expected = _mmseg_multi_scale_flip(model, img, scale, ratios, flip=True, size_divisor=size_divisor)
        torch.testing.assert_close(probs, expected, rtol=0, atol=1e-5)
    # Rescaling the ratio-1 tensor instead (the old way) is measurably different.
    ones = EvalSamples(dataset, eval_transforms(scale, [1.0], size_divisor))[0]["pixel_values"][None]
    rescaled = [F.interpolate(ones, scale_factor=r, mode="bilinear", align_corners=False) for r in ratios]
    old = predict_probs(model, rescaled, images[0].shape[:2], config)
    reference = _mmseg_multi_scale_flip(model, images[0], scale, ratios, flip=True, size_divisor=size_divisor)
    assert (old - reference).abs().max() > 1e-3


def test_data_module_builds_one_view_per_test_scale(tmp_path) -> None:
    from segformer.data import SampleScenes, SegDataModule

    module = SegDataModule(
        dataset=lambda root, split: SampleScenes(root, split, num_train=2, num_val=2),
        root=str(tmp_path), num_classes=7, num_workers=0, scale=[96, 80],
        inference={"scales": [0.5, 1.0, 1.5], "flip": True},
    )
    batch = next(iter(module.val_dataloader()))
    sizes = [batch["image_sizes"][0].tolist()] + [s[0].tolist() for _, s in batch["scale_views"]]
    h, w = batch["label_sizes"][0].tolist()
    for (long_side, short_side), (vh, vw) in zip([(48, 40), (96, 80), (144, 120)], sizes):
        factor = min(long_side / max(h, w), short_side / min(h, w))
        assert (vh, vw) == (int(h * factor + 0.5), int(w * factor + 0.5))
    with pytest.raises(ConfigError, match="data.inference.scales"):
        SegDataModule(dataset=SampleScenes, root=str(tmp_path), num_classes=7, inference={"scales": [0.5, -1]})


def test_slide_takes_channels_last_logits() -> None:
    model, x = stride4_model(), image(40, 50)

    def channels_last_model(pixels: torch.Tensor) -> torch.Tensor:
        return model(pixels).contiguous(memory_format=torch.channels_last)

    with torch.no_grad():
        torch.testing.assert_close(
            slide_logits(channels_last_model, x, (24, 24), (16, 16)), _straightforward_slide(model, x, (24, 24), (16, 16)),
            rtol=0, atol=1e-6,
        )


def test_labels_never_hold_the_full_resolution_scores() -> None:
    """150 classes at 200x300 are 36 MB of float32 scores; predicting labels allocates no tensor
    of a tenth of that (the bands are ~1 MiB), while the probabilities are that tensor."""
    torch.manual_seed(0)
    model = nn.Conv2d(3, 150, kernel_size=4, stride=4).eval()
    x, out = image(100, 150), (200, 300)
    full = 150 * 200 * 300 * 4

    def largest_allocation(fn) -> int:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        return max(event.cpu_memory_usage for event in prof.events())

    assert largest_allocation(lambda: predict_labels(model, x, out, InferenceConfig())) < full / 10
    assert largest_allocation(lambda: predict_probs(model, x, out, InferenceConfig())) >= full
