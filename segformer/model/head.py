"""The all-MLP decode head of SegFormer (Xie et al. 2021, Sec. 3.2), with a folded fast path.

The paper computes, at 1/4 resolution, ``fuse(concat(up(L4 x4), up(L3 x3), up(L2 x2), L1 x1))``:
four D-channel maps upsampled and concatenated, then a 1x1 conv from 4D to D channels. Channel
mixing and bilinear upsampling are both linear and commute (bilinear weights sum to one, so a
bias survives upsampling unchanged), so the same function is ``sum_i up(F_i L_i x_i)`` where
``F_i`` is the fuse conv's slice for stage i. Folding ``F_i L_i`` into one (D, C_i) matrix lets
each stage be projected at its own resolution and only D channels per stage be upsampled: no
4D-channel tensor exists, and the 4D -> D conv at 1/4 resolution disappears. At inference the
BatchNorm folds in as well. The parameters keep the public layout (linear_c, linear_fuse, bn,
classifier), so checkpoints are unchanged and gradients reach the original parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segformer.model.mit import fused_inference, fused_linear
from segformer.model.resize import add_upsampled_rows, interpolation_matrix

# The NVlabs/transformers decoder widths, which every public checkpoint follows (MMSeg 1.x uses
# 256 for all, which `decoder_dim` can express).
DECODER_DIMS = {"b0": 256, "b1": 256, "b2": 768, "b3": 768, "b4": 768, "b5": 768}

# 1/4-resolution rows per band of the inference head: a multiple of the largest upsampling
# factor (8), so a band needs few source rows; with the classifier in oneDNN 16 beat 8 for B0 at
# 512x512 (13.0 -> 11.2 ms) and on 1024x1024 windows, and tied for B2 (benchmarks/RESULTS.md).
BAND_ROWS = 16


class DecodeHead(nn.Module):
    """Per-stage linear projection to D channels, fusion, BN-ReLU, dropout and a classifier."""

    def __init__(
        self,
        in_channels: tuple[int, ...],
        dim: int,
        num_classes: int,
        dropout: float = 0.1,
        fast: bool = True,
    ) -> None:
        super().__init__()
        self.fast = fast
        self.linear_c = nn.ModuleList(nn.Linear(c, dim) for c in in_channels)
        self.linear_fuse = nn.Conv2d(dim * len(in_channels), dim, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(dim)
        # Channel dropout, as in the NVlabs/mmseg head that produced the paper's numbers.
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1)
        nn.init.kaiming_normal_(self.linear_fuse.weight, mode="fan_out", nonlinearity="relu")
        self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh classifier for a new label set (fine-tuning to another dataset)."""
        dim = self.classifier.in_channels
        self.classifier = nn.Conv2d(dim, num_classes, kernel_size=1).to(self.classifier.weight)
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: list[Tensor]) -> Tensor:
        if self.fast and not self.training and fused_inference(features[0]):
            return self.banded_inference(features)
        if self.fast:
            return self.classify(self.fuse_folded(features))
        # Logits leave in the standard layout: the loss's softmax over classes (and most user
        # code) would otherwise copy the large upsampled channels-last tensor.
        return self.classifier(self.dropout(self.fuse_reference(features))).contiguous()

    def classify(self, fused: Tensor) -> Tensor:
        """Channel dropout and the 1x1 classifier as one batched matmul.

        Dropping channel c of a sample's map is zeroing column c of that sample's classifier
        weights, so the dropped-out (B, D, H/4, W/4) map (100 MiB for B2 at 512x512, batch 2) and
        its gradient are never made. The mask is drawn as ``nn.Dropout2d`` draws it (same random
        stream, same mask); the logits leave in the standard layout.
        """
        batch, dim, height, width = fused.shape
        classes = self.classifier.out_channels
        weight = self.classifier.weight.view(1, classes, dim)
        p = self.dropout.p
        if self.training and p > 0:
            weight = weight * fused.new_empty(batch, 1, dim).bernoulli_(1 - p).div_(1 - p)  # p < 1: checked
        else:
            weight = weight.expand(batch, classes, dim)
        tokens = fused.permute(0, 2, 3, 1).reshape(batch, height * width, dim)  # a view when channels-last
        logits = torch.baddbmm(self.classifier.bias.view(1, 1, classes), tokens, weight.transpose(1, 2))
        return logits.view(batch, height, width, classes).permute(0, 3, 1, 2).contiguous()

    def fuse_reference(self, features: list[Tensor]) -> Tensor:
        """The paper's computation, step by step: the ground truth for the folded path."""
        size = features[0].shape[-2:]
        projected = []
        for x, linear in zip(features, self.linear_c):
            batch, _, height, width = x.shape
            y = linear(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(batch, -1, height, width)
            projected.append(F.interpolate(y, size=size, mode="bilinear", align_corners=False))
        x = self.linear_fuse(torch.cat(projected[::-1], dim=1))
        return F.relu(self.bn(x))

    def fuse_folded(self, features: list[Tensor]) -> Tensor:
        """The same function as `fuse_reference`, projecting each stage at its own resolution."""
        weights, bias = self._folded_weights()
        fold_bn = not self.bn.training
        if fold_bn:
            scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
            weights = [w * scale[:, None] for w in weights]
            bias = (bias - self.bn.running_mean) * scale + self.bn.bias
        size = features[0].shape[-2:]
        out = F.conv2d(features[0], weights[0][:, :, None, None], bias)
        # In place (autograd needs none of these outputs): each fresh (B, D, H/4, W/4) tensor
        # costs its page faults.
        for x, w in zip(features[1:], weights[1:]):
            out += F.interpolate(F.conv2d(x, w[:, :, None, None]), size=size, mode="bilinear", align_corners=False)
        return F.relu(out if fold_bn else self.bn(out), inplace=True)

    def banded_inference(self, features: list[Tensor], band_rows: int = BAND_ROWS) -> Tensor:
        """`fuse_folded` then the classifier, in eval, a band of 1/4-resolution rows at a time.

        Each band's sum of upsampled projections (`add_upsampled_rows`), its ReLU and its
        classifier input stay in cache, and only the logits are written out: no
        (B, D, H/4, W/4) tensor exists (at B2's D=768 and 512x512 one is 48 MiB, a fresh
        allocation that page-faults on every call). The logits come out contiguous.
        """
        weights, bias = self._folded_weights()
        scale = self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)
        weights = [w * scale[:, None] for w in weights]
        bias = (bias - self.bn.running_mean) * scale + self.bn.bias
        batch, _, height, width = features[0].shape
        dim, classes = weights[0].shape[0], self.classifier.out_channels
        # (B, h, w, C) token grids: free for MiT's channels-last maps.
        grids = [x.permute(0, 2, 3, 1).contiguous() for x in features]
        matrices = [interpolation_matrix(x.shape[1], height, x.dtype, x.device) for x in grids[1:]]
        classifier = self.classifier.weight.view(classes, dim)
        # The classifier runs as (K, D) x (pixels, D)^T, logits out channel-major as stored, the
        # bias added inside the kernel: half the time of addmm into the logits (b0, 150 classes).
        class_bias = {}
        logits = features[0].new_empty(batch, classes, height * width)
        for image in range(batch):  # one image's projections at a time: smaller, reused allocations
            # Stages 2-4 projected at their own resolution, as (1, D, h_i, w_i) channels-last maps.
            low = [fused_linear(x[image : image + 1], w, None).permute(0, 3, 1, 2) for x, w in zip(grids[1:], weights[1:])]
            for start in range(0, height, band_rows):
                stop = min(start + band_rows, height)
                band = fused_linear(grids[0][image : image + 1, start:stop], weights[0], bias)  # (1, rows, W, D)
                for y, matrix in zip(low, matrices):
                    add_upsampled_rows(band.permute(0, 3, 1, 2), y, matrix, start)
                pixels = (stop - start) * width
                if pixels not in class_bias:
                    class_bias[pixels] = self.classifier.bias[:, None].expand(classes, pixels).contiguous()
                logits[image, :, start * width : stop * width] = fused_linear(
                    classifier, band.view(pixels, dim).relu_(), None, class_bias[pixels]
                )
        return logits.view(batch, classes, height, width)

    def _folded_weights(self) -> tuple[list[Tensor], Tensor]:
        """Each stage's (D, C_i) matrix ``F_i L_i`` and the summed bias ``sum_i F_i b_i``."""
        num_stages = len(self.linear_c)
        dim = self.bn.num_features
        # The fuse conv sees the stages in reverse order (stage 4 first), as in the paper's code.
        slices = self.linear_fuse.weight.view(dim, num_stages, dim).unbind(1)[::-1]
        weights = [s @ linear.weight for s, linear in zip(slices, self.linear_c)]
        bias = sum(s @ linear.bias for s, linear in zip(slices, self.linear_c))
        return weights, bias
