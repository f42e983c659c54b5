"""Bilinear resizing (align_corners=False) as matrices, so it can run a band of rows at a time.

The decode head's inference path, the sliding-window engine and the fused loss all resize in
bands that stay in cache instead of making a full-size tensor; they share these weights, read
off ``F.interpolate`` itself, so every path matches the straightforward resize.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def interpolation_matrix(size_in: int, size_out: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(size_out, size_in) weights of 1-D bilinear resizing, align_corners=False, border clamped.

    Read off ``F.interpolate`` itself (resizing an identity): the weights the straightforward
    loss uses, bit for bit.
    """
    eye = torch.eye(size_in, dtype=dtype, device=device)[None, None]
    return F.interpolate(eye, size=(size_out, size_in), mode="bilinear", align_corners=False)[0, 0]


def add_upsampled_rows(out: Tensor, source: Tensor, matrix: Tensor, start: int) -> None:
    """Add rows [start, start + rows) of ``F.interpolate(source, (H, W), mode="bilinear",
    align_corners=False)`` to ``out`` (1, C, rows, W), computed from the few source rows they need.

    ``source`` (1, C, h, w) is a channels-last or a contiguous map, and ``out`` a map (or a region
    of one) in the same layout; ``matrix`` is ``interpolation_matrix(h, H)``. Bilinear resizing is
    separable: the width by F.interpolate, the height by that matrix's rows (F.interpolate's own
    weights), so band by band no full-size tensor is made; the values equal resizing the whole
    map up to rounding.
    """
    rows, width = out.shape[-2:]
    mix = matrix[start : start + rows]
    used = mix.any(0).nonzero()
    first, last = int(used[0]), int(used[-1]) + 1
    contiguous = source.is_contiguous()
    mix, source = mix[:, first:last], source[:, :, first:last]
    if contiguous:
        # Height first, then 1-D resizing of each row: the same weights and values as the 2-D
        # kernel with the height unchanged, a quarter faster (CPU, 19 classes).
        channels, source_width = source.shape[1], source.shape[3]
        mixed = torch.matmul(mix, source).reshape(1, -1, source_width)
        out += F.interpolate(mixed, size=width, mode="linear", align_corners=False).view(1, channels, rows, width)
    else:
        # Channels-last: the width of the source rows, then their mix added to ``out`` by one
        # matrix product over (rows, W * C) matrices.
        wide = F.interpolate(source, size=(last - first, width), mode="bilinear", align_corners=False)
        out.permute(0, 2, 3, 1).view(rows, -1).addmm_(mix, wide.permute(0, 2, 3, 1).reshape(last - first, -1))
