"""SegFormerImageProcessor against transformers' own SegformerImageProcessor on the same inputs:
pixel values, labels in both label modes, post-processed maps, and the config file both ways;
the evaluation-resize option against our test transform."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from segformer import SegFormer, SegFormerImageProcessor
from segformer.data.transforms import eval_transform
from segformer.errors import ConfigError, DataError

transformers = pytest.importorskip("transformers")


def hf_processor(**kwargs):
    with warnings.catch_warnings():  # "requires torchvision ... falling back to the PIL backend"
        warnings.simplefilter("ignore")
        return transformers.SegformerImageProcessor(**kwargs)


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return np.clip(ramp + rng.normal(0, 50, (h, w, 3)), 0, 255).astype(np.uint8)


def _labels(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, (h // 8 + 1, w // 8 + 1)).repeat(8, 0).repeat(8, 1)[:h, :w]
    labels[:3] = 255  # an ignored border
    return labels.astype(np.uint8)


SHAPES = [(61, 90), (120, 75), (33, 33)]


@pytest.mark.parametrize(
    "size", [{"height": 512, "width": 512}, {"height": 64, "width": 96}, {"height": 37, "width": 53}]
)
@pytest.mark.parametrize("reduce_labels", [False, True])
def test_pixel_values_and_labels_equal_transformers(size, reduce_labels):
    images = [_photo(h, w, i) for i, (h, w) in enumerate(SHAPES)]
    maps = [_labels(h, w, i) for i, (h, w) in enumerate(SHAPES)]
    theirs = hf_processor(size=size, do_reduce_labels=reduce_labels)(images, maps, return_tensors="pt")
    ours = SegFormerImageProcessor(size=size, do_reduce_labels=reduce_labels)(images, maps)
    assert ours.pixel_values.shape == theirs["pixel_values"].shape == (3, 3, size["height"], size["width"])
    assert ours.pixel_values.dtype == torch.float32
    torch.testing.assert_close(ours.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-5)
    assert ours.labels.dtype == theirs["labels"].dtype == torch.int64
    assert torch.equal(ours.labels, theirs["labels"])
    values = set(ours.labels.unique().tolist())
    assert values <= ({255, 0, 1, 2, 3, 4} if reduce_labels else {0, 1, 2, 3, 4, 5, 255}) and len(values) > 3


def test_pil_numpy_and_tensor_inputs_one_or_many_give_the_same_values():
    image = _photo(70, 50, 3)
    processor = SegFormerImageProcessor(size={"height": 64, "width": 64})
    theirs = hf_processor(size={"height": 64, "width": 64})(Image.fromarray(image), return_tensors="pt")["pixel_values"]
    for given in (
        Image.fromarray(image),
        image,
        torch.from_numpy(image).permute(2, 0, 1),
        image.astype(np.float32) / 255,
    ):
        torch.testing.assert_close(processor(given).pixel_values, theirs, rtol=0, atol=1e-5)
    batch = processor(np.stack([image, image]))
    assert batch.pixel_values.shape == (2, 3, 64, 64) and "labels" not in batch
    torch.testing.assert_close(batch["pixel_values"][1:], theirs, rtol=0, atol=1e-5)
    grey = processor(image[:, :, 0]).pixel_values
    assert torch.equal(grey, processor(np.repeat(image[:, :, :1], 3, axis=2)).pixel_values)


def test_post_processing_equals_transformers():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 16, 24)
    theirs = hf_processor()
    ours = SegFormerImageProcessor()
    sizes = [(61, 90), (120, 75), (16, 24)]
    for a, b in zip(
        ours.post_process_semantic_segmentation(logits, sizes),
        theirs.post_process_semantic_segmentation(_Outputs(logits), sizes),
    ):
        assert a.shape == b.shape and torch.equal(a, b)
    for a, b in zip(
        ours.post_process_semantic_segmentation(_Outputs(logits)),
        theirs.post_process_semantic_segmentation(_Outputs(logits)),
    ):
        assert a.shape == (16, 24) and torch.equal(a, b)
    with pytest.raises(ValueError, match="2 target sizes for 3 images"):
        ours.post_process_semantic_segmentation(logits, sizes[:2])


class _Outputs:
    def __init__(self, logits):
        self.logits = logits


def test_preprocessor_config_reads_and_writes_transformers_format(tmp_path):
    ours = SegFormerImageProcessor(size={"height": 48, "width": 80}, do_reduce_labels=True, image_mean=[0.5, 0.4, 0.3])
    ours.save_pretrained(tmp_path / "ours")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.AutoImageProcessor.from_pretrained(str(tmp_path / "ours"))
    image, labels = _photo(61, 90, 0), _labels(61, 90, 0)
    theirs = loaded(image, labels, return_tensors="pt")
    mine = ours(image, labels)
    torch.testing.assert_close(mine.pixel_values, theirs["pixel_values"], rtol=0, atol=1e-5)
    assert torch.equal(mine.labels, theirs["labels"])
    hf_processor(size={"height": 40, "width": 40}, do_reduce_labels=True).save_pretrained(str(tmp_path / "theirs"))
    back = SegFormerImageProcessor.from_pretrained(tmp_path / "theirs")
    assert (back.size, back.do_reduce_labels, back.image_mean) == (
        {"height": 40, "width": 40},
        True,
        [0.485, 0.456, 0.406],
    )


def test_evaluation_resize_option_is_our_test_transform():
    image, labels = _photo(150, 90, 1), _labels(150, 90, 1)
    for divisor in (None, 32):
        processor = SegFormerImageProcessor.from_test_settings(
            (128, 96), divisor, (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
        )
        out = processor(image, labels)
        expected = eval_transform((128, 96), divisor)(image=image)["image"]
        torch.testing.assert_close(out.pixel_values[0], expected, rtol=0, atol=1e-5)
        assert out.labels.shape[1:] == expected.shape[1:]
    # Differently sized results are padded, with each one's own size.
    batch = SegFormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})(
        [_photo(150, 90, 0), _photo(50, 100, 1)]
    )
    assert batch.image_sizes.tolist() == [[96, 58], [48, 96]] and batch.pixel_values.shape == (2, 3, 96, 96)
    assert (batch.pixel_values[1, :, 48:] == 0).all()


def test_processor_feeds_the_model_and_maps_come_back_at_the_image_size():
    model = SegFormer("b0", num_classes=4).eval()
    processor = SegFormerImageProcessor(size={"height": 64, "width": 64})
    image = _photo(61, 90, 2)
    with torch.no_grad():
        output = model(processor(image).pixel_values, output_hidden_states=True)
    (mask,) = processor.post_process_semantic_segmentation(output, target_sizes=[image.shape[:2]])
    assert mask.shape == (61, 90) and mask.dtype == torch.int64


def test_bad_settings_and_inputs_are_clear_errors():
    with pytest.raises(ConfigError, match="size must be"):
        SegFormerImageProcessor(size={"height": 64})
    with pytest.raises(DataError, match="shape"):
        SegFormerImageProcessor()(np.zeros((2, 5, 5, 5), np.uint8))  # two 5-channel images
    with pytest.raises(DataError, match="2 image\\(s\\) but 1 segmentation map"):
        SegFormerImageProcessor()([_photo(40, 40, 0), _photo(40, 40, 1)], [_labels(40, 40, 0)])
