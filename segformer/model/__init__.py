"""The SegFormer network: MiT encoder, decode head, the full model and its checkpoint formats."""

from segformer.model.head import DecodeHead
from segformer.model.mit import MIT_VARIANTS, MiTConfig, MixTransformer
from segformer.model.head import DECODER_DIMS
from segformer.model.segformer import SegFormer, build_segformer

__all__ = ["DECODER_DIMS", "MIT_VARIANTS", "DecodeHead", "MiTConfig", "MixTransformer", "SegFormer", "build_segformer"]
