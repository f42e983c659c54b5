"""The eval-only fast paths (fused oneDNN kernels in MiT, the banded decode head) against the
plain computation they replace, at odd sizes where the upsampling ratios are not whole."""

import pytest
import torch
import torch.nn.functional as F

from segformer import SegFormer
from segformer.model import mit
from segformer.model.mit import fused_inference
from segformer.model.resize import add_upsampled_rows, interpolation_matrix


@pytest.fixture(scope="module")
def model() -> SegFormer:
    """Random LayerNorm affines and BatchNorm statistics, so that folding them is exercised."""
    torch.manual_seed(0)
    model = SegFormer("b0", num_classes=7).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
        bn = model.decode_head.bn
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    return model


def test_fused_kernels_only_in_eager_float32_cpu_inference():
    x = torch.zeros(1)
    with torch.no_grad():
        assert fused_inference(x)
        assert not fused_inference(x.to(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not fused_inference(x)
    with torch.inference_mode():
        assert fused_inference(x)
    assert not fused_inference(x)  # autograd needs the plain ops


@pytest.mark.slow  # the inner loop checks the fused path through the transformers parity tests
def test_fused_inference_equals_the_plain_computation(model):
    """Encoder maps and logits: no_grad (fused kernels, banded head) against grad mode (plain ops)."""
    shape = (2, 3, 75, 61)
    x = torch.randn(*shape)
    with torch.no_grad():
        fast_maps = model.encoder(x)
        fast = model(x)
    plain_maps = model.encoder(x)
    plain = model(x)
    for fast_map, plain_map in zip(fast_maps, plain_maps):
        torch.testing.assert_close(fast_map, plain_map.detach(), rtol=0, atol=1e-5)
    torch.testing.assert_close(fast, plain.detach(), rtol=0, atol=1e-5)
    assert fast.is_contiguous() and fast.shape == (shape[0], 7, (shape[2] + 3) // 4, (shape[3] + 3) // 4)


def test_banded_head_equals_the_reference_head(model):
    head = model.decode_head
    x = torch.randn(2, 3, 97, 70)  # 1/4-resolution grid 25x18: no stage is a whole factor smaller
    with torch.no_grad():
        features = model.features(x)
        reference = head.classifier(head.fuse_reference(features))
        for band_rows in (1, 3, 8, 100):
            banded = head.banded_inference(features, band_rows=band_rows)
            torch.testing.assert_close(banded, reference, rtol=0, atol=1e-5)
        # Contiguous NCHW maps, as a foreign encoder may return them.
        from_contiguous = head.banded_inference([f.contiguous() for f in features])
    torch.testing.assert_close(from_contiguous, reference, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_training_mode_keeps_the_plain_path_under_no_grad():
    """Drop path stays active in train mode: the fused residual adds would skip it."""
    torch.manual_seed(0)
    model = SegFormer("b0", num_classes=3, drop_path_rate=0.5, decoder_dropout=0.0).train()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        first, second = model(x), model(x)
    assert not torch.allclose(first, second)


def test_banded_mix_ffn_equals_one_piece(model, monkeypatch):
    """Large inputs run Mix-FFN in bands of rows (each with a halo row for the 3x3 conv)."""
    x = torch.randn(2, 3, 75, 61)
    with torch.no_grad():
        whole = model(x)
        monkeypatch.setattr(mit, "FFN_WHOLE_ELEMENTS", 0)
        for band_elements in (1, 3 * 16 * 128):  # one row per band; three rows at stage 1 (16 wide, 128 hidden)
            monkeypatch.setattr(mit, "FFN_BAND_ELEMENTS", band_elements)
            torch.testing.assert_close(model(x), whole, rtol=0, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size,out", [((7, 5), (25, 18)), ((8, 6), (32, 24)), ((5, 9), (5, 20))])
def test_add_upsampled_rows_adds_rows_of_f_interpolate(channels_last, size, out):
    source = torch.randn(1, 4, *size)
    base = torch.randn(1, 4, *out)
    if channels_last:
        source = source.contiguous(memory_format=torch.channels_last)
        base = base.contiguous(memory_format=torch.channels_last)
    expected = base + F.interpolate(source, size=out, mode="bilinear", align_corners=False)
    matrix = interpolation_matrix(size[0], out[0], torch.float32, source.device)
    for rows in (1, 4, out[0]):
        result = base.clone()
        for start in range(0, out[0], rows):
            add_upsampled_rows(result[:, :, start : start + rows], source, matrix, start)
        torch.testing.assert_close(result, expected, rtol=0, atol=1e-6)


def test_the_fused_kernel_probe_leaves_the_global_random_stream_alone():
    mit._fused_ops_work.cache_clear()
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with torch.no_grad():
        assert fused_inference(torch.zeros(1))  # runs the probe
    assert torch.equal(torch.rand(3), expected)
