"""Cross-entropy of bilinearly upsampled logits without the full-resolution logits.

The straightforward loss, ``F.cross_entropy(F.interpolate(logits, labels.shape[-2:]), labels)``,
writes and re-reads several (B, K, H, W) tensors (the upsampled scores, their log-softmax, both
again in backward): at 150 classes that is half of a SegFormer training step on a CPU and most
of its activation memory. Here the scores are made a band of rows at a time, reduced to each
pixel's loss and turned straight into their gradient, which goes back through the same linear
upsampling to the low-resolution logits; the band is then dropped. The loss is a scalar, so its
gradient is complete (up to the incoming factor) when the forward ends: it is kept, logits-sized,
and backward only scales it. No (B, K, H, W) tensor exists, and each score is exponentiated once
(the straightforward backward exponentiates the log-softmax again).

Per pixel, loss = LSE_k(s_k) - s_y is unchanged by shifting all scores by one number, so the
scores are shifted at low resolution by each position's largest logit (an upsampled score is a
convex combination of four positions' logits, so every shifted score is <= 0 and exp never
overflows); a band whose pixels would all underflow is redone with exact per-pixel maxima.

Per-pixel losses follow ``F.cross_entropy(..., reduction="none")`` exactly, class weights and
label smoothing included; ``upsampled_cross_entropy_sum`` returns their sum, and the caller divides
by what its average counts (all pixels, labelled pixels).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from segformer.model.resize import interpolation_matrix

# Upsampled scores per band (rows x width x classes, whole batch): 4 Mi floats, 16 MiB. Bands are
# memory-bound passes (exp, sum, scale); larger ones waste fewer halo rows, smaller ones stay in cache.
BAND_ELEMENTS = 1 << 22
# A pixel whose shifted exp-sum falls below this lost precision to underflow (sum < e^-57).
UNDERFLOW = 1e-25


def upsampled_cross_entropy_sum(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = 255,
    weight: Tensor | None = None,
    label_smoothing: float = 0.0,
    band_elements: int = BAND_ELEMENTS,
) -> Tensor:
    """Sum over pixels of ``F.cross_entropy(upsample(logits), labels, reduction="none", ...)``.

    ``logits`` (B, K, h, w) are upsampled like ``F.interpolate(mode="bilinear",
    align_corners=False)`` to the size of the (B, H, W) ``labels``; pixels labelled
    ``ignore_index`` add 0. Computed in float32 (float64 for float64 logits); only ``logits``
    gets a gradient.
    """
    if logits.ndim != 4 or labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        raise ValueError(
            f"upsampled_cross_entropy_sum expects logits (B, K, h, w) and labels (B, H, W), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}."
        )
    need_grad = torch.is_grad_enabled() and logits.requires_grad
    return _UpsampledCrossEntropy.apply(
        logits, labels, weight, ignore_index, float(label_smoothing), band_elements, need_grad
    )


class _Band(NamedTuple):
    """Input rows [first, stop) make ``rows`` upsampled rows, of which [skip, skip + keep) are
    this band's output rows [out, out + keep); ``mix`` (rows x input rows) resizes the height
    when the label height is not a whole multiple of the logits' (else F.interpolate does)."""

    first: int
    stop: int
    rows: int
    skip: int
    keep: int
    out: int
    mix: Tensor | None


