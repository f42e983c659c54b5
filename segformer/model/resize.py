"""Bilinear resizing (align_corners=False) as matrices, so it can run a band of rows at a time.

The decode head's inference path, the sliding-window engine and the fused loss all resize in
bands that stay in cache instead of making a full-size tensor; they share these weights, read
off ``F.interpolate`` itself, so every path matches the straightforward resize.
"""

from __future__ import annotations

from collections.abc import Sequence

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


def _source_rows(mix: Tensor) -> tuple[int, int]:
    """The range of source rows that rows of an interpolation matrix read."""
    used = mix.any(0).nonzero()
    return int(used[0]), int(used[-1]) + 1


def resized_rows(source: Tensor, matrix: Tensor | None, start: int, stop: int, widths: Sequence[int]) -> Tensor:
    """Rows [start, stop) of ``source`` (C, h, w) resized bilinearly (align_corners=False), as a
    contiguous (C, stop - start, widths[-1]) tensor made from the few source rows they need.

    ``matrix`` maps the h source rows to the output rows (``interpolation_matrix``, or a product of
    them for resizes in a row; None: the rows are kept), and each width of ``widths`` is one 1-D
    resize of the width, applied in turn. Resizing is separable, so this is the value of the 2-D
    resizes up to rounding: the height by F.interpolate's own weights, the width by F.interpolate.
    """
    if matrix is None:
        rows = source[:, start:stop]
    else:
        mix = matrix[start:stop]
        first, last = _source_rows(mix)
        rows = torch.matmul(mix[:, first:last], source[:, first:last])
    channels, count = rows.shape[:2]
    for width in widths:
        rows = F.interpolate(rows.reshape(1, -1, rows.shape[-1]), size=width, mode="linear", align_corners=False)
    return rows.reshape(channels, count, -1)


def add_upsampled_rows(out: Tensor, source: Tensor, matrix: Tensor, start: int) -> None:
    """Add rows [start, start + rows) of ``F.interpolate(source, (H, W), mode="bilinear",
    align_corners=False)`` to ``out`` (1, C, rows, W), computed from the few source rows they need.

    ``source`` (1, C, h, w) is a channels-last or a contiguous map, and ``out`` a map (or a region
    of one) in the same layout; ``matrix`` is ``interpolation_matrix(h, H)``. Band by band no
    full-size tensor is made; the values equal resizing the whole map up to rounding.
    """
    rows, width = out.shape[-2:]
    if source.is_contiguous():
        # Height first, then 1-D resizing of each row: the same weights and values as the 2-D
        # kernel with the height unchanged, a quarter faster (CPU, 19 classes).
        out += resized_rows(source[0], matrix, start, start + rows, [width])
        return
    # Channels-last: the width of the source rows, then their mix added to ``out`` by one matrix
    # product over (rows, W * C) matrices.
    mix = matrix[start : start + rows]
    first, last = _source_rows(mix)
    wide = F.interpolate(source[:, :, first:last], size=(last - first, width), mode="bilinear", align_corners=False)
    out.permute(0, 2, 3, 1).view(rows, -1).addmm_(mix[:, first:last], wide.permute(0, 2, 3, 1).reshape(last - first, -1))
