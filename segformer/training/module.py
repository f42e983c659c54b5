"""The LightningModule: SegFormer trained with the paper's loss, optimizer and schedule.

Validation and testing predict with ``segformer.inference`` in the dataset's evaluation mode,
at the labels' original resolution, and accumulate one confusion matrix over the whole split
(``segformer.inference.metrics``), summed across DDP ranks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from segformer.errors import ConfigError
from segformer.inference import InferenceConfig, predict_batch
from segformer.inference.metrics import SegmentationMetrics
from segformer.model import SegFormer
from segformer.training.guards import NonFiniteLossGuard, SeededSteps
from segformer.training.losses import CrossEntropyLoss, Loss, loss_terms

SCORES = ("mIoU", "mAcc", "aAcc")


class SegFormerModule(L.LightningModule):
    """Trains and evaluates a ``SegFormer`` (kept as ``self.model``, so weights are ``model.*``).

    Args:
        model: the network; its ``id2label`` names the classes in metrics and checkpoints.
        optimizer: ``optimizer(model) -> Optimizer`` (configs/optimizer); needed for training only.
        scheduler: ``scheduler(optimizer, total_steps) -> LRScheduler``, stepped after every
            optimizer step (configs/scheduler); None keeps the learning rate constant.
        loss: ``loss(logits, labels) -> scalar`` (configs/loss; ``segformer.training.losses``),
            given the model's logits and the full-size labels; default the paper's cross-entropy.
            Its ``setup(num_classes, datamodule)``, if any, runs when training starts.
        inference: how validation and test images are predicted (mode whole|slide, crop_size,
            stride, scales, flip; see ``segformer.inference``): the data module's settings.
        ignore_index: label value without a class, left out of the loss and the metrics.
        compile: ``torch.compile`` the model when training or evaluation starts.
        max_consecutive_nonfinite: a step with a NaN/inf loss is skipped (counted as
            ``train/nonfinite_steps``); more than this many in a row stop training with an error.

    The module brings two callbacks of ``segformer.training.guards`` to any Trainer it is fitted
    with: the non-finite loss guard, and the per-step seeding of dropout and drop-path by (run
    seed, rank, batch number), so a resumed run draws what the interrupted one would have drawn.
    """

    # Read by Lightning's ThroughputMonitor (configs/callbacks/dashboard.yaml): images per second
    # are counted, FLOPs are not measured.
    flops_per_batch: int | None = None

    def __init__(
        self,
        model: SegFormer,
        optimizer: Callable[[torch.nn.Module], Optimizer] | None = None,
        scheduler: Callable[[Optimizer, int], LRScheduler] | None = None,
        loss: Loss | None = None,
        inference: Mapping[str, Any] | None = None,
        ignore_index: int = 255,
        compile: bool = False,
        max_consecutive_nonfinite: int = 5,
    ) -> None:
        super().__init__()
        self.model = model
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.loss = loss if loss is not None else CrossEntropyLoss(ignore_index=ignore_index)
        self.inference = InferenceConfig.from_mapping(inference)
        self.ignore_index = ignore_index
        self.compile_model = compile
        self.nonfinite_guard = NonFiniteLossGuard(max_consecutive_nonfinite)
        self.seeded_steps = SeededSteps()
        # Lightning's model summary runs it to fill its FLOPs and size columns: one image at 512x512,
        # the paper's ADE20K evaluation size (flop_counter FLOPs, twice the paper's multiply-adds).
        self.example_input_array = torch.zeros(1, 3, 512, 512)
        names = [model.id2label[i] for i in range(model.num_classes)]
        self.val_metrics = SegmentationMetrics(model.num_classes, ignore_index, class_names=names)
        self.test_metrics = SegmentationMetrics(model.num_classes, ignore_index, class_names=names)
        # Results of the last validation / test, for the caller (eval.py) to report.
        self.val_results: dict[str, Tensor] = {}
        self.test_results: dict[str, Tensor] = {}
        # inference is the data module's setting, saved (and logged) with its hyperparameters.
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler", "loss", "inference"])
        self.hparams.update(model.config)

    @property
    def class_names(self) -> list[str]:
        return [self.model.id2label[i] for i in range(self.model.num_classes)]

    def configure_model(self) -> None:
        if self.compile_model:
            # The network only. The loss stays eager: the fused cross-entropy (an autograd.Function
            # looping over bands, with data-dependent checks) would break the graph, and compiling
            # the plain upsample-then-cross-entropy loss made it slower on CPU (issue 14).
            self.model.compile()

    def forward(self, pixel_values: Tensor) -> Tensor:
        # Eager even with compile=true: Lightning's model summary runs this under a FlopCounterMode,
        # and a compiled call inside a dispatch mode makes dynamo skip SegFormer.forward for the
        # rest of the process (compile=true then trained eagerly). Steps call self.model, compiled.
        with torch.compiler.set_stance("force_eager"):
            return self.model(pixel_values)

    def setup(self, stage: str) -> None:
        if stage == "fit" and hasattr(self.loss, "setup"):
            self.loss.setup(self.model.num_classes, self.trainer.datamodule)

    def configure_callbacks(self) -> list[L.Callback]:
        return [self.nonfinite_guard, self.seeded_steps]

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        logits = self.model(pixel_values)
        loss, terms = loss_terms(self.loss, logits, labels)
        batch_size = pixel_values.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value, batch_size=batch_size)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=batch_size)
        return loss

    def predict_labels(self, batch: Mapping[str, Any]) -> list[Tensor]:
        """Class maps of an eval batch, each at its image's original (label) size."""
        return predict_batch(self.model, batch, self.inference)

    def _evaluate_batch(self, batch: Mapping[str, Any], metrics: SegmentationMetrics) -> list[Tensor]:
        preds = self.predict_labels(batch)
        for pred, labels, (height, width) in zip(preds, batch["labels"], batch["label_sizes"].tolist()):
            metrics.update(pred, labels[:height, :width])
        return preds

    def _finish(self, metrics: SegmentationMetrics, prefix: str) -> dict[str, Tensor]:
        results = metrics.compute()
        metrics.reset()
        for key in SCORES:
            # compute() already summed the confusion matrix over ranks: every rank logs the same value.
            self.log(f"{prefix}/{key}", results[key], prog_bar=key == "mIoU", sync_dist=True)
        return results

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[Tensor]:
        return self._evaluate_batch(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self.val_results = self._finish(self.val_metrics, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[Tensor]:
        return self._evaluate_batch(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.test_results = self._finish(self.test_metrics, "test")

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ConfigError("Training needs an optimizer: build SegFormerModule with optimizer=... (configs/optimizer).")
        optimizer = self.optimizer_factory(self.model)
        if self.scheduler_factory is None:
            return optimizer
        total_steps = self.trainer.estimated_stepping_batches
        if not math.isfinite(total_steps):
            raise ConfigError(
                "The learning-rate schedule runs over trainer.max_steps, which is not set: give "
                "trainer.max_steps=<number of optimizer steps>."
            )
        scheduler = self.scheduler_factory(optimizer, int(total_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # What SegFormer.from_pretrained needs to rebuild the network around state_dict["model.*"].
        checkpoint["segformer"] = self.model.config
