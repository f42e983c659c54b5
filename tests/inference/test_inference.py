"""Whole / slide / multi-scale + flip inference and batch handling, on tiny conv models."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from segformer.errors import ConfigError
from segformer.inference import (
    InferenceConfig,
    predict_batch,
    predict_batch_probs,
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


def test_multi_scale_flip_averages_softmax_at_the_output_size() -> None:
    model, x = stride4_model(), image(20, 30)
    out = (20, 30)
    expected = torch.zeros(1, K, *out)
    for size in [(10, 15), (20, 30), (30, 45)]:
        scaled = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True):
            inp = scaled.flip(-1) if flip else scaled
            logits = upsampled(model, inp, size)
            logits = logits.flip(-1) if flip else logits
            expected += F.interpolate(logits, size=out, mode="bilinear", align_corners=False).softmax(dim=1)
    expected /= 6
    probs = predict_probs(model, x, out, InferenceConfig(scales=[0.5, 1.0, 1.5], flip=True))
    torch.testing.assert_close(probs, expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(probs.sum(dim=0), torch.ones(out), rtol=0, atol=1e-5)


def test_multi_scale_runs_slide_at_every_scale() -> None:
    model, x = stride4_model(), image(40, 40)
    config = InferenceConfig(mode="slide", crop_size=[16, 16], stride=[12, 12], scales=[0.5, 1.0])
    with torch.no_grad():
        half = F.interpolate(x, size=(20, 20), mode="bilinear", align_corners=False)
        expected = sum(
            upsampled(lambda t: slide_logits(model, t, (16, 16), (12, 12)), inp, (40, 40)).softmax(dim=1)
            for inp in (half, x)
        ) / 2
    torch.testing.assert_close(predict_probs(model, x, (40, 40), config), expected[0], rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------- batches


@pytest.mark.parametrize(
    "config",
    [InferenceConfig(), InferenceConfig(mode="slide", crop_size=16, stride=12, window_batch=2, flip=True)],
)
def test_padded_batch_gives_the_predictions_of_single_images(config: InferenceConfig) -> None:
    model = stride4_model()
    images = [image(20, 28, seed=1), image(32, 24, seed=2), image(17, 33, seed=3)]
    label_sizes = [(40, 56), (32, 24), (34, 66)]
    pixel_values = torch.full((3, 3, 32, 33), 7.0)  # non-zero padding: it must never be seen
    for i, img in enumerate(images):
        pixel_values[i, :, : img.shape[2], : img.shape[3]] = img[0]
    batch = {
        "pixel_values": pixel_values,
        "labels": torch.full((3, 40, 66), 255),
        "image_sizes": torch.tensor([img.shape[2:] for img in images]),
        "label_sizes": torch.tensor(label_sizes),
        "names": ["a", "b", "c"],
    }

    preds = predict_batch(model, batch, config)
    probs = predict_batch_probs(model, batch, config)
    for img, size, pred, prob in zip(images, label_sizes, preds, probs):
        single = predict_probs(model, img, size, config)
        assert pred.shape == size and pred.dtype == torch.long
        assert prob.shape == (K, *size)
        torch.testing.assert_close(prob, single, rtol=0, atol=1e-6)
        assert torch.equal(pred, single.argmax(dim=0))


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
