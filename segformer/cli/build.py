"""The run's parts from the config: callbacks and loggers, and what train.py asks of them."""

from __future__ import annotations


import hydra
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf



def instantiate_callbacks(cfg: DictConfig | None, has_logger: bool) -> list[Callback]:
    """Callbacks from the ``callbacks`` group; an entry set to null is left out.

    LearningRateMonitor and DeviceStatsMonitor raise without a logger, so they are dropped (with a
    warning) then.
    """
    callbacks: list[Callback] = []
    for name, node in (cfg or {}).items():
        if node is None:
            continue
        callback = hydra.utils.instantiate(node)
        if isinstance(callback, (LearningRateMonitor, DeviceStatsMonitor)) and not has_logger:
            kind = type(callback).__name__
            rank_zero_warn(f"callbacks.{name} ({kind}) needs a logger; left out because logger=null.")
            continue
        callbacks.append(callback)
    return callbacks


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Loggers from the ``logger`` group; an entry set to null is left out."""
    return [hydra.utils.instantiate(node) for node in (cfg or {}).values() if node is not None]


def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    """Record the whole resolved config with every logger (W&B's config panel, hparams.yaml)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)


def finish_loggers(loggers: list[Logger]) -> None:
    """Close the W&B run of this process (WandbLogger leaves it open, and a later WandbLogger in
    the same process, the next job of a multirun, would log into it)."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def best_checkpoint(callbacks: list[Callback], monitor: str) -> ModelCheckpoint | None:
    """The ModelCheckpoint that keeps the best ``monitor`` score, if any."""
    return next((c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor == monitor), None)


