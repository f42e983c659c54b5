"""SegFormer semantic segmentation: Mix Transformer encoder + all-MLP decode head."""

from segformer.model import MixTransformer, SegFormer, build_segformer

__all__ = ["MixTransformer", "SegFormer", "build_segformer"]
