"""SegFormer = Mix Transformer encoder + all-MLP decode head, in the six published sizes."""

from __future__ import annotations

import os
from typing import Any

from torch import Tensor, nn

from segformer.errors import ConfigError
from segformer.model.head import DecodeHead
from segformer.model.mit import MIT_VARIANTS, MixTransformer

# The NVlabs/transformers decoder widths, which every public checkpoint follows (MMSeg 1.x uses
# 256 for all, which `decoder_dim` can express).
# The smallest side whose 1/4-resolution token grid (ceil(side / 4)) fits stage 1's 8x8
# sequence-reduction kernel.
MIN_INPUT_SIZE = 29

DECODER_DIMS = {"b0": 256, "b1": 256, "b2": 768, "b3": 768, "b4": 768, "b5": 768}


class SegFormer(nn.Module):
    """Semantic segmentation model returning logits at 1/4 of the input resolution.

    ``norm_eps`` is the eps of the block and stage-final LayerNorms: 1e-6 in the NVlabs code
    that trained the paper's models, 1e-5 in transformers; checkpoints keep their origin's.
    """

    def __init__(
        self,
        variant: str = "b0",
        num_classes: int = 150,
        id2label: dict[int, str] | None = None,
        drop_path_rate: float = 0.1,
        fast_head: bool = True,
        norm_eps: float = 1e-6,
        decoder_dim: int | None = None,
        decoder_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if variant not in MIT_VARIANTS:
            raise ConfigError(
                f"Unknown SegFormer variant {variant!r}: expected one of {', '.join(MIT_VARIANTS)}."
            )
        if num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes}.")
        self.variant = variant
        self.encoder = MixTransformer(MIT_VARIANTS[variant], drop_path_rate=drop_path_rate, norm_eps=norm_eps)
        self.decode_head = DecodeHead(
            MIT_VARIANTS[variant].hidden_sizes,
            decoder_dim or DECODER_DIMS[variant],
            num_classes,
            dropout=decoder_dropout,
            fast=fast_head,
        )
        self.id2label = id2label

    @property
    def num_classes(self) -> int:
        return self.decode_head.classifier.out_channels

    @property
    def norm_eps(self) -> float:
        return self.encoder.norm_eps

    @property
    def fast_head(self) -> bool:
        return self.decode_head.fast

    @fast_head.setter
    def fast_head(self, enabled: bool) -> None:
        self.decode_head.fast = enabled

    @property
    def id2label(self) -> dict[int, str]:
        return self._id2label

    @id2label.setter
    def id2label(self, id2label: dict[int, str] | None) -> None:
        if id2label is None:
            id2label = {i: f"class_{i}" for i in range(self.num_classes)}
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if sorted(id2label) != list(range(self.num_classes)):
            raise ConfigError(
                f"id2label must name every class id 0..{self.num_classes - 1} once, "
                f"got ids {sorted(id2label)[:10]}{'...' if len(id2label) > 10 else ''}."
            )
        self._id2label = id2label

    @property
    def config(self) -> dict[str, Any]:
        """What it takes to rebuild this model around a state dict (stored in our checkpoints)."""
        return {
            "variant": self.variant,
            "num_classes": self.num_classes,
            "id2label": dict(self.id2label),
            "norm_eps": self.norm_eps,
            "decoder_dim": self.decode_head.bn.num_features,
        }

    def reset_classifier(self, num_classes: int, id2label: dict[int, str] | None = None) -> None:
        """Replace the classifier for a new label set; everything else keeps its weights."""
        self.decode_head.reset_classifier(num_classes)
        self.id2label = id2label

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(
                f"SegFormer expects pixel_values of shape (batch, 3, height, width), got "
                f"{tuple(pixel_values.shape)}; add a batch dimension with .unsqueeze(0) for one "
                "image, and convert grey or RGBA images to RGB."
            )
        if not pixel_values.is_floating_point():
            raise ValueError(
                f"SegFormer expects float pixel_values (normalised RGB), got dtype {pixel_values.dtype}."
            )
        if min(pixel_values.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(
                f"SegFormer needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels (the first "
                f"stage reduces keys and values 8x8 times), got {tuple(pixel_values.shape[-2:])}."
            )
        return self.decode_head(self.encoder(pixel_values))

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, num_classes: int | None = None, **kwargs: Any) -> "SegFormer":
        """Load any public SegFormer checkpoint: a transformers folder or hub id, an NVlabs
        ``.pth`` (backbone or full model), or one of our Lightning ``.ckpt`` files.

        The variant comes from the weights. ``num_classes`` different from the checkpoint's
        gives a fresh classifier; ``kwargs`` go to the constructor (``fast_head``, ...).
        """
        from segformer.model.checkpoints import load_pretrained

        return load_pretrained(source, num_classes=num_classes, **kwargs)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that transformers' SegFormer classes load."""
        from segformer.model.checkpoints import save_transformers

        save_transformers(self, directory)


def build_segformer(
    variant: str = "b0",
    num_classes: int = 150,
    pretrained: str | None = None,
    id2label: dict[int, str] | None = None,
    drop_path_rate: float = 0.1,
    fast_head: bool = True,
) -> SegFormer:
    """The Hydra entry point: a new model, or a pretrained one adapted to ``num_classes``."""
    if pretrained:
        model = SegFormer.from_pretrained(
            pretrained, num_classes=num_classes, drop_path_rate=drop_path_rate, fast_head=fast_head
        )
        if model.variant != variant:
            raise ConfigError(
                f"model.pretrained={pretrained!r} holds a SegFormer-{model.variant.upper()}, but the "
                f"config asks for {variant}: choose model={model.variant} or another checkpoint."
            )
        if id2label is not None:
            model.id2label = id2label
        return model
    return SegFormer(variant, num_classes, id2label=id2label, drop_path_rate=drop_path_rate, fast_head=fast_head)
