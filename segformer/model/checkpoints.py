"""Checkpoint formats: transformers, NVlabs (mmseg 0.x) and our own, as key maps plus one loader.

A silently mismatched checkpoint is the most reported SegFormer failure (weights "load" but
nothing matches), so loading counts what matched and refuses missing, unexpected or misshapen
keys. The format is detected from the keys, never from the file name.

Native keys (this package's ``SegFormer.state_dict()``) are mapped to each format's keys by
regular expressions on module paths; `attn.kv` maps to transformers' separate key and value.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from segformer.errors import CheckpointError
from segformer.model import presets
from segformer.model.mit import MIT_VARIANTS
from segformer.model.head import DECODER_DIMS

if TYPE_CHECKING:  # the model imports this module, not the other way round
    from segformer.model.segformer import SegFormer

log = logging.getLogger(__name__)

_BLOCK = r"encoder\.stages\.(?P<s>\d+)\.blocks\.(?P<b>\d+)\."

# Native module path -> transformers (on-disk names, also what transformers 5.x saves).
TRANSFORMERS_KEYS: list[tuple[str, str | tuple[str, str]]] = [
    (r"encoder\.stages\.(?P<s>\d+)\.patch_embed\.proj", "segformer.encoder.patch_embeddings.{s}.proj"),
    (r"encoder\.stages\.(?P<s>\d+)\.patch_embed\.norm", "segformer.encoder.patch_embeddings.{s}.layer_norm"),
    (_BLOCK + "norm1", "segformer.encoder.block.{s}.{b}.layer_norm_1"),
    (_BLOCK + "norm2", "segformer.encoder.block.{s}.{b}.layer_norm_2"),
    (_BLOCK + r"attn\.q", "segformer.encoder.block.{s}.{b}.attention.self.query"),
    (
        _BLOCK + r"attn\.kv",
        ("segformer.encoder.block.{s}.{b}.attention.self.key", "segformer.encoder.block.{s}.{b}.attention.self.value"),
    ),
    (_BLOCK + r"attn\.sr", "segformer.encoder.block.{s}.{b}.attention.self.sr"),
    (_BLOCK + r"attn\.sr_norm", "segformer.encoder.block.{s}.{b}.attention.self.layer_norm"),
    (_BLOCK + r"attn\.proj", "segformer.encoder.block.{s}.{b}.attention.output.dense"),
    (_BLOCK + r"mlp\.fc1", "segformer.encoder.block.{s}.{b}.mlp.dense1"),
    (_BLOCK + r"mlp\.dwconv", "segformer.encoder.block.{s}.{b}.mlp.dwconv.dwconv"),
    (_BLOCK + r"mlp\.fc2", "segformer.encoder.block.{s}.{b}.mlp.dense2"),
    (r"encoder\.stages\.(?P<s>\d+)\.norm", "segformer.encoder.layer_norm.{s}"),
    (r"decode_head\.linear_c\.(?P<c>\d+)", "decode_head.linear_c.{c}.proj"),
    (r"decode_head\.linear_fuse", "decode_head.linear_fuse"),
    (r"decode_head\.bn", "decode_head.batch_norm"),
    (r"decode_head\.classifier", "decode_head.classifier"),
    (r"classifier", "classifier"),  # MiTForImageClassification's ImageNet classifier
]

# Native module path -> transformers 5.x in-memory names (``model.state_dict()`` there; its
# save_pretrained writes the names above).
TRANSFORMERS_MODULE_KEYS: list[tuple[str, str | tuple[str, str]]] = [
    (r"encoder\.stages\.(?P<s>\d+)\.patch_embed\.proj", "segformer.stages.{s}.patch_embeddings.proj"),
    (r"encoder\.stages\.(?P<s>\d+)\.patch_embed\.norm", "segformer.stages.{s}.patch_embeddings.layer_norm"),
    (_BLOCK + "norm1", "segformer.stages.{s}.blocks.{b}.layernorm_before"),
    (_BLOCK + "norm2", "segformer.stages.{s}.blocks.{b}.layernorm_after"),
    (_BLOCK + r"attn\.q", "segformer.stages.{s}.blocks.{b}.attention.q_proj"),
    (
        _BLOCK + r"attn\.kv",
        ("segformer.stages.{s}.blocks.{b}.attention.k_proj", "segformer.stages.{s}.blocks.{b}.attention.v_proj"),
    ),
    (_BLOCK + r"attn\.sr", "segformer.stages.{s}.blocks.{b}.attention.sequence_reduction.sequence_reduction"),
    (_BLOCK + r"attn\.sr_norm", "segformer.stages.{s}.blocks.{b}.attention.sequence_reduction.layer_norm"),
    (_BLOCK + r"attn\.proj", "segformer.stages.{s}.blocks.{b}.attention.o_proj"),
    (_BLOCK + r"mlp\.fc1", "segformer.stages.{s}.blocks.{b}.mlp.fc1"),
    (_BLOCK + r"mlp\.dwconv", "segformer.stages.{s}.blocks.{b}.mlp.dwconv.dwconv"),
    (_BLOCK + r"mlp\.fc2", "segformer.stages.{s}.blocks.{b}.mlp.fc2"),
    (r"encoder\.stages\.(?P<s>\d+)\.norm", "segformer.stages.{s}.layer_norm"),
    (r"decode_head\.linear_c\.(?P<c>\d+)", "decode_head.linear_projections.{c}.proj"),
    (r"decode_head\.linear_fuse", "decode_head.linear_fuse"),
    (r"decode_head\.bn", "decode_head.batch_norm"),
    (r"decode_head\.classifier", "decode_head.classifier"),
    (r"classifier", "classifier"),
]

# Native module path -> NVlabs names; stages and head inputs count from 1 there ({s1}, {c1}).
NVLABS_KEYS: list[tuple[str, str | tuple[str, str]]] = [
    (r"encoder\.stages\.(?P<s>\d+)\.patch_embed\.proj", "backbone.patch_embed{s1}.proj"),
    (r"encoder\.stages\.(?P<s>\d+)\.patch_embed\.norm", "backbone.patch_embed{s1}.norm"),
    (_BLOCK + "norm1", "backbone.block{s1}.{b}.norm1"),
    (_BLOCK + "norm2", "backbone.block{s1}.{b}.norm2"),
    (_BLOCK + r"attn\.q", "backbone.block{s1}.{b}.attn.q"),
    (_BLOCK + r"attn\.kv", "backbone.block{s1}.{b}.attn.kv"),
    (_BLOCK + r"attn\.sr", "backbone.block{s1}.{b}.attn.sr"),
    (_BLOCK + r"attn\.sr_norm", "backbone.block{s1}.{b}.attn.norm"),
    (_BLOCK + r"attn\.proj", "backbone.block{s1}.{b}.attn.proj"),
    (_BLOCK + r"mlp\.fc1", "backbone.block{s1}.{b}.mlp.fc1"),
    (_BLOCK + r"mlp\.dwconv", "backbone.block{s1}.{b}.mlp.dwconv.dwconv"),
    (_BLOCK + r"mlp\.fc2", "backbone.block{s1}.{b}.mlp.fc2"),
    (r"encoder\.stages\.(?P<s>\d+)\.norm", "backbone.norm{s1}"),
    (r"decode_head\.linear_c\.(?P<c>\d+)", "decode_head.linear_c{c1}.proj"),
    (r"decode_head\.linear_fuse", "decode_head.linear_fuse.conv"),
    (r"decode_head\.bn", "decode_head.linear_fuse.bn"),
    (r"decode_head\.classifier", "decode_head.linear_pred"),
    (r"classifier", "backbone.head"),  # mit_b*.pth: head.* (normalize_keys adds backbone.)
]


@dataclass(frozen=True)
class Format:
    """A checkpoint layout: its key names, the weights it carries that SegFormer does not use
    (ImageNet classifiers, mmseg's unused conv_seg), and the block LayerNorm eps of the code that
    trained it (REFERENCE.md: transformers computes with 1e-5 whatever its config says; NVlabs
    used 1e-6)."""

    keys: list[tuple[str, str | tuple[str, str]]]
    ignored: re.Pattern
    norm_eps: float


FORMATS = {
    "transformers": Format(TRANSFORMERS_KEYS, re.compile(r"^classifier\."), 1e-5),
    "transformers-modules": Format(TRANSFORMERS_MODULE_KEYS, re.compile(r"^classifier\."), 1e-5),
    "nvlabs": Format(NVLABS_KEYS, re.compile(r"^(backbone\.head\.|decode_head\.conv_seg\.|auxiliary_head\.)"), 1e-6),
    # A classifier of ours (MiTForImageClassification) starts a SegFormer as nvidia/mit-b* does.
    "native": Format([], re.compile(r"^classifier\."), 1e-6),
}

# Our own key in config.json recording the eps a model was trained with.
NORM_EPS_CONFIG_KEY = "segformer_norm_eps"

_WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.")


@dataclass
class Checkpoint:
    """Weights read from disk, with what the source says about them."""

    state_dict: dict[str, Tensor]
    format: str
    origin: str
    id2label: dict[int, str] | None = None
    norm_eps: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def map_key(native_key: str, fmt: str) -> str | tuple[str, str]:
    """The key (or key/value pair of keys) that holds a native parameter in format ``fmt``."""
    module, _, param = native_key.rpartition(".")
    for pattern, template in FORMATS[fmt].keys:
        match = re.fullmatch(pattern, module)
        if match:
            fields = dict(match.groupdict())
            fields.update({k + "1": int(v) + 1 for k, v in match.groupdict().items()})
            if isinstance(template, tuple):
                return tuple(t.format(**fields) + "." + param for t in template)
            return template.format(**fields) + "." + param
    if fmt == "native":
        return native_key
    raise KeyError(f"no {fmt} name for {native_key}")


def detect_format(state_dict: dict[str, Tensor]) -> str | None:
    keys = list(state_dict)
    if any(k.startswith("encoder.stages.") for k in keys):
        return "native"
    if any(re.search(r"(^|\.)stages\.0\.patch_embeddings\.", k) for k in keys):
        return "transformers-modules"
    if any(".patch_embeddings." in "." + k for k in keys):
        return "transformers"
    if any(re.search(r"(^|\.)patch_embed1\.proj\.weight$", k) for k in keys):
        return "nvlabs"
    return None


def normalize_keys(state_dict: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    """Strip wrapper prefixes (Lightning, DDP, torch.compile) and add the format's own prefix
    where a checkpoint omits it (a bare SegformerModel, an NVlabs ImageNet backbone)."""
    out = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix) and not (fmt == "native" and key.startswith("encoder.")):
                    key, changed = key[len(prefix) :], True
        if fmt == "transformers" and key.startswith("encoder.") or fmt == "transformers-modules" and key.startswith("stages."):
            key = "segformer." + key
        if fmt == "nvlabs" and not key.startswith(("backbone.", "decode_head.", "auxiliary_head.")):
            key = "backbone." + key
        out[key] = value
    return out


def to_native(state_dict: dict[str, Tensor], fmt: str, model: SegFormer) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """The model's state dict filled from ``state_dict``: (weights, missing, unexpected)."""
    native, missing, used = {}, [], set()
    for key in model.state_dict():
        source = map_key(key, fmt)
        names = source if isinstance(source, tuple) else (source,)
        if all(n in state_dict for n in names):
            native[key] = torch.cat([state_dict[n] for n in names]) if len(names) > 1 else state_dict[names[0]]
            used.update(names)
        elif not key.endswith("num_batches_tracked"):
            missing.append(" + ".join(names))
    ignored = FORMATS[fmt].ignored
    unexpected = [k for k in state_dict if k not in used and not ignored.search(k)]
    return native, missing, unexpected


def infer_architecture(state_dict: dict[str, Tensor], fmt: str) -> dict[str, Any]:
    """Variant, decoder width and class count, read from tensor shapes."""
    hidden, depths = [], []
    for stage in range(4):
        proj = state_dict.get(_name(f"encoder.stages.{stage}.patch_embed.proj.weight", fmt))
        if proj is None:
            raise CheckpointError(f"it has no patch embedding for stage {stage + 1}")
        hidden.append(proj.shape[0])
        depth = 0
        while _name(f"encoder.stages.{stage}.blocks.{depth}.norm1.weight", fmt) in state_dict:
            depth += 1
        depths.append(depth)
    variant = next(
        (v for v, c in MIT_VARIANTS.items() if list(c.depths) == depths and list(c.hidden_sizes) == hidden), None
    )
    if variant is None:
        raise CheckpointError(
            f"its encoder (depths {depths}, hidden sizes {hidden}) is none of the MiT-B0..B5 variants"
        )
    fuse = state_dict.get(_name("decode_head.linear_fuse.weight", fmt))
    classifier = state_dict.get(_name("decode_head.classifier.weight", fmt))
    return {
        "variant": variant,
        "decoder_dim": fuse.shape[0] if fuse is not None else DECODER_DIMS[variant],
        "num_classes": classifier.shape[0] if classifier is not None else None,
    }


def _name(native_key: str, fmt: str) -> str:
    source = map_key(native_key, fmt)
    return source[0] if isinstance(source, tuple) else source


def read_checkpoint(source: str | os.PathLike) -> Checkpoint:
    """Read weights and metadata from a path (a file, a transformers folder, a train.py run
    folder), a Hugging Face hub id or a preset name (``segformer_b2_ade20k_512``: the hub id in
    segformer/model/presets.py)."""
    path = Path(source).expanduser()
    if not path.exists():
        hub_id = presets.resolve_source(str(source))
        if _looks_like_hub_id(hub_id):
            try:
                path = _download_from_hub(hub_id)
            except CheckpointError as error:
                if hub_id == str(source):
                    raise
                raise CheckpointError(f"Preset {str(source)!r} is the hub model {hub_id}. {error}") from None
        else:
            matches = presets.close_matches(str(source))
            hint = f" Close preset names: {', '.join(matches)}." if matches else ""
            raise CheckpointError(
                f"Checkpoint {str(source)!r} does not exist: give a transformers folder, an NVlabs .pth, "
                "one of our .ckpt files, a Hugging Face hub id such as "
                "nvidia/segformer-b0-finetuned-ade-512-512, or a preset name (python -m segformer.presets "
                f"lists them).{hint}"
            )
    if path.is_dir() and not (path / "config.json").exists():
        # A train.py run folder: its newest checkpoint, as ckpt_path=<run folder> resumes
        # (imported here: the training side needs Lightning, loading a model does not).
        from segformer.training.resume import newest_in_run_folder

        path = newest_in_run_folder(path) or path
    if path.is_dir():
        return _read_transformers_dir(path, origin=str(source))
    return _read_file(path)


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None and not source.endswith((".pth", ".pt", ".ckpt", ".bin", ".safetensors"))


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "pytorch_model.bin"])
    except Exception as error:  # noqa: BLE001 - every hub failure becomes one clear message
        raise CheckpointError(
            f"No local path {repo_id!r} exists, and fetching it as a model id from the Hugging Face hub "
            f"failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no details'}). Offline, or without access, "
            f"download it elsewhere (huggingface-cli download {repo_id} --local-dir DIR) and pass the "
            "folder's path instead."
        ) from None
    return Path(folder)


