"""SegFormer = Mix Transformer encoder + all-MLP decode head, in the six published sizes."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from segformer.errors import CheckpointError, ConfigError, DataError
from segformer.model import checkpoints
from segformer.model.head import DECODER_DIMS, DecodeHead
from segformer.model.mit import MIT_VARIANTS, MixTransformer

# The variant name of a model built around a foreign encoder (SegFormer(encoder=...)).
CUSTOM = "custom"

# The smallest side whose 1/4-resolution token grid (ceil(side / 4)) fits stage 1's 8x8
# sequence-reduction kernel.
MIN_INPUT_SIZE = 29

log = logging.getLogger(__name__)


@dataclass
class SegFormerOutput:
    """``model(x, output_hidden_states=True)``: the logits and the four encoder maps, as
    transformers' ``SegformerModel(..., output_hidden_states=True).hidden_states`` gives them."""

    logits: Tensor
    hidden_states: tuple[Tensor, ...]


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def encoder_channels(encoder: nn.Module) -> tuple[int, ...]:
    """The channels of the four maps an encoder returns, from ``out_channels`` or ``hidden_sizes``."""
    channels = getattr(encoder, "out_channels", None) or getattr(encoder, "hidden_sizes", None)
    if not (
        isinstance(channels, Sequence)
        and len(channels) == 4
        and all(isinstance(c, int) and not isinstance(c, bool) and c > 0 for c in channels)
    ):
        raise ConfigError(
            f"SegFormer(encoder=...) needs an encoder that declares the channels of its four maps (strides "
            f"4, 8, 16, 32) as an attribute out_channels or hidden_sizes, e.g. (64, 128, 320, 512); "
            f"{type(encoder).__name__} has {channels!r}."
        )
    return tuple(channels)


class ClassNames:
    """``id2label`` of a model with ``num_classes`` outputs (segmentation or image classification):
    every id 0..num_classes-1 named once; None names them class_<id>."""

    num_classes: int

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


