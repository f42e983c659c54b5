"""Ship a trained model: ``python -m segformer.export ckpt_path=... format=hf|onnx output=<dir>``.

The writers (transformers folder, ONNX, model card) are in segformer/inference/export.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from segformer import cli
from segformer.errors import ConfigError
from segformer.inference.classify import export_classifier, is_classifier
from segformer.inference.export import (
    FORMAT_FILES,
    export_onnx,
    export_transformers,
    find_metrics,
    model_card,
    onnx_parity,
    training_config,
)
from segformer.inference.predictor import load_predictor

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def export(cfg: DictConfig) -> Path:
    """Write the ``cfg.format`` export of ``cfg.ckpt_path`` into ``cfg.output``; returns the folder."""
    if cfg.format not in FORMAT_FILES:
        raise ConfigError(f"format must be one of {list(FORMAT_FILES)}, got {cfg.format!r}.")
    output = Path(cfg.output).expanduser()
    existing = [name for name in FORMAT_FILES[cfg.format] if (output / name).exists()]
    if existing and not cfg.overwrite:
        raise ConfigError(
            f"output={str(output)!r} already holds {', '.join(existing)}; choose another folder or pass overwrite=true."
        )
    if is_classifier(cfg.ckpt_path):  # a train_cls.yaml classifier: its own writers
        return export_classifier(cfg.ckpt_path, output, cfg.format, opset=cfg.onnx.opset)
    metrics_path = find_metrics(cfg.ckpt_path, cfg.metrics, cfg.paths.log_dir)
    predictor = load_predictor(cfg.ckpt_path, cfg.get("data"), cfg.scale, device="cpu")
    print(predictor.describe())
    if cfg.format == "hf":
        export_transformers(predictor, output)
    else:
        path = export_onnx(predictor, output, opset=cfg.onnx.opset)
        sizes = OmegaConf.to_container(cfg.onnx.check_sizes) or []
        if sizes:
            difference, magnitude = onnx_parity(predictor.model, path, sizes)
            print(
                f"onnxruntime vs PyTorch at {sizes}: max |logit difference| {difference:.2e} (logits up to {magnitude:.1f})"
            )
            # float32 rounding grows with the logits' size: the bound is per unit of logit above 1.
            if difference > cfg.onnx.atol * max(1.0, magnitude):
                raise RuntimeError(
                    f"The ONNX model differs from PyTorch by {difference:.2e}, more than onnx.atol={cfg.onnx.atol} "
                    f"x {max(1.0, magnitude):.1f} (the largest logit)."
                )
    metrics = json.loads(metrics_path.read_text()) if metrics_path is not None else None
    card = model_card(
        predictor, cfg.format, str(cfg.ckpt_path), metrics, metrics_path, training_config(predictor, cfg.ckpt_path)
    )
    (output / "README.md").write_text(card)
    print(f"Exported ({cfg.format}) to {output}" + (f" with the scores of {metrics_path}" if metrics_path else ""))
    return output


if __name__ == "__main__":
    cli.run(export, CONFIG_DIR, "export")
