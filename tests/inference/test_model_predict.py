"""SegFormer.predict: any image input, one or many, maps at the original sizes, and exactly the
evaluation pipeline's predictions (whole, slide, multi-scale + flip from the original image)."""

import numpy as np
import pytest
import torch
from PIL import Image

from segformer import SegFormer
from segformer.data.datamodule import EvalSamples, collate_eval, eval_transforms
from segformer.errors import ConfigError, DataError
from segformer.inference import InferenceConfig, predict_batch

SCALE = (96, 64)


@pytest.fixture(scope="module")
def model() -> SegFormer:
    torch.manual_seed(0)
    model = SegFormer("b0", num_classes=4)
    torch.nn.init.normal_(model.decode_head.classifier.weight, std=0.5)  # several classes per map
    return model.eval()


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def _evaluation(model, images, size_divisor=None, **settings) -> list[torch.Tensor]:
    """What validation / eval.py predict for these images with these settings."""
    config = InferenceConfig(**settings)
    dataset = [
        {"image": img, "mask": np.zeros(img.shape[:2], np.uint8), "name": str(i)} for i, img in enumerate(images)
    ]
    samples = EvalSamples(dataset, eval_transforms(SCALE, config.scales, size_divisor))
    return predict_batch(model, collate_eval([samples[i] for i in range(len(images))]), config)


@pytest.mark.slow
def test_every_kind_of_input_gives_the_evaluation_prediction(model, tmp_path):
    image = _photo(75, 110, 0)
    Image.fromarray(image).save(tmp_path / "photo.png")
    (expected,) = _evaluation(model, [image])
    assert len(expected.unique()) > 1
    inputs = [
        tmp_path / "photo.png",
        str(tmp_path / "photo.png"),
        Image.fromarray(image),
        image,
        torch.from_numpy(image).permute(2, 0, 1),
    ]
    for given in inputs:
        mask = model.predict(given, scale=SCALE)
        assert isinstance(mask, torch.Tensor) and mask.shape == (75, 110) and mask.dtype == torch.long
        assert torch.equal(mask, expected)
    assert [m.shape for m in model.predict(inputs[:2], scale=SCALE)] == [(75, 110)] * 2


@pytest.mark.slow  # about 40 forward passes
@pytest.mark.parametrize(
    "settings",
    [
        {"size_divisor": 32, "scales": [0.75, 1.0, 1.25], "flip": True},
        {"mode": "slide", "crop_size": [48, 48], "stride": [32, 32], "window_batch": 3},
    ],
)
def test_many_images_batched_equal_the_evaluation_pipeline(model, settings):
    images = [_photo(75, 110, 1), _photo(100, 50, 2), _photo(72, 96, 3)]
    expected = _evaluation(model, images, **settings)
    masks = model.predict(images, scale=SCALE, batch_size=2, **settings)
    assert [m.shape for m in masks] == [img.shape[:2] for img in images]
    for mask, want in zip(masks, expected):
        assert torch.equal(mask, want)
    assert model.predict(np.stack([images[0], images[0]]), scale=SCALE, **settings)[1].shape == (75, 110)


def test_predict_runs_in_eval_mode_and_gives_the_mode_back(model):
    model.train()
    try:
        mask = model.predict(_photo(75, 110, 0), scale=SCALE)
        assert model.training
        assert torch.equal(mask, _evaluation(model.eval(), [_photo(75, 110, 0)])[0])
    finally:
        model.eval()


def test_bad_inputs_and_settings_are_clear_errors(model, tmp_path):
    with pytest.raises(DataError, match="below the 29 px SegFormer needs"):
        model.predict(_photo(12, 300, 0), scale=SCALE)
    with pytest.raises(DataError, match="cannot read"):
        (tmp_path / "broken.png").write_bytes(b"not a png")
        model.predict(tmp_path / "broken.png")
    with pytest.raises(ConfigError, match="Unknown inference setting"):
        model.predict(_photo(64, 64, 0), scale=SCALE, scale_factor=2)
