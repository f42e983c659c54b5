"""Encoders other than MiT for ``SegFormer(encoder=...)``.

SegFormer's decode head takes any module that maps (B, 3, H, W) to four maps at strides 4, 8,
16 and 32 and declares their channels (``out_channels``); ``ConvEncoder`` is the smallest such
module, the template for wrapping your own (configs/model/custom_encoder_example.yaml).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class ConvEncoder(nn.Module):
    """Plain 3x3 conv-BN-ReLU stages: a stride-4 stem, then one stride-2 stage per map."""

    def __init__(self, out_channels: Sequence[int] = (32, 64, 128, 256), in_channels: int = 3) -> None:
        super().__init__()
        self.out_channels = tuple(int(c) for c in out_channels)
        first = self.out_channels[0]
        stem = nn.Sequential(_conv_bn_relu(in_channels, first, 2), _conv_bn_relu(first, first, 2))
        rest = [_conv_bn_relu(a, b, 2) for a, b in zip(self.out_channels, self.out_channels[1:])]
        self.stages = nn.ModuleList([stem, *rest])

    def forward(self, pixel_values: Tensor) -> list[Tensor]:
        features, x = [], pixel_values
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features
