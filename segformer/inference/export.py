"""Ship a trained model (``python -m segformer.export``, segformer/export.py, is the command).

``hf`` writes a transformers folder (config.json, model.safetensors, preprocessor_config.json)
that ``pipeline("image-segmentation", model=dir)`` runs; ``onnx`` writes model.onnx (dynamic
batch, height and width; pixel_values -> logits at 1/4 resolution) beside the same two configs,
and checks it against PyTorch under onnxruntime. Both get a model card (README.md): variant,
dataset, classes, the evaluation scores of eval.py's metrics.json and the training config.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn

from segformer.errors import ConfigError
from segformer.model.checkpoints import FORMATS, transformers_config
from segformer.inference.predictor import Predictor
from segformer.inference.processor import SegFormerImageProcessor

FORMAT_FILES = {
    "hf": ("config.json", "model.safetensors", "preprocessor_config.json", "README.md"),
    "onnx": ("model.onnx", "config.json", "preprocessor_config.json", "README.md"),
}


def image_processor(predictor: Predictor) -> SegFormerImageProcessor:
    """The image processor of our test transform, as written to preprocessor_config.json.

    shortest_edge + longest_edge is the same keep-ratio rule as our resize to fit (long, short);
    transformers' mean and std apply after rescaling to 0-1, hence the division by 255.
    """
    p = predictor.preprocessing
    return SegFormerImageProcessor.from_test_settings(p.scale, p.size_divisor, p.mean, p.std, predictor.reduces_labels)


def _write_configs(predictor: Predictor, output: Path) -> None:
    image_processor(predictor).save_pretrained(output)


def export_transformers(predictor: Predictor, output: Path) -> None:
    """config.json + model.safetensors + preprocessor_config.json for transformers."""
    predictor.model.save_pretrained(output)
    _write_configs(predictor, output)


class _Logits(nn.Module):
    """The network without SegFormer.forward's Python input checks, which tracing cannot keep."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model.decode_head(self.model.features(pixel_values))


def export_onnx(predictor: Predictor, output: Path, opset: int = 17) -> Path:
    """model.onnx (input ``pixel_values`` (B, 3, H, W), output ``logits`` (B, K, ceil(H/4),
    ceil(W/4)), all of B, H, W dynamic) + config.json + preprocessor_config.json.

    The TorchScript exporter (``dynamo=False``) is used: on this model it gives the same graph
    quality as the torch.export one without its onnxscript dependency, and exports in seconds
    instead of a minute. Inputs need at least 29 px a side, as in PyTorch.
    """
    if importlib.util.find_spec("onnx") is None:
        raise ConfigError("format=onnx needs the onnx package: pip install onnx onnxruntime (the export extra).")
    model = _Logits(predictor.model).eval().cpu()
    output.mkdir(parents=True, exist_ok=True)
    path = output / "model.onnx"
    example = torch.zeros(1, 3, 64, 64)
    with warnings.catch_warnings(), torch.no_grad():
        # The legacy-exporter notice, and tracer notes on shape arithmetic that dynamic axes cover.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=opset,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_axes={
                "pixel_values": {0: "batch", 2: "height", 3: "width"},
                "logits": {0: "batch", 2: "logits_height", 3: "logits_width"},
            },
        )
    (output / "config.json").write_text(json.dumps(transformers_config(predictor.model), indent=2) + "\n")
    _write_configs(predictor, output)
    return path


