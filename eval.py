"""Evaluate a checkpoint the way the paper did: ``python eval.py ckpt_path=... [data=...]``.

ckpt_path takes anything ``SegFormer.from_pretrained`` takes (our .ckpt, a transformers folder or
hub id, an NVlabs .pth). The dataset's evaluation mode applies (data.inference, overridable);
the scores are accumulated over the whole split at the labels' original resolution. Writes
<run dir>/metrics.json, <run dir>/report.md (scores, charts, prediction panels) and, with
save_predictions=true, <run dir>/predictions/<image>.png.
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from lightning.pytorch.callbacks import RichProgressBar
from omegaconf import DictConfig

from segformer import SegFormer, cli
from segformer.errors import CheckpointError
from segformer.inference.classify import evaluate_classifier, is_classifier
from segformer.inference.metrics import format_table, results_to_json
from segformer.inference.report import ReportSamples, describe_dataset, write_report
from segformer.training.module import SegFormerModule
from segformer.inference.writers import PredictionWriter

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def evaluate(cfg: DictConfig) -> float:
    """Score ``cfg.ckpt_path`` on the data module's test split; returns the mIoU."""
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    # Only the evaluated split is read, so a dataset without its train split evaluates too.
    datamodule.setup("test")
    if is_classifier(cfg.ckpt_path):  # a train_cls.yaml classifier: top-1 / top-5
        return evaluate_classifier(cfg, datamodule)
    model = SegFormer.from_pretrained(cfg.ckpt_path)
    if model.num_classes != datamodule.num_classes:
        raise CheckpointError(
            f"Checkpoint {cfg.ckpt_path!r} predicts {model.num_classes} classes but the dataset has "
            f"{datamodule.num_classes}: evaluate it on the dataset it was trained for."
        )
    model.id2label = dict(enumerate(datamodule.classes))
    inference = datamodule.inference
    module = SegFormerModule(model, inference=inference, ignore_index=datamodule.ignore_index, compile=cfg.compile)

    output_dir = Path(cfg.paths.output_dir)
    split = datamodule.dataset(datamodule.splits["test"])
    # The first test images with their labels and predictions, for the report's panels.
    examples = ReportSamples(cfg.report.num_images, datamodule.hparams["mean"], datamodule.hparams["std"])
    callbacks = [RichProgressBar(), examples]
    if cfg.save_predictions:
        callbacks.append(PredictionWriter(output_dir / "predictions", split))
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False, enable_model_summary=False
    )
    trainer.test(module, dataloaders=datamodule.test_dataloader(), verbose=False)

    results = module.test_results
    if trainer.is_global_zero:
        report = {
            **results_to_json(results, module.class_names),
            "checkpoint": str(cfg.ckpt_path),
            "split": datamodule.splits["test"],
            "inference": inference,
        }
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
        write_report(
            output_dir,
            results,
            module.class_names,
            split.palette,
            checkpoint=str(cfg.ckpt_path),
            dataset=describe_dataset(split, datamodule.root),
            inference=inference,
            samples=examples.samples,
            alpha=cfg.report.alpha,
        )
        print(format_table(results, module.class_names))
        print(f"Metrics: {output_dir / 'metrics.json'}")
        print(f"Report: {output_dir / 'report.md'}")
    return float(results["mIoU"])


if __name__ == "__main__":
    cli.run(evaluate, CONFIG_DIR, "eval")
