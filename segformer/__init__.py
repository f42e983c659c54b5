"""SegFormer semantic segmentation: Mix Transformer encoder + all-MLP decode head."""

from typing import Any

from segformer.model import MixTransformer, SegFormer, build_segformer
from segformer.model.classifier import MiTForImageClassification
from segformer.model.presets import PRESETS, list_presets

__all__ = ["PRESETS", "MiTForImageClassification", "MixTransformer", "SegFormer", "SegFormerImageProcessor", "build_segformer", "list_presets"]


def __getattr__(name: str) -> Any:
    # The processor pulls in the data pipeline (albumentations, Lightning): loaded on first use.
    if name == "SegFormerImageProcessor":
        from segformer.inference.processor import SegFormerImageProcessor

        return SegFormerImageProcessor
    raise AttributeError(f"module 'segformer' has no attribute {name!r}")