def onnx_parity(model: nn.Module, path: Path, sizes: Sequence[Sequence[int]]) -> tuple[float, float]:
    """(largest |onnxruntime - PyTorch| logit, largest |PyTorch| logit) over random inputs of each
    (height, width) in ``sizes`` (batch 2 for the first size, 1 for the others, so the batch axis
    is exercised)."""
    try:
        import onnxruntime
    except ImportError:
        raise ConfigError(
            "Checking the ONNX model needs onnxruntime: pip install onnxruntime (the export extra), "
            "or skip the check with onnx.check_sizes=[]."
        ) from None
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    model = model.eval().cpu()
    difference = magnitude = 0.0
    for i, (height, width) in enumerate(sizes):
        pixel_values = torch.randn(2 if i == 0 else 1, 3, int(height), int(width), generator=generator)
        with torch.no_grad():
            expected = model(pixel_values).numpy()
        (actual,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
        if actual.shape != expected.shape:
            raise RuntimeError(f"ONNX logits have shape {actual.shape}, PyTorch's {expected.shape}.")
        difference = max(difference, float(np.abs(actual - expected).max()))
        magnitude = max(magnitude, float(np.abs(expected).max()))
    return difference, magnitude


def find_metrics(
    ckpt_path: str | os.PathLike, metrics: str | os.PathLike | None, log_dir: str | os.PathLike
) -> Path | None:
    """eval.py's metrics.json for this checkpoint: ``metrics`` when given, else one beside the
    checkpoint or in its training run, else the newest eval run under ``log_dir`` that scored it."""
    if metrics is not None:
        path = Path(metrics).expanduser()
        if not path.is_file():
            raise ConfigError(f"metrics={str(metrics)!r} is not a file: give the metrics.json that eval.py wrote.")
        return path
    checkpoint = Path(ckpt_path).expanduser()
    nearby = [checkpoint.parent / "metrics.json", checkpoint.parent.parent / "metrics.json"]
    if checkpoint.is_dir():
        nearby.insert(0, checkpoint / "metrics.json")
    found = [p for p in nearby if p.is_file()]
    if found:
        return found[0]
    scored = [p for p in Path(log_dir).expanduser().glob("eval/*/*/metrics.json") if _scores(p, checkpoint, ckpt_path)]
    return max(scored, key=lambda p: p.stat().st_mtime, default=None)


def _scores(metrics: Path, checkpoint: Path, ckpt_path: str | os.PathLike) -> bool:
    try:
        source = json.loads(metrics.read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return False
    if source is None:
        return False
    return source == str(ckpt_path) or (
        checkpoint.exists() and Path(source).expanduser().resolve() == checkpoint.resolve()
    )


def training_config(predictor: Predictor, ckpt_path: str | os.PathLike) -> str | None:
    """The training run's config.yaml, else a Lightning checkpoint's hyper-parameters, as YAML."""
    if predictor.run_config is not None:
        return OmegaConf.to_yaml(predictor.run_config)
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        return None
    try:
        hyper_parameters = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("hyper_parameters")
    except Exception:  # noqa: BLE001 - not a Lightning checkpoint: there is nothing to show
        return None
    return OmegaConf.to_yaml(OmegaConf.create(dict(hyper_parameters))) if hyper_parameters else None


def _percent(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def model_card(
    predictor: Predictor,
    fmt: str,
    source: str,
    metrics: Mapping[str, Any] | None = None,
    metrics_path: Path | None = None,
    config_yaml: str | None = None,
) -> str:
    """README.md of an exported folder."""
    model, p = predictor.model, predictor.preprocessing
    variant = model.variant.upper()
    dataset = predictor.dataset_name
    title = f"SegFormer-{variant}" + (f" trained on {dataset}" if dataset else "")
    parameters = sum(t.numel() for t in model.parameters())
    mean, std = ", ".join(f"{v:g}" for v in p.mean), ", ".join(f"{v:g}" for v in p.std)
    divisor = f", both sides then rounded up to a multiple of {p.size_divisor}" if p.size_divisor else ""
    lines = [
        "---",
        *(["library_name: transformers"] if fmt == "hf" else []),
        "pipeline_tag: image-segmentation",
        "tags:",
        "- segformer",
        "- semantic-segmentation",
        *(["- onnx"] if fmt == "onnx" else []),
        "---",
        "",
        f"# {title}",
        "",
        "Semantic segmentation with SegFormer (Mix Transformer encoder + all-MLP decode head, Xie et al., "
        f"NeurIPS 2021), exported from `{source}` with `python -m segformer.export format={fmt}`.",
        "",
        "| | |",
        "|---|---|",
        f"| Variant | SegFormer-{variant} (MiT-{variant} encoder), {parameters / 1e6:.1f}M parameters |",
        f"| Dataset | {dataset or 'not recorded'} |",
        f"| Classes | {model.num_classes} |",
        f"| Input | RGB resized keeping its aspect ratio to fit {p.scale[0]}x{p.scale[1]} (long x short side){divisor}; "
        f"(pixel - mean) / std on 0-255 values, mean ({mean}), std ({std}) |",
        "| Output | class logits at 1/4 of the input resolution; upsample bilinearly, then take the argmax |",
        "",
        "## Evaluation",
        "",
    ]
    per_class: Mapping[str, Any] = {}
    if metrics:
        per_class = metrics.get("per_class") or {}
        inference = metrics.get("inference") or {}
        how = ", ".join(f"{k} {v}" for k, v in inference.items()) if inference else "not recorded"
        lines += [
            f"Scores of `eval.py` on the {metrics.get('split', 'evaluation')} split ({how}), from `{metrics_path}`:",
            "",
            "| mIoU (%) | mAcc (%) | aAcc (%) |",
            "|---|---|---|",
            f"| {_percent(metrics.get('mIoU'))} | {_percent(metrics.get('mAcc'))} | {_percent(metrics.get('aAcc'))} |",
        ]
    else:
        lines.append(
            "No evaluation results were found. Run `python eval.py ckpt_path=...` and export again "
            "(with `metrics=<eval run>/metrics.json` if it is not found by itself)."
        )
    lines += ["", "## Classes", ""]
    if per_class:
        lines += ["| id | class | IoU (%) |", "|---|---|---|"]
        lines += [
            f"| {k} | {name} | {_percent((per_class.get(name) or {}).get('IoU'))} |"
            for k, name in enumerate(predictor.class_names)
        ]
    else:
        lines += ["| id | class |", "|---|---|"] + [f"| {k} | {name} |" for k, name in enumerate(predictor.class_names)]
    lines += ["", "## Use", ""] + (_hf_usage(predictor) if fmt == "hf" else _onnx_usage(predictor))
    lines += ["", "## Training configuration", ""]
    lines += ["```yaml", config_yaml.rstrip(), "```"] if config_yaml else ["Not recorded with this checkpoint."]
    return "\n".join(lines) + "\n"


def _differences(predictor: Predictor) -> list[str]:
    p, i = predictor.preprocessing, predictor.inference
    notes = [
        "- The processor resizes with the same keep-ratio rule (short side to "
        f"{p.scale[1]} unless the long side would pass {p.scale[0]}), but rounds the long side down where "
        "segformer rounds to the nearest pixel, and resizes with an antialiased bilinear filter (PIL or torchvision) where "
        "segformer uses OpenCV's bilinear one.",
        "- The pipeline upsamples the logits once to the image size; segformer upsamples them to the "
        "resized input and then to the image size. Both agree exactly for images that already have "
        "their test size.",
    ]
    if p.size_divisor:
        notes.append(
            f"- The processor cannot round sides up to a multiple of {p.size_divisor} as segformer's test transform does."
        )
    if i.mode == "slide" or i.scales != (1.0,) or i.flip:
        notes.append("- The pipeline runs the whole image once: sliding windows, multi-scale and flip are not applied.")
    if predictor.model.norm_eps != FORMATS["transformers"].norm_eps:
        notes.append(
            f"- This model was trained with LayerNorm eps {predictor.model.norm_eps:g}; transformers computes with "
            "1e-5, which moves logits very slightly."
        )
    if predictor.reduces_labels:
        notes.append("- Labels are training ids 0..K-1: the dataset's own ids are these + 1 (0 = unlabelled).")
    return notes


def _hf_usage(predictor: Predictor) -> list[str]:
    return [
        "```python",
        "from transformers import pipeline",
        "",
        'segment = pipeline("image-segmentation", model="path/to/this/folder")',
        'masks = segment("photo.jpg")  # [{"label": class name, "mask": PIL image}, ...]',
        "```",
        "",
        "The keep-ratio `size` of preprocessor_config.json needs transformers 5 or later. Differences "
        "from segformer's own `predict.py`:",
        "",
        *_differences(predictor),
    ]


def _onnx_usage(predictor: Predictor) -> list[str]:
    p = predictor.preprocessing
    return [
        "`model.onnx` takes `pixel_values` (batch, 3, height, width) float32 of at least 29x29 pixels and "
        "returns `logits` (batch, classes, ceil(height/4), ceil(width/4)); batch, height and width are dynamic.",
        "",
        "```python",
        "import numpy as np, onnxruntime",
        "from PIL import Image",
        "",
        'image = Image.open("photo.jpg").convert("RGB")',
        f"factor = min({p.scale[0]} / max(image.size), {p.scale[1]} / min(image.size))",
        "resized = image.resize((round(image.width * factor), round(image.height * factor)), Image.BILINEAR)",
        f"x = (np.asarray(resized, np.float32) - np.array([{', '.join(f'{v:g}' for v in p.mean)}])) "
        f"/ np.array([{', '.join(f'{v:g}' for v in p.std)}])",
        'session = onnxruntime.InferenceSession("model.onnx")',
        'logits = session.run(["logits"], {"pixel_values": x.transpose(2, 0, 1)[None].astype(np.float32)})[0]',
        "```",
        "",
        "Upsample the logits bilinearly to the image size before the argmax. config.json holds the "
        "class names (id2label) and preprocessor_config.json the preprocessing for transformers-style "
        "tools.",
    ]