class SegFormer(ClassNames, nn.Module):
    """Semantic segmentation model returning logits at 1/4 of the input resolution.

    ``norm_eps`` is the eps of the block and stage-final LayerNorms: 1e-6 in the NVlabs code
    that trained the paper's models, 1e-5 in transformers; checkpoints keep their origin's.
    ``encoder`` replaces the MiT encoder of ``variant`` by any module that maps (B, 3, H, W) to
    four maps at strides 4, 8, 16 and 32 and declares their channels (``out_channels`` or
    ``hidden_sizes``); its decoder is 256 wide unless ``decoder_dim`` says otherwise.
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
        encoder: nn.Module | None = None,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if encoder is None and variant not in MIT_VARIANTS:
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
        if encoder is None:
            self.variant = variant
            self.encoder: nn.Module = MixTransformer(
                MIT_VARIANTS[variant], drop_path_rate=drop_path_rate, norm_eps=norm_eps
            )
            channels, default_dim = MIT_VARIANTS[variant].hidden_sizes, DECODER_DIMS[variant]
        else:
            if not isinstance(encoder, nn.Module):
                raise ConfigError(f"SegFormer(encoder=...) takes a torch.nn.Module, got a {type(encoder).__name__}.")
            self.variant = CUSTOM
            self.encoder = encoder
            channels, default_dim = encoder_channels(encoder), DECODER_DIMS["b0"]
        self.decode_head = DecodeHead(
            channels,
            decoder_dim or default_dim,
            num_classes,
            dropout=decoder_dropout,
            fast=fast_head,
        )
        self.id2label = id2label
        if activation_checkpointing:
            self.activation_checkpointing = True

    @property
    def activation_checkpointing(self) -> bool:
        """MiT's blocks recompute their activations in backward (``model.activation_checkpointing``)."""
        return self.has_mit_encoder and self.encoder.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        if not self.has_mit_encoder:
            raise ConfigError(
                f"model.activation_checkpointing=true checkpoints MiT's blocks; the encoder {type(self.encoder).__name__} "
                "is not MiT: set it to false (and checkpoint inside your encoder if it needs to)."
            )
        self.encoder.activation_checkpointing = enabled

    @property
    def has_mit_encoder(self) -> bool:
        return isinstance(self.encoder, MixTransformer)

    @property
    def num_classes(self) -> int:
        return self.decode_head.classifier.out_channels

    @property
    def norm_eps(self) -> float | None:
        return self.encoder.norm_eps if self.has_mit_encoder else None

    @property
    def fast_head(self) -> bool:
        return self.decode_head.fast

    @fast_head.setter
    def fast_head(self, enabled: bool) -> None:
        self.decode_head.fast = enabled

    @property
    def config(self) -> dict[str, Any]:
        """What it takes to rebuild this model around a state dict (stored in our checkpoints)."""
        return {
            "variant": self.variant,
            **({} if self.has_mit_encoder else {"encoder": _qualified_name(type(self.encoder))}),
            "num_classes": self.num_classes,
            "id2label": dict(self.id2label),
            "norm_eps": self.norm_eps,
            "decoder_dim": self.decode_head.bn.num_features,
        }

    def reset_classifier(self, num_classes: int, id2label: dict[int, str] | None = None) -> None:
        """Replace the classifier for a new label set; everything else keeps its weights."""
        self.decode_head.reset_classifier(num_classes)
        self.id2label = id2label

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """``torch.compile`` the encoder and the decode head as two graphs. One graph of the whole
        network trained with wrong encoder gradients on CPU (torch 2.13 inductor, without
        activation checkpointing: the same loss, patch-embedding weight gradients off by most of
        their size), while each part compiled alone matches eager (tests/training/test_compile.py)."""
        self.encoder.compile(*args, **kwargs)
        self.decode_head.compile(*args, **kwargs)

    def features(self, pixel_values: Tensor) -> list[Tensor]:
        """The encoder's four maps as the head consumes them (MiT's in channels-last memory)."""
        if self.has_mit_encoder:
            return self.encoder(pixel_values, channels_last=True)
        features = list(self.encoder(pixel_values))
        expected = [linear.in_features for linear in self.decode_head.linear_c]
        if [f.shape[1] if f.ndim == 4 else None for f in features] != expected:
            raise ValueError(
                f"The encoder {type(self.encoder).__name__} returned maps of shapes "
                f"{[tuple(f.shape) for f in features]}; it declares four (batch, channels, height, width) maps "
                f"with {expected} channels (strides 4, 8, 16, 32)."
            )
        return features

    def forward(self, pixel_values: Tensor, output_hidden_states: bool = False) -> Tensor | SegFormerOutput:
        """Logits (B, K, ceil(H/4), ceil(W/4)); with ``output_hidden_states`` a ``SegFormerOutput``
        holding them and the four encoder maps (contiguous NCHW)."""
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
        features = self.features(pixel_values)
        logits = self.decode_head(features)
        if output_hidden_states:
            return SegFormerOutput(logits, tuple(f.contiguous() for f in features))
        return logits

    @torch.no_grad()
    def predict(
        self,
        images: Any,
        scale: Sequence[int] = (2048, 512),
        size_divisor: int | None = None,
        batch_size: int = 4,
        num_workers: int = 0,
        **inference: Any,
    ) -> Tensor | list[Tensor]:
        """Class maps (H, W) of ``images`` at each one's original size, on the CPU.

        ``images``: one image or a list (file paths, PIL images, numpy arrays or tensors, HWC or
        CHW, uint8 or float) or a 4-D batch. Each is preprocessed as evaluation does (keep-ratio
        resize to fit ``scale`` = (long, short), sides rounded up to ``size_divisor``), and
        predicted with the settings of eval.py / predict.py (``inference``: mode="whole"|"slide",
        crop_size, stride, scales, flip, window_batch), ``batch_size`` images per step on the
        model's device, in eval mode. One image gives one map, a list a list.
        """
        from segformer.inference.inference import InferenceConfig
        from segformer.inference.predictor import Preprocessing, segment
        from segformer.inference.processor import as_image_list, is_single_image

        config = InferenceConfig.from_mapping(inference)
        preprocessing = Preprocessing(size_divisor=size_divisor).with_scale(scale)
        training = self.training
        self.eval()
        try:
            maps: list[Tensor] = []
            for batch, preds in segment(self, as_image_list(images), preprocessing, config, batch_size, num_workers):
                if batch["failed"]:
                    raise DataError(f"Cannot segment {batch['failed'][0][1]}.")
                maps.extend(pred.cpu() for pred in preds)
        finally:
            self.train(training)
        return maps[0] if is_single_image(images) else maps

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
        if checkpoint.extra.get("variant") == CUSTOM:
            raise CheckpointError(
                f"Checkpoint {checkpoint.origin!r} holds a SegFormer with a custom encoder "
                f"({checkpoint.extra.get('encoder')}), which from_pretrained cannot rebuild: build the model with "
                "SegFormer(encoder=..., num_classes=...) and load the checkpoint's state_dict into it."
            )
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
        if not self.has_mit_encoder:
            raise CheckpointError(
                f"save_pretrained writes transformers' SegFormer format, which holds only a MiT encoder; this "
                f"model's encoder is {type(self.encoder).__name__}. Save its weights with "
                "torch.save(model.state_dict(), path) and rebuild it with SegFormer(encoder=..., num_classes=...)."
            )
        checkpoints.save_transformers(self, directory)


def build_segformer(
    variant: str = "b0",
    num_classes: int = 150,
    pretrained: str | None = None,
    id2label: dict[int, str] | None = None,
    drop_path_rate: float = 0.1,
    fast_head: bool = True,
    encoder: nn.Module | None = None,
    decoder_dim: int | None = None,
    activation_checkpointing: bool = False,
) -> SegFormer:
    """The Hydra entry point: a new model, or a pretrained one adapted to ``num_classes``.

    ``encoder`` (a module Hydra builds from ``model.encoder._target_=...``) replaces MiT, as in
    configs/model/custom_encoder_example.yaml.
    """
    if encoder is not None:
        if pretrained:
            raise ConfigError(
                f"model.pretrained={pretrained!r} loads a SegFormer with its MiT encoder, but model.encoder "
                "gives another encoder: load that encoder's own weights inside it and set model.pretrained=null."
            )
        return SegFormer(
            num_classes=num_classes, id2label=id2label, fast_head=fast_head, decoder_dim=decoder_dim, encoder=encoder,
            activation_checkpointing=activation_checkpointing,
        )
    if pretrained:
        try:
            model = SegFormer.from_pretrained(
                pretrained, num_classes=num_classes, drop_path_rate=drop_path_rate, fast_head=fast_head,
                activation_checkpointing=activation_checkpointing,
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
    return SegFormer(
        variant, num_classes, id2label=id2label, drop_path_rate=drop_path_rate, fast_head=fast_head, decoder_dim=decoder_dim,
        activation_checkpointing=activation_checkpointing,
    )