def _read_transformers_dir(path: Path, origin: str) -> Checkpoint:
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"Folder {str(path)!r} is not a transformers model folder: it has no config.json "
            "(expected config.json + model.safetensors or pytorch_model.bin), nor a train.py run "
            "folder (checkpoints/last.ckpt)."
        )
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{str(config_path)!r} is not valid JSON ({error}).") from None
    if config.get("model_type") != "segformer":
        raise CheckpointError(
            f"{str(config_path)!r} describes a {config.get('model_type')!r} model, not a SegFormer "
            "(model_type 'segformer')."
        )
    weights = next((path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"Folder {str(path)!r} has a config.json but no weights: expected model.safetensors or "
            "pytorch_model.bin."
        )
    checkpoint = _read_file(weights)
    id2label = config.get("id2label")
    checkpoint.id2label = {int(k): v for k, v in id2label.items()} if id2label else None
    checkpoint.norm_eps = config.get(NORM_EPS_CONFIG_KEY, FORMATS["transformers"].norm_eps)
    checkpoint.origin = origin
    return checkpoint


def _read_file(path: Path) -> Checkpoint:
    try:
        if path.suffix == ".safetensors" or _is_safetensors(path):
            from safetensors.torch import load_file

            raw: Any = load_file(str(path))
        else:
            raw = _torch_load(path)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - truncated or foreign files fail in many ways
        raise CheckpointError(
            f"Could not read checkpoint {str(path)!r}: {type(error).__name__}: {error}. The file may be "
            "truncated (an interrupted download or save) or not a PyTorch/safetensors checkpoint."
        ) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"Checkpoint {str(path)!r} holds a {type(raw).__name__}, not a state dict.")
    meta = raw.get("segformer") if isinstance(raw.get("segformer"), dict) else {}
    # A train.py checkpoint with callbacks=[default,ema] (Lightning's WeightAveraging) holds the
    # averaged weights as state_dict, the raw training ones as current_model_state: we take the
    # averaged, which validation scored.
    state_dict = raw.get("state_dict", raw)
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise CheckpointError(f"Checkpoint {str(path)!r} has no state dict of tensors.")
    fmt = detect_format(state_dict) or detect_format(normalize_keys(state_dict, "native"))
    if fmt is None:
        sample = ", ".join(list(state_dict)[:5])
        raise CheckpointError(
            f"Checkpoint {str(path)!r} is not a SegFormer checkpoint: none of its keys (e.g. {sample}) "
            "belong to the transformers, NVlabs or segformer formats."
        )
    id2label = meta.get("id2label")
    return Checkpoint(
        state_dict=normalize_keys(state_dict, fmt),
        format=fmt,
        origin=str(path),
        id2label={int(k): v for k, v in id2label.items()} if id2label else None,
        norm_eps=meta.get("norm_eps", FORMATS[fmt].norm_eps),
        extra=meta,
    )


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size


