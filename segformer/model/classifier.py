"""MiT image classification: the encoder's ImageNet stage, as transformers' SegformerForImageClassification.

The MiT encoder, its last stage's LayerNorm (the stage's own ``norm``), the mean over the last
stage's tokens and a linear classifier. This is the model every SegFormer encoder was pretrained
as; its checkpoints (nvidia/mit-b*, NVlabs mit_b*.pth with ``head.*``) load with their classifier.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor, nn

from segformer.errors import CheckpointError, ConfigError
from segformer.model import checkpoints
from segformer.model.mit import MIT_VARIANTS, MixTransformer
from segformer.model.segformer import MIN_INPUT_SIZE, ClassNames

log = logging.getLogger(__name__)

# Our .ckpt metadata marks a classifier so the two tasks' checkpoints are told apart.
TASK = "classification"


class MiTForImageClassification(ClassNames, nn.Module):
    """Logits (B, num_classes) of (B, 3, H, W) images of any size (at least 29 pixels a side).

    ``norm_eps`` is the block and stage-final LayerNorm eps: 1e-6 as NVlabs trained, 1e-5 as
    transformers computes; checkpoints keep their origin's.
    """

    def __init__(
        self,
        variant: str = "b0",
        num_classes: int = 1000,
        id2label: dict[int, str] | None = None,
        drop_path_rate: float = 0.1,
        norm_eps: float = 1e-6,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if variant not in MIT_VARIANTS:
            raise ConfigError(f"Unknown MiT variant {variant!r}: expected one of {', '.join(MIT_VARIANTS)}.")
        if num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes}.")
        self.variant = variant
        self.encoder = MixTransformer(MIT_VARIANTS[variant], drop_path_rate=drop_path_rate, norm_eps=norm_eps)
        self.encoder.activation_checkpointing = activation_checkpointing
        self.classifier = nn.Linear(MIT_VARIANTS[variant].hidden_sizes[-1], num_classes)
        # transformers' _init_weights for the classifier: N(0, 0.02) weights, zero bias.
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        self.id2label = id2label

    @property
    def decode_head(self) -> nn.Module:
        """The classifier, under the name the optimizer's parameter groups give the head."""
        return self.classifier

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    @property
    def norm_eps(self) -> float:
        return self.encoder.norm_eps

    @property
    def config(self) -> dict[str, Any]:
        """What it takes to rebuild this model around a state dict (stored in our checkpoints)."""
        return {"task": TASK, "variant": self.variant, "num_classes": self.num_classes, "id2label": dict(self.id2label), "norm_eps": self.norm_eps}

    def reset_classifier(self, num_classes: int, id2label: dict[int, str] | None = None) -> None:
        """A new classifier for another label set; the encoder keeps its weights."""
        self.classifier = nn.Linear(self.classifier.in_features, num_classes).to(self.classifier.weight.device)
        nn.init.normal_(self.classifier.weight, std=0.02)
        nn.init.zeros_(self.classifier.bias)
        self.id2label = id2label

    def forward(self, pixel_values: Tensor) -> Tensor:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3 or not pixel_values.is_floating_point():
            raise ValueError(f"MiTForImageClassification expects float pixel_values (batch, 3, height, width), got {tuple(pixel_values.shape)} {pixel_values.dtype}.")
        if min(pixel_values.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"MiT needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, got {tuple(pixel_values.shape[-2:])}.")
        last = self.encoder.channels_last_maps(pixel_values)[-1]  # after the stage's LayerNorm
        return self.classifier(last.mean(dim=(2, 3)))

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, num_classes: int | None = None, **kwargs: Any) -> MiTForImageClassification:
        """Load a transformers classification folder or hub id (nvidia/mit-b*), a preset
        (mit_b2_imagenet), an NVlabs mit_b*.pth with its ``head.*``, or one of our .ckpt files.

        Loading counts what matched: missing, unexpected or misshapen keys raise CheckpointError.
        A checkpoint without a classifier (an encoder only) needs ``num_classes``; a ``num_classes``
        other than the checkpoint's gives a new classifier. ``kwargs`` go to the constructor.
        """
        checkpoint = checkpoints.read_checkpoint(source)
        fmt, state_dict = checkpoint.format, checkpoint.state_dict
        try:
            variant = checkpoints.infer_architecture(state_dict, fmt)["variant"]
        except CheckpointError as error:
            raise CheckpointError(f"Checkpoint {checkpoint.origin!r} does not fit MiT: {error}.") from None
        head = state_dict.get(checkpoints.map_key("classifier.weight", fmt))
        if head is None and num_classes is None:
            raise CheckpointError(
                f"Checkpoint {checkpoint.origin!r} holds a MiT encoder without an image classifier; pass "
                "num_classes to put a new classifier on it."
            )
        model = cls(variant, num_classes=head.shape[0] if head is not None else num_classes, **{"norm_eps": checkpoint.norm_eps, **kwargs})
        native, missing, unexpected = checkpoints.to_native(state_dict, fmt, model)
        if head is None:
            missing = [k for k in missing if not k.startswith("classifier.")]
        expected = model.state_dict()
        misshapen = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in native.items() if v.shape != expected[k].shape]
        if missing or unexpected or misshapen:
            raise CheckpointError(
                f"Checkpoint {checkpoint.origin!r} ({fmt} format, MiT-{variant.upper()}) does not fit the image "
                f"classifier: {len(missing)} missing keys ({checkpoints.preview(missing)}), {len(unexpected)} unexpected "
                f"keys ({checkpoints.preview(unexpected)}), {len(misshapen)} of the wrong shape "
                f"({checkpoints.preview(misshapen)}). Nothing was loaded."
            )
        model.load_state_dict({**expected, **native})
        if head is not None:
            labels = checkpoint.id2label
            model.id2label = labels if labels and len(labels) == model.num_classes else None
        log.info("Loaded %d tensors of %s (%s format).", len(native), checkpoint.origin, fmt)
        if num_classes is not None and num_classes != model.num_classes:
            log.warning("%s has %d classes; the classifier is new, for %d classes.", checkpoint.origin, model.num_classes, num_classes)
            model.reset_classifier(num_classes)
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write config.json + model.safetensors that transformers' SegformerForImageClassification loads."""
        checkpoints.save_transformers(self, directory, config=transformers_config(self))


