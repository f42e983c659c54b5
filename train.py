"""Train SegFormer: ``python train.py [group=choice ...] [key=value ...]`` (configs/train.yaml).

With no arguments it trains B0 on the bundled sample scenes; ``model=b2 data=ade20k`` or
``experiment=ade20k_b2`` is the paper's setting. Everything a run writes goes to its own folder
(logs/train/runs/<date_time>/): the config, checkpoints/last.ckpt and best.ckpt, csv/metrics.csv.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig

from segformer import cli
from segformer.training import resume
from segformer.training.batch import BatchPlan, configure_batch
from segformer.training.module import SegFormerModule

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def train(cfg: DictConfig) -> float | None:
    """Fit the model the config describes; returns the best val/mIoU (the sweep objective)."""
    L.seed_everything(cfg.seed, workers=True)
    cli.fit_intervals_to_run(cfg)
    cli.warn_about_recipe(cfg)
    # The recipe's global batch over this run's devices: data.batch_size, accumulation, SyncBN.
    configure_batch(cfg)

    # Plain lists and dicts: checkpoints keep the data module's hyperparameters and must load
    # with torch.load(weights_only=True).
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    # Reading the class names checks the dataset on disk (a wrong data.root is named) before
    # building the model, which may download a pretrained encoder.
    classes = datamodule.classes
    model = hydra.utils.instantiate(cfg.model)
    model.id2label = dict(enumerate(classes))
    if "module" in cfg:  # another task's LightningModule (train_cls.yaml: classification)
        module = hydra.utils.instantiate(cfg.module)(
            model, optimizer=hydra.utils.instantiate(cfg.optimizer), scheduler=hydra.utils.instantiate(cfg.scheduler)
        )
    else:
        module = SegFormerModule(
            model,
            optimizer=hydra.utils.instantiate(cfg.optimizer),
            scheduler=hydra.utils.instantiate(cfg.scheduler),
            loss=hydra.utils.instantiate(cfg.loss),
            inference=datamodule.inference,
            ignore_index=datamodule.ignore_index,
            compile=cfg.compile,
            max_consecutive_nonfinite=cfg.max_consecutive_nonfinite,
        )
    loggers = cli.instantiate_loggers(cfg.get("logger"))
    callbacks = cli.instantiate_callbacks(cfg.get("callbacks"), has_logger=bool(loggers))
    # Checkpoints are written to a temporary file and renamed: a kill while saving keeps the last one.
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=[resume.AtomicCheckpointIO()]
    )
    rank_zero_info(str(BatchPlan.of(trainer, datamodule.batch_size, cfg.get("global_batch_size"))))

    # Without ckpt_path, a run folder that already holds checkpoints (a re-run with the same
    # hydra.run.dir, a requeued SLURM job) resumes; ckpt_path=last says so explicitly.
    ckpt_path = resume.resume_path(cfg.ckpt_path, trainer, callbacks, cfg.paths.output_dir)
    if ckpt_path is not None:
        resume.check_resumable(ckpt_path, module)
    cli.log_config(loggers, cfg)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        # The next job of a multirun must not log into this job's W&B run.
        cli.finish_loggers(loggers)

    objective = cfg.get("objective", "val/mIoU")
    best = cli.best_checkpoint(callbacks, objective)
    score = best.best_model_score if best is not None else trainer.callback_metrics.get(objective)
    if trainer.is_global_zero:
        where = f" ({best.best_model_path})" if best is not None and best.best_model_path else ""
        print(f"Best {objective}: {float(score):.4f}{where}" if score is not None else "No validation ran.")
        print(f"Run folder: {cfg.paths.output_dir}")
    return float(score) if score is not None else None


if __name__ == "__main__":
    cli.run(train, CONFIG_DIR, "train")