def _bands(height: int, out_h: int, row_elements: int, budget: int, dtype: torch.dtype, device: torch.device) -> list[_Band]:
    if out_h % height == 0:
        # F.interpolate on a slice of input rows is exact for the output rows that fall between
        # its first and last row, when the scale is a whole number: a band of n input rows plus
        # the next one owns the output rows between them (offset s // 2) and drops the rest.
        scale, offset = out_h // height, (out_h // height) // 2
        n = max(1, budget // (row_elements * scale) - 1)
        bands = []
        for first in range(0, height, n):
            last = min(height, first + n)
            stop = min(height, last + 1)
            start_out = 0 if first == 0 else scale * first + offset
            end_out = out_h if last == height else scale * last + offset
            bands.append(_Band(first, stop, scale * (stop - first), start_out - scale * first, end_out - start_out, start_out, None))
        return bands
    # Any other ratio: the height by a small matrix of the exact weights, the width by F.interpolate.
    matrix = interpolation_matrix(height, out_h, dtype, device)
    nonzero = matrix != 0
    firsts = nonzero.to(torch.int8).argmax(1).tolist()
    lasts = (height - 1 - nonzero.flip(1).to(torch.int8).argmax(1)).tolist()
    n = max(1, budget // row_elements)
    bands = []
    for out in range(0, out_h, n):
        end = min(out_h, out + n)
        first, stop = firsts[out], lasts[end - 1] + 1
        bands.append(_Band(first, stop, end - out, 0, end - out, out, matrix[out:end, first:stop]))
    return bands


class _UpsampledCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, weight, ignore_index, smoothing, band_elements, need_grad):
        batch, classes, height, width = logits.shape
        out_h, out_w = labels.shape[-2:]
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
        # Channels-last, each position shifted by its largest logit (see the module docstring).
        z = logits.detach().to(dtype).permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format)
        z.sub_(z.amax(-1, keepdim=True))

        valid = labels != ignore_index
        targets = labels.long().where(valid, 0)
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
            bad = labels[(targets < 0) | (targets >= classes)][0].item()
            raise ValueError(f"Label {bad} is neither a class id (0..{classes - 1}) nor the ignore index {ignore_index}.")
        class_weight = torch.ones(classes, dtype=dtype, device=z.device) if weight is None else weight.to(z.device, dtype)
        # Per pixel, loss = lse_coef * LSE - true_coef * s_y - valid * (smooth_weight . s).
        true_coef = class_weight[targets] * valid * (1.0 - smoothing)
        pixels = _Pixels(
            targets[..., None],
            true_coef,
            true_coef + valid * (smoothing / classes * class_weight.sum()),
            valid.to(dtype) if smoothing else None,
            class_weight * (smoothing / classes),
        )

        total = z.new_zeros(())
        grad = torch.zeros_like(z) if need_grad else None
        bands = _bands(height, out_h, out_w * classes, band_elements, dtype, z.device)
        # One buffer for every band's scores: a fresh large tensor per band costs page faults.
        buffer = z.new_empty(max(band.rows for band in bands) * out_w * classes)
        grad_buffer = z.new_empty(max(band.rows for band in bands) * width * classes) if need_grad else None
        # One image at a time, so that every band is a contiguous block of memory.
        for image in range(batch):
            for band in bands:
                total += _band(z[image], pixels, image, band, out_w, buffer, grad_buffer, None if grad is None else grad[image])
        if grad is not None:
            ctx.save_for_backward(grad.permute(0, 3, 1, 2))
        ctx.logits_dtype = logits.dtype
        return total.to(logits.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(ctx.logits_dtype), None, None, None, None, None, None


class _Pixels(NamedTuple):
    """Per pixel (B, H, W): loss = lse_coef * LSE - true_coef * s_y - valid * (smooth_weight . s)."""

    targets: Tensor  # (B, H, W, 1), ignored pixels at class 0
    true_coef: Tensor
    lse_coef: Tensor
    valid: Tensor | None  # only with label smoothing
    smooth_weight: Tensor  # (K,)


def _band(
    z: Tensor, pixels: _Pixels, image: int, band: _Band, out_w: int, buffer: Tensor, grad_buffer: Tensor | None, grad: Tensor | None
) -> Tensor:
    """One band of one image: its loss, and its gradient added to ``grad`` (h, w, K)."""
    rows = (image, slice(band.out, band.out + band.keep))
    targets = pixels.targets[rows]
    up, scores, sums, true_scores, smooth_scores = _band_scores(z, band, out_w, targets, pixels, buffer, exact_peak=False)
    if bool(sums.min() < UNDERFLOW):
        up, scores, sums, true_scores, smooth_scores = _band_scores(z, band, out_w, targets, pixels, buffer, exact_peak=True)
    coef, true_coef = pixels.lse_coef[rows], pixels.true_coef[rows]
    loss = (coef * sums.log()).sum() - (true_coef * true_scores).sum()
    if smooth_scores is not None:
        loss -= (pixels.valid[rows] * smooth_scores).sum()
    if grad is None:
        return loss
    # d loss / d scores = lse_coef * softmax - true_coef * onehot - valid * smooth_weight, written
    # over the band's scores; the rows it computes but does not own get 0.
    dscores = scores.mul_((coef / sums)[..., None])
    dscores.scatter_add_(-1, targets, -true_coef[..., None])
    if smooth_scores is not None:
        dscores.addcmul_(pixels.valid[rows][..., None], pixels.smooth_weight, value=-1.0)
    up[: band.skip].zero_()
    up[band.skip + band.keep :].zero_()
    _, width, classes = z.shape
    source_rows = band.rows if band.mix is not None else band.stop - band.first
    dsource = grad_buffer[: source_rows * width * classes].view(source_rows, width, classes)
    torch.ops.aten.upsample_bilinear2d_backward.grad_input(
        up.permute(2, 0, 1)[None], [band.rows, out_w], [1, classes, source_rows, width], False,
        grad_input=dsource.permute(2, 0, 1)[None],
    )
    if band.mix is not None:
        dsource = (band.mix.T @ dsource.reshape(band.rows, -1)).view(-1, width, classes)
    grad[band.first : band.stop] += dsource
    return loss


def _band_scores(z, band, out_w, targets, pixels, buffer, exact_peak):
    """A band's upsampled scores (in ``buffer``), exponentiated in place, with each pixel's
    exp-sum and the (shifted) scores the loss's linear terms need, taken before the exp."""
    _, width, classes = z.shape
    source = z[band.first : band.stop]
    if band.mix is not None:
        source = (band.mix @ source.reshape(band.stop - band.first, -1)).view(-1, width, classes)
    up = buffer[: band.rows * out_w * classes].view(band.rows, out_w, classes)
    torch.ops.aten.upsample_bilinear2d.out(
        source.permute(2, 0, 1)[None], [band.rows, out_w], False, None, None, out=up.permute(2, 0, 1)[None]
    )
    scores = up[band.skip : band.skip + band.keep]
    if exact_peak:
        scores.sub_(scores.amax(-1, keepdim=True))
    true_scores = scores.gather(-1, targets).squeeze(-1)
    smooth_scores = scores @ pixels.smooth_weight if pixels.valid is not None else None
    sums = scores.exp_().sum(-1)
    return up, scores, sums, true_scores, smooth_scores