def transformers_config(model: MiTForImageClassification) -> dict[str, Any]:
    """config.json for transformers' SegformerForImageClassification."""
    return checkpoints.mit_config(model, "SegformerForImageClassification", 0.1)


def build_classifier(
    variant: str = "b0",
    num_classes: int = 1000,
    pretrained: str | None = None,
    drop_path_rate: float = 0.1,
    activation_checkpointing: bool = False,
) -> MiTForImageClassification:
    """The Hydra entry point (configs/model/cls_b*.yaml): a new or a pretrained classifier."""
    if not pretrained:
        return MiTForImageClassification(variant, num_classes, drop_path_rate=drop_path_rate, activation_checkpointing=activation_checkpointing)
    try:
        model = MiTForImageClassification.from_pretrained(
            pretrained, num_classes=num_classes, drop_path_rate=drop_path_rate, activation_checkpointing=activation_checkpointing
        )
    except CheckpointError as error:
        raise CheckpointError(f"model.pretrained={pretrained}: {error} Or give model.pretrained=null to train from scratch.") from None
    if model.variant != variant:
        raise ConfigError(f"model.pretrained={pretrained!r} holds a MiT-{model.variant.upper()}, but the config asks for {variant}: choose model={model.variant}.")
    return model


@torch.no_grad()
def top_k(logits: Tensor, id2label: dict[int, str], k: int = 5) -> list[list[tuple[str, float]]]:
    """The k most probable (label, probability) pairs of each row of logits."""
    probs = logits.float().softmax(dim=-1)
    values, indices = probs.topk(min(k, probs.shape[-1]), dim=-1)
    return [[(id2label[int(i)], float(v)) for i, v in zip(row_i, row_v)] for row_i, row_v in zip(indices, values)]
