"""predict.py and export for image classifiers (MiTForImageClassification checkpoints).

A checkpoint is a classifier when our .ckpt says so (``task: classification``) or a transformers
folder is a SegformerForImageClassification. Images are preprocessed as validation did
(resize + centre crop, the run's crop size and ratio, stored in the checkpoint).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from segformer.data.classification import eval_transform
from segformer.data.datasets import read_image
from segformer.errors import DataError
from segformer.model import checkpoints
from segformer.model.classifier import TASK, MiTForImageClassification, top_k

# ImageNet evaluation (DeiT): 224 crop of the short side resized to 256.
DEFAULT_PREPROCESSING = {"crop_size": 224, "crop_ratio": 0.875, "mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}


def is_classifier(source: str | os.PathLike) -> bool:
    """Whether ``source`` (a path) holds an image classifier rather than a segmentation model."""
    path = Path(source).expanduser()
    if path.is_dir():
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return False
        return "SegformerForImageClassification" in (config.get("architectures") or [])
    if path.is_file() and path.suffix == ".ckpt":
        return checkpoints.read_checkpoint(path).extra.get("task") == TASK
    return False


def preprocessing_of(source: str | os.PathLike) -> dict[str, Any]:
    path = Path(source).expanduser()
    extra = checkpoints.read_checkpoint(path).extra if path.is_file() else {}
    return {**DEFAULT_PREPROCESSING, **extra.get("preprocessing", {})}


def classify_images(
    source: str | os.PathLike, images: Sequence[Path], output: str | os.PathLike, k: int = 5, device: str | None = None
) -> list[tuple[Path, str]]:
    """Print the top-k classes of each image and write them to <output>/predictions.csv; returns
    the images that could not be read, with why (the others are still written)."""
    model = MiTForImageClassification.from_pretrained(source).eval().to(device or "cpu")
    settings = preprocessing_of(source)
    transform = eval_transform(settings["crop_size"], settings["crop_ratio"], settings["mean"], settings["std"])
    output = Path(output).expanduser()
    output.mkdir(parents=True, exist_ok=True)
    failed: list[tuple[Path, str]] = []
    rows = []
    for path in images:
        try:
            pixels = transform(image=read_image(path))["image"][None].to(device or "cpu")
        except DataError as error:
            failed.append((path, str(error)))
            continue
        with torch.no_grad():
            best = top_k(model(pixels), model.id2label, k)[0]
        print(f"{path}: " + ", ".join(f"{label} {prob:.3f}" for label, prob in best))
        rows.append([str(path), *[value for pair in best for value in (pair[0], f"{pair[1]:.6f}")]])
    with open(output / "predictions.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", *[f"{what}_{i + 1}" for i in range(k) for what in ("label", "prob")]])
        writer.writerows(rows)
    return failed


def export_classifier(source: str | os.PathLike, output: str | os.PathLike, fmt: str = "hf", opset: int = 17) -> Path:
    """``hf``: a SegformerForImageClassification folder (config.json + model.safetensors);
    ``onnx``: <output>/model.onnx, pixel_values of any batch and size -> logits. Returns the folder."""
    model = MiTForImageClassification.from_pretrained(source).eval()
    output = Path(output).expanduser()
    if fmt == "hf":
        model.save_pretrained(output)
        return output
    output.mkdir(parents=True, exist_ok=True)
    size = preprocessing_of(source)["crop_size"]
    torch.onnx.export(
        model, (torch.randn(1, 3, size, size),), str(output / "model.onnx"), input_names=["pixel_values"], output_names=["logits"],
        dynamic_axes={"pixel_values": {0: "batch", 2: "height", 3: "width"}, "logits": {0: "batch"}}, opset_version=opset,
        dynamo=False,
    )
    return output


def evaluate_classifier(cfg: Any, datamodule: Any) -> float:
    """eval.py for a classifier: top-1 / top-5 on the data module's test split, written to
    <run dir>/metrics.json; returns the top-1 accuracy."""
    import hydra

    from segformer.errors import CheckpointError
    from segformer.training.classification import ClassificationModule

    model = MiTForImageClassification.from_pretrained(cfg.ckpt_path)
    if model.num_classes != datamodule.num_classes:
        raise CheckpointError(
            f"Checkpoint {cfg.ckpt_path!r} predicts {model.num_classes} classes but the dataset has "
            f"{datamodule.num_classes}: evaluate it on the dataset it was trained for."
        )
    module = ClassificationModule(model)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.test(module, dataloaders=datamodule.test_dataloader(), verbose=False)
    results = {name: float(value) for name, value in module.test_results.items()}
    if trainer.is_global_zero:
        output = Path(cfg.paths.output_dir)
        output.mkdir(parents=True, exist_ok=True)
        report = {**results, "checkpoint": str(cfg.ckpt_path), "split": datamodule.splits["test"]}
        (output / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"top-1 {results['top1']:.4f}  top-5 {results['top5']:.4f}")
        print(f"Metrics: {output / 'metrics.json'}")
    return results["top1"]
