"""The classification LightningModule: MiT pretraining as DeiT / PVT train ImageNet classifiers.

Soft-target cross-entropy with label smoothing, mixup / cutmix on the batch, top-1 / top-5
accuracy (torchmetrics, summed across ranks). Optimizer, schedule, checkpoint metadata, the
non-finite guard and per-step seeding are the segmentation module's (``SegFormerModule``): the
mixing draws come from torch's generator, which the per-step seeding fixes, so resumed runs
draw the same boxes and ratios.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler
from torchmetrics.classification import MulticlassAccuracy

from segformer.errors import ConfigError
from segformer.model.classifier import MiTForImageClassification
from segformer.training.guards import NonFiniteLossGuard, SeededSteps
from segformer.training.module import SegFormerModule


def soft_targets(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """One-hot rows with ``smoothing`` spread over all classes (timm's convention: off = s / K)."""
    off = smoothing / num_classes
    return torch.full((labels.shape[0], num_classes), off, device=labels.device).scatter_(1, labels[:, None], 1.0 - smoothing + off)


def mix_batch(
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
    smoothing: float = 0.1,
) -> tuple[Tensor, Tensor]:
    """Mixup or cutmix of the batch with its reverse (timm's Mixup, batch mode) -> (images, targets).

    With probability ``prob`` the batch is mixed: cutmix (a box of area 1 - lam pasted from the
    flipped batch, lam then corrected to the box actually pasted) with probability
    ``switch_prob`` when both are enabled, else mixup with lam ~ Beta(alpha, alpha).
    """
    targets = soft_targets(labels, num_classes, smoothing)
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or float(torch.rand(())) >= prob:
        return images, targets
    cutmix = use_cutmix and (not use_mixup or float(torch.rand(())) < switch_prob)
    alpha = cutmix_alpha if cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    flipped = images.flip(0)
    if cutmix:
        height, width = images.shape[-2:]
        cut = (1 - lam) ** 0.5
        box_h, box_w = int(height * cut), int(width * cut)
        cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
        y0, y1 = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
        x0, x1 = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
        images = images.clone()
        images[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        images = images * lam + flipped * (1 - lam)
    return images, targets * lam + targets.flip(0) * (1 - lam)


class ClassificationModule(SegFormerModule):
    """Trains and evaluates a ``MiTForImageClassification`` (``self.model``; weights ``model.*``).

    Args:
        model: the classifier; its ``id2label`` names the classes in checkpoints.
        optimizer / scheduler: as ``SegFormerModule`` (configs/optimizer, configs/scheduler).
        label_smoothing: share of the target spread over all classes (DeiT: 0.1).
        mixup: ``mix_batch`` settings (mixup_alpha, cutmix_alpha, prob, switch_prob); None: no mixing.
        compile / max_consecutive_nonfinite: as ``SegFormerModule``.
    """

    def __init__(
        self,
        model: MiTForImageClassification,
        optimizer: Callable[[torch.nn.Module], Optimizer] | None = None,
        scheduler: Callable[[Optimizer, int], LRScheduler] | None = None,
        label_smoothing: float = 0.1,
        mixup: dict[str, float] | None = None,
        compile: bool = False,
        max_consecutive_nonfinite: int = 5,
    ) -> None:
        L.LightningModule.__init__(self)
        if not 0 <= label_smoothing < 1:
            raise ConfigError(f"module.label_smoothing={label_smoothing} must be in [0, 1) (DeiT: 0.1).")
        self.model = model
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.label_smoothing = label_smoothing
        self.mixup = dict(mixup or {})
        unknown = set(self.mixup) - {"mixup_alpha", "cutmix_alpha", "prob", "switch_prob"}
        if unknown:
            raise ConfigError(f"Unknown key(s) {sorted(unknown)} in module.mixup; allowed: mixup_alpha, cutmix_alpha, prob, switch_prob.")
        self.compile_model = compile
        self.nonfinite_guard = NonFiniteLossGuard(max_consecutive_nonfinite)
        self.seeded_steps = SeededSteps()
        k = model.num_classes
        self.metrics = torch.nn.ModuleDict({
            f"{stage}_{name}": MulticlassAccuracy(k, top_k=min(top, k), average="micro")
            for stage in ("val", "test") for name, top in (("top1", 1), ("top5", 5))
        })
        self.val_results: dict[str, Tensor] = {}
        self.test_results: dict[str, Tensor] = {}
        # Lightning's model summary runs it to fill its FLOPs column: one 224x224 image, the
        # ImageNet evaluation size the MiT encoders' FLOPs are quoted at.
        self.example_input_array = torch.zeros(1, 3, 224, 224)
        self.save_hyperparameters(ignore=["model", "optimizer", "scheduler"])
        self.hparams.update(model.config)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        # predict.py preprocesses as validation did (crop size and ratio, mean, std).
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "preprocessing"):
            checkpoint["segformer"]["preprocessing"] = datamodule.preprocessing

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def setup(self, stage: str) -> None:
        """Nothing to prepare: the soft-target loss needs no dataset statistics (unlike SegFormerModule's losses)."""

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch["pixel_values"], batch["labels"]
        if self.mixup:
            images, soft = mix_batch(images, targets, self.model.num_classes, smoothing=self.label_smoothing, **self.mixup)
        else:
            soft = soft_targets(targets, self.model.num_classes, self.label_smoothing)
        logits = self.model(images)
        loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=images.shape[0])
        return loss

    def _evaluate(self, batch: dict[str, Tensor], stage: str) -> None:
        logits = self.model(batch["pixel_values"])
        for name in ("top1", "top5"):
            self.metrics[f"{stage}_{name}"].update(logits, batch["labels"])

    def _finish(self, stage: str) -> dict[str, Tensor]:
        results = {}
        for name in ("top1", "top5"):
            metric = self.metrics[f"{stage}_{name}"]
            results[name] = metric.compute()  # summed over ranks by torchmetrics
            metric.reset()
            self.log(f"{stage}/{name}", results[name], prog_bar=name == "top1")
        return results

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self.val_results = self._finish("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self.test_results = self._finish("test")
