"""SegFormer = Mix Transformer encoder + all-MLP decode head, in the six published sizes."""

from __future__ import annotations

import logging
import os
from typing import Any

from torch import Tensor, nn

from segformer.errors import CheckpointError, ConfigError
from segformer.model import checkpoints
from segformer.model.head import DECODER_DIMS, DecodeHead
from segformer.model.mit import MIT_VARIANTS, MixTransformer

# The smallest side whose 1/4-resolution token grid (ceil(side / 4)) fits stage 1's 8x8
# sequence-reduction kernel.
MIN_INPUT_SIZE = 29

log = logging.getLogger(__name__)


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
        if not 0 <= decoder_dropout < 1:
            raise ConfigError(
                f"decoder_dropout={decoder_dropout} (model.decoder_dropout) is out of range: it is the "
                "probability of dropping a decode-head channel, in [0, 1) (the paper: 0.1)."
            )
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
        gives a fresh classifier; ``kwargs`` go to the constructor (``fast_head``, ``norm_eps``,
        ...) and win over what the checkpoint says. Loading counts what matched: missing,
        unexpected or misshapen keys raise ``CheckpointError``, never a silently random model.
        """
        checkpoint = checkpoints.read_checkpoint(source)
        fmt, state_dict = checkpoint.format, checkpoint.state_dict
        try:
            arch = checkpoints.infer_architecture(state_dict, fmt)
        except CheckpointError as error:
            raise CheckpointError(f"Checkpoint {checkpoint.origin!r} does not fit SegFormer: {error}.") from None
        has_head = arch["num_classes"] is not None
        if not has_head and num_classes is None:
            raise CheckpointError(
                f"Checkpoint {checkpoint.origin!r} holds only an encoder (ImageNet-pretrained MiT); pass "
                "num_classes to put a new decode head on it."
            )
        # What the checkpoint says, unless the caller says otherwise (norm_eps=..., decoder_dim=...).
        settings = {"norm_eps": checkpoint.norm_eps, "decoder_dim": arch["decoder_dim"], **kwargs}
        model = cls(arch["variant"], num_classes=arch["num_classes"] or num_classes, **settings)
        native, missing, unexpected = checkpoints.to_native(state_dict, fmt, model)
        if not has_head:
            missing = [k for k in missing if not k.startswith("decode_head.")]
        if missing or unexpected:
            raise CheckpointError(
                f"Checkpoint {checkpoint.origin!r} ({fmt} format, SegFormer-{arch['variant'].upper()}) does not "
                f"fit the model: {len(missing)} missing keys ({checkpoints.preview(missing)}) and {len(unexpected)} "
                f"unexpected keys ({checkpoints.preview(unexpected)}). Nothing was loaded."
            )
        expected = model.state_dict()
        misshapen = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in native.items() if v.shape != expected[k].shape]
        if misshapen:
            raise CheckpointError(
                f"Checkpoint {checkpoint.origin!r} has tensors of the wrong shape: {checkpoints.preview(misshapen)}. Nothing was loaded."
            )
        # Tensors the checkpoint may lack (a new head, BatchNorm's counter) keep their initial values.
        model.load_state_dict({**expected, **native})
        if has_head:
            model.id2label = checkpoint.id2label if checkpoint.id2label and len(checkpoint.id2label) == model.num_classes else None
            log.info("Loaded all %d tensors of %s (%s format).", len(native), checkpoint.origin, fmt)
        else:
            log.info(
                "Loaded the SegFormer-%s encoder from %s (%s format, %d tensors); the decode head is new.",
                arch["variant"].upper(), checkpoint.origin, fmt, len(native),
            )
        if num_classes is not None and num_classes != model.num_classes:
            log.warning(
                "%s has %d classes; the classifier is re-initialised for %d classes.",
                checkpoint.origin, model.num_classes, num_classes,
            )
            model.reset_classifier(num_classes)
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that transformers' SegFormer classes load."""
        checkpoints.save_transformers(self, directory)


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
        try:
            model = SegFormer.from_pretrained(
                pretrained, num_classes=num_classes, drop_path_rate=drop_path_rate, fast_head=fast_head
            )
        except CheckpointError as error:  # e.g. offline with a hub id: name the key and the ways out
            raise CheckpointError(
                f"model.pretrained={pretrained}: {error} Or give model.pretrained=<transformers folder or "
                ".pth file>, or model.pretrained=null to train from scratch."
            ) from None
        if model.variant != variant:
            raise ConfigError(
                f"model.pretrained={pretrained!r} holds a SegFormer-{model.variant.upper()}, but the "
                f"config asks for {variant}: choose model={model.variant} or another checkpoint."
            )
        if id2label is not None:
            model.id2label = id2label
        return model
    return SegFormer(variant, num_classes, id2label=id2label, drop_path_rate=drop_path_rate, fast_head=fast_head)
