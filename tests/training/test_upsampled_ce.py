"""The fused cross-entropy of upsampled logits against the straightforward computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from segformer.model.resize import interpolation_matrix
from segformer.training.losses import CrossEntropyLoss
from segformer.training.upsampled_ce import upsampled_cross_entropy_sum

CLASSES = 5


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: a second thread only adds wake-up latency (seconds on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(logits, labels, weight=None, label_smoothing=0.0):
    """F.interpolate, then F.cross_entropy: what the fused loss must equal."""
    scores = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(
        scores, labels, weight=weight, ignore_index=255, reduction="sum", label_smoothing=label_smoothing
    )


def make(batch, size, label_size, dtype=torch.float32, seed=0, ignored=0.2):
    generator = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(batch, CLASSES, *size, generator=generator)).to(dtype).requires_grad_()
    labels = torch.randint(0, CLASSES, (batch, *label_size), generator=generator)
    labels[torch.rand(labels.shape, generator=generator) < ignored] = 255
    return logits, labels


# (logits size, label size, band elements): odd ratios (the small-matrix path), whole ratios
# (F.interpolate on bands with halo rows; small bands force many of them), downsampling.
SIZES = [
    ((7, 9), (27, 35), 1 << 22),
    ((7, 9), (27, 35), 50),
    ((8, 8), (32, 32), 1 << 22),
    ((8, 8), (32, 32), 50),
    ((8, 6), (32, 24), 700),
    ((6, 5), (18, 15), 200),
    ((5, 7), (5, 7), 60),
    ((9, 11), (4, 5), 40),
]


@pytest.mark.parametrize("size,label_size,band", SIZES)
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.0), (True, 0.1)])
def test_loss_and_gradient_equal_interpolate_then_cross_entropy(size, label_size, band, weighted, smoothing):
    logits, labels = make(2, size, label_size)
    weight = torch.tensor([0.5, 2.0, 1.0, 0.0, 3.0]) if weighted else None
    expected = reference(logits, labels, weight, smoothing)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    loss = upsampled_cross_entropy_sum(logits, labels, weight=weight, label_smoothing=smoothing, band_elements=band)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size,label_size,band", [((3, 4), (7, 9), 1 << 22), ((3, 3), (12, 12), 30), ((4, 3), (4, 3), 20)])
def test_gradcheck_float64(size, label_size, band):
    logits, labels = make(1, size, label_size, dtype=torch.float64)
    weight = torch.tensor([0.5, 2.0, 1.0, 1.5, 3.0], dtype=torch.float64)

    def loss(x):
        return upsampled_cross_entropy_sum(x, labels, weight=weight, label_smoothing=0.1, band_elements=band)

    assert torch.autograd.gradcheck(loss, (logits.detach().requires_grad_(),))
    torch.testing.assert_close(loss(logits), reference(logits, labels, weight, 0.1), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("average", ["all", "labelled"])
@pytest.mark.parametrize("class_weight,smoothing", [(None, 0.0), ([0.5, 2.0, 1.0, 0.0, 3.0], 0.1)])
def test_cross_entropy_loss_config_takes_the_fast_path_with_the_same_values(average, class_weight, smoothing):
    # configs/loss/cross_entropy.yaml (and the cross-entropy term of ce_dice) build this loss.
    logits, labels = make(2, (7, 9), (27, 35))
    loss_fn = CrossEntropyLoss(class_weight=class_weight, label_smoothing=smoothing, average=average)
    weight = None if class_weight is None else torch.tensor(class_weight)
    pixels = labels.numel() if average == "all" else int((labels != 255).sum())
    expected = reference(logits, labels, weight, smoothing) / pixels
    (expected_grad,) = torch.autograd.grad(expected, logits)
    loss = loss_fn(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_far_apart_logits_do_not_underflow():
    # Neighbouring positions prefer different classes by 400: between them every class's shifted
    # score is about -200 and its exp underflows in float32; the band is redone exactly.
    logits = torch.full((1, 2, 2, 2), -200.0)
    logits[0, 0, :, 0] = 200.0
    logits[0, 1, :, 1] = 200.0
    logits.requires_grad_()
    labels = torch.randint(0, 2, (1, 8, 8), generator=torch.Generator().manual_seed(0))
    expected = reference(logits, labels)
    (expected_grad,) = torch.autograd.grad(expected, logits)
    loss = upsampled_cross_entropy_sum(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_all_ignored_gives_zero_loss_and_gradient():
    logits, labels = make(1, (4, 4), (16, 16), ignored=1.0)
    loss = upsampled_cross_entropy_sum(logits, labels)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_no_grad_and_gradient_scaling():
    logits, labels = make(2, (6, 6), (24, 24))
    with torch.no_grad():
        value = upsampled_cross_entropy_sum(logits, labels)
    torch.testing.assert_close(value, reference(logits, labels).detach())
    (grad,) = torch.autograd.grad(3.0 * upsampled_cross_entropy_sum(logits, labels), logits)
    (expected,) = torch.autograd.grad(3.0 * reference(logits, labels), logits)
    torch.testing.assert_close(grad, expected)


def test_bfloat16_logits_get_a_bfloat16_gradient():
    logits, labels = make(1, (4, 4), (16, 16), dtype=torch.bfloat16)
    loss = upsampled_cross_entropy_sum(logits, labels)
    loss.backward()
    assert loss.dtype == torch.bfloat16 and logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), reference(logits.float(), labels), rtol=2e-2, atol=0.5)


def test_channels_last_logits_are_not_modified():
    logits, labels = make(1, (4, 4), (16, 16))
    logits = logits.detach().contiguous(memory_format=torch.channels_last)
    before = logits.clone()
    upsampled_cross_entropy_sum(logits, labels)
    assert torch.equal(logits, before)


def test_bad_label_and_shapes_raise():
    logits, labels = make(1, (4, 4), (16, 16))
    labels[0, 3, 3] = CLASSES
    with pytest.raises(ValueError, match=f"Label {CLASSES} is neither a class id"):
        upsampled_cross_entropy_sum(logits, labels)
    with pytest.raises(ValueError, match="expects logits"):
        upsampled_cross_entropy_sum(logits[0], labels)


def test_interpolation_matrix_is_f_interpolate():
    x = torch.randn(1, 1, 7, 1, dtype=torch.float64)
    matrix = interpolation_matrix(7, 27, torch.float64, x.device)
    expected = F.interpolate(x, size=(27, 1), mode="bilinear", align_corners=False)[0, 0, :, 0]
    torch.testing.assert_close(matrix @ x[0, 0, :, 0], expected)
    torch.testing.assert_close(matrix.sum(1), torch.ones(27, dtype=torch.float64))