def _mmcv_metadata_globals() -> list[tuple[Any, str]]:
    """The only non-torch globals a checkpoint may name, with the names pickles give them: the
    numpy scalars, arrays and dtypes that mmcv (NVlabs' training code) keeps in ``meta`` beside
    the weights. Plain data; numpy 1.x pickled its constructors under ``numpy.core``."""
    import numpy as np

    dtypes = [np.dtype, np.ndarray, *{type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"}]
    allowed = [(cls, f"{cls.__module__}.{cls.__qualname__}") for cls in dtypes]
    for name in ("scalar", "_reconstruct"):
        function = getattr(np._core.multiarray, name)
        allowed += [(function, f"numpy._core.multiarray.{name}"), (function, f"numpy.core.multiarray.{name}")]
    return allowed


def _torch_load(path: Path) -> Any:
    """``torch.load`` that never runs code from the file: tensors, plain containers and the numpy
    metadata of mmcv checkpoints load; anything else is refused, naming what the file asks for."""
    allowed = _mmcv_metadata_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # noqa: BLE001 - an old (non-zip) torch.save file or a bare pickle
            names = []
        unsafe = sorted(set(names) - {name for _, name in allowed})
        if not unsafe:  # garbage, or a pickle the weights-only reader cannot parse at all
            raise CheckpointError(
                f"Could not read checkpoint {str(path)!r}: it is truncated or damaged (an interrupted download "
                "or save), not a PyTorch/safetensors checkpoint, or a pickle of Python objects whose "
                "loading could run code from the file (refused)."
            ) from None
        raise CheckpointError(
            f"Refusing to load checkpoint {str(path)!r}: besides tensors and plain containers it holds "
            f"Python objects ({', '.join(unsafe[:5])}{', ...' if len(unsafe) > 5 else ''}) whose loading "
            "could run code from the file. Only weights, plain containers and numpy metadata are read. "
            "If you trust the file, re-save its state dict alone (torch.save(checkpoint['state_dict'], "
            "'weights.pth'))."
        ) from None


def preview(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")


def export_state_dict(model: SegFormer, fmt: str) -> dict[str, Tensor]:
    """The model's weights under another format's key names."""
    out = {}
    for key, value in model.state_dict().items():
        target = map_key(key, fmt)
        if isinstance(target, tuple):
            for name, part in zip(target, value.chunk(len(target))):
                out[name] = part.contiguous()
        else:
            out[target] = value.contiguous()
    return out


def mit_config(model: Any, architecture: str, classifier_dropout: float) -> dict[str, Any]:
    """The config.json keys transformers' Segformer classes share: the MiT encoder and the labels."""
    mit = model.encoder.config
    return {
        "architectures": [architecture],
        "model_type": "segformer",
        "num_channels": 3,
        "num_encoder_blocks": 4,
        "depths": list(mit.depths),
        "hidden_sizes": list(mit.hidden_sizes),
        "num_attention_heads": list(mit.num_heads),
        "sr_ratios": list(mit.sr_ratios),
        "patch_sizes": list(mit.patch_sizes),
        "strides": list(mit.strides),
        "mlp_ratios": [mit.mlp_ratio] * 4,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "classifier_dropout_prob": classifier_dropout,
        "drop_path_rate": 0.1,
        "initializer_range": 0.02,
        "layer_norm_eps": model.norm_eps,
        NORM_EPS_CONFIG_KEY: model.norm_eps,
        "reshape_last_stage": True,
        "id2label": {str(k): v for k, v in model.id2label.items()},
        "label2id": {v: k for k, v in model.id2label.items()},
    }


def transformers_config(model: SegFormer) -> dict[str, Any]:
    """A config.json for transformers' SegformerForSemanticSegmentation."""
    return {
        **mit_config(model, "SegformerForSemanticSegmentation", model.decode_head.dropout.p),
        "decoder_hidden_size": model.decode_head.bn.num_features,
        "semantic_loss_ignore_index": 255,
    }


def save_transformers(model: SegFormer, directory: str | os.PathLike, config: dict[str, Any] | None = None) -> None:
    """Weights under transformers' names + ``config`` (default: the segmentation model's config.json)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model.norm_eps != FORMATS["transformers"].norm_eps:
        log.info(
            "This model uses LayerNorm eps %g; transformers computes with 1e-5 whatever its config "
            "says, so its logits will differ slightly from ours (segformer reads the eps back exactly).",
            model.norm_eps,
        )
    tensors = {k: v.detach().cpu() for k, v in export_state_dict(model, "transformers").items()}
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config or transformers_config(model), indent=2) + "\n")
