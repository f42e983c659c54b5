"""Segmentation losses: ``loss(logits, labels) -> scalar``, built from ``configs/loss``.

``logits`` is the model's output (B, K, H/4, W/4) and ``labels`` the full-resolution (B, H, W)
class ids with ``ignore_index`` (255) for unlabelled pixels; each loss upsamples the logits to
the label size itself (bilinear, as the paper), so a leaner computation can live inside it.

- ``CrossEntropyLoss``: the paper's loss (mmseg 0.13: per-pixel loss averaged over all pixels,
  ignored ones counting 0), with class weights (a list or ``auto``), label smoothing and the
  averaging over labelled pixels that mmseg recommends since v0.23.
- ``OHEMCrossEntropyLoss``: cross-entropy on the hard pixels only (mmseg's OHEMPixelSampler).
- ``DiceLoss``, ``LovaszSoftmaxLoss`` (Berman et al. 2018), ``FocalLoss`` (multi-class).
- ``CombinedLoss``: a weighted sum of named terms, each logged as ``train/loss_<name>``.

A loss may have ``setup(num_classes, datamodule)``, which the LightningModule calls when training
starts (``auto`` class weights read the training split there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from segformer.errors import ConfigError, DataError
from segformer.training.upsampled_ce import upsampled_cross_entropy_sum

AVERAGES = ("all", "labelled")
Loss = Callable[[Tensor, Tensor], Tensor]


def upsampled_scores(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Logits upsampled (bilinear) to ``size`` as (B*H*W, K) float32 scores, pixel-major.

    Channels-last: the upsampling vectorises over classes and a pixel's scores are contiguous
    (a third less time than NCHW for 150 classes, same values).
    """
    logits = F.interpolate(
        logits.contiguous(memory_format=torch.channels_last), size=tuple(size), mode="bilinear", align_corners=False
    )
    return logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]).float()


def average_pixels(losses: Tensor, labelled: Tensor, average: str) -> Tensor:
    """Mean of per-pixel losses (0 where ignored) over all pixels or over the labelled ones.

    A batch without a labelled pixel gives 0 that still reaches every parameter (DDP needs
    every rank to backpropagate).
    """
    if average == "all":
        return losses.sum() / max(losses.numel(), 1)
    return losses.sum() / labelled.sum().clamp(min=1)


def upsampled_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = 255,
    label_smoothing: float = 0.0,
    average: str = "all",
) -> Tensor:
    """Cross-entropy of logits upsampled to the label size: the computation ``CrossEntropyLoss``
    runs (a fused, leaner implementation can replace this one function).

    ``weight`` multiplies each pixel's loss by its true class's weight; ``average="all"`` divides
    by every pixel (mmseg 0.13, the paper), ``"labelled"`` by the labelled ones (mmseg
    ``avg_non_ignore``), in both cases without normalising by the weights. Computed without the
    full-resolution scores (``segformer.training.upsampled_ce``; same values and gradients).
    """
    total = upsampled_cross_entropy_sum(logits, labels, ignore_index, weight, label_smoothing)
    if average == "all":
        return total / max(labels.numel(), 1)
    return total / (labels != ignore_index).sum().clamp(min=1)


def _check_average(average: str) -> str:
    if average not in AVERAGES:
        raise ConfigError(f"loss average must be one of {', '.join(AVERAGES)}, got {average!r}.")
    return average


def class_weights_from_frequencies(pixels: np.ndarray) -> np.ndarray:
    """Median-frequency balancing (Eigen & Fergus 2015): ``median(f) / f_c`` over the classes
    present; a class absent from the training split never is a target and gets weight 1."""
    pixels = np.asarray(pixels, dtype=np.float64)
    present = pixels > 0
    if not present.any():
        raise DataError("The training split has no labelled pixel: class_weight=auto has nothing to count.")
    frequency = pixels / pixels.sum()
    weights = np.ones_like(frequency)
    weights[present] = np.median(frequency[present]) / frequency[present]
    return weights


class CrossEntropyLoss:
    """The paper's cross-entropy (``average="all"``, no class weights), with the usual options.

    Args:
        class_weight: one weight per class, or ``"auto"`` (median-frequency balancing of the
            training split's pixel counts, computed once when training starts and logged).
        label_smoothing: torch's label smoothing (0 = none).
        average: ``all`` (every pixel counts, ignored ones as 0: the paper) or ``labelled``.
        ignore_index: label value without a class.
    """

    def __init__(
        self,
        class_weight: Sequence[float] | str | None = None,
        label_smoothing: float = 0.0,
        average: str = "all",
        ignore_index: int = 255,
    ) -> None:
        if isinstance(class_weight, str) and class_weight != "auto":
            raise ConfigError(f"loss.class_weight must be a list of numbers, auto or null, got {class_weight!r}.")
        if not isinstance(class_weight, str) and class_weight is not None:
            class_weight = [float(w) for w in class_weight]
            if any(w < 0 for w in class_weight):
                raise ConfigError(f"loss.class_weight must not be negative, got {class_weight}.")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing must be in [0, 1), got {label_smoothing}.")
        self.class_weight = class_weight
        self.label_smoothing = float(label_smoothing)
        self.average = _check_average(average)
        self.ignore_index = int(ignore_index)
        self.weight: Tensor | None = None if class_weight is None or class_weight == "auto" else torch.tensor(class_weight)

    def setup(self, num_classes: int, datamodule: Any = None) -> None:
        """Check the class weights against the model, or count them from the training split."""
        if self.class_weight == "auto" and self.weight is None:
            self.weight = torch.tensor(self._count(datamodule), dtype=torch.float32)
            shown = ", ".join(f"{w:.3g}" for w in self.weight.tolist())
            rank_zero_info(f"loss.class_weight=auto (median-frequency balancing of the training split): [{shown}]")
        self._check(num_classes)

    @staticmethod
    def _count(datamodule: Any) -> np.ndarray:
        if datamodule is None or not hasattr(datamodule, "splits"):
            raise ConfigError("loss.class_weight=auto counts the training split's pixels: it needs a SegDataModule.")
        from segformer.data.check import scan_split

        report = scan_split(datamodule, datamodule.splits["train"], getattr(datamodule, "num_workers", 0))
        if report.pixels is None:
            raise DataError(f"loss.class_weight=auto could not read the training split: {report.problems[0]}")
        return class_weights_from_frequencies(report.pixels[:-1])

    def _check(self, num_classes: int) -> None:
        if self.weight is None and self.class_weight == "auto":
            raise ConfigError("loss.class_weight=auto is counted when training starts (setup); call loss.setup first.")
        if self.weight is not None and len(self.weight) != num_classes:
            raise ConfigError(
                f"loss.class_weight has {len(self.weight)} values but the model predicts {num_classes} classes."
            )

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        self._check(logits.shape[1])
        weight = self.weight.to(logits.device) if self.weight is not None else None
        return upsampled_cross_entropy(logits, labels, weight, self.ignore_index, self.label_smoothing, self.average)


class OHEMCrossEntropyLoss(CrossEntropyLoss):
    """Cross-entropy on hard pixels, as mmseg's ``OHEMPixelSampler(thresh, min_kept)``.

    A labelled pixel counts when its softmax probability of the true class is below
    ``max(thresh, p_k)``, ``p_k`` the ``min_kept x batch``-th smallest such probability
    (clamped to the largest): at least ``min_kept`` pixels per image are kept. The kept
    pixels' cross-entropy is averaged as ``average`` says (mmseg: over all pixels).
    """

    def __init__(
        self,
        thresh: float = 0.7,
        min_kept: int = 100000,
        class_weight: Sequence[float] | str | None = None,
        label_smoothing: float = 0.0,
        average: str = "all",
        ignore_index: int = 255,
    ) -> None:
        super().__init__(class_weight, label_smoothing, average, ignore_index)
        if not 0.0 < thresh <= 1.0 or min_kept < 0:
            raise ConfigError(f"loss.thresh must be in (0, 1] and loss.min_kept >= 0, got {thresh} and {min_kept}.")
        self.thresh = float(thresh)
        self.min_kept = int(min_kept)

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        self._check(logits.shape[1])
        scores = upsampled_scores(logits, labels.shape[-2:])
        targets = labels.reshape(-1)
        labelled = targets != self.ignore_index
        with torch.no_grad():
            true_prob = scores.softmax(dim=1).gather(1, targets.clamp(max=scores.shape[1] - 1)[:, None])[:, 0]
            valid = true_prob[labelled]
            threshold = self.thresh
            if valid.numel() > 0:
                ranked = valid.sort().values
                threshold = max(threshold, float(ranked[min(self.min_kept * labels.shape[0], valid.numel() - 1)]))
            kept = labelled & (true_prob < threshold)
        weight = self.weight.to(logits.device) if self.weight is not None else None
        losses = F.cross_entropy(
            scores, targets, weight=weight, ignore_index=self.ignore_index, reduction="none",
            label_smoothing=self.label_smoothing,
        )
        return average_pixels(losses * kept, labelled, self.average)


def _labelled_probabilities(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Softmax probabilities (N, K) and targets (N,) of the labelled pixels at label size."""
    scores = upsampled_scores(logits, labels.shape[-2:])
    targets = labels.reshape(-1)
    labelled = targets != ignore_index
    return scores[labelled].softmax(dim=1), targets[labelled]


class DiceLoss:
    """Soft Dice over the batch: ``1 - (2 sum(p y) + smooth) / (sum p + sum y + smooth)`` per
    class, averaged over the classes present in the batch's labels (ignored pixels left out)."""

    def __init__(self, smooth: float = 1.0, ignore_index: int = 255) -> None:
        if smooth < 0:
            raise ConfigError(f"loss.smooth must be >= 0, got {smooth}.")
        self.smooth = float(smooth)
        self.ignore_index = int(ignore_index)

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        probs, targets = _labelled_probabilities(logits, labels, self.ignore_index)
        onehot = F.one_hot(targets, probs.shape[1]).to(probs.dtype)
        present = onehot.sum(0) > 0
        if not present.any():
            return probs.sum() * 0.0
        inter, total = (probs * onehot).sum(0), probs.sum(0) + onehot.sum(0)
        dice = (2 * inter + self.smooth) / (total + self.smooth)
        return (1 - dice)[present].mean()


def lovasz_grad(fg_sorted: Tensor) -> Tensor:
    """Gradient of the Lovasz extension of the Jaccard loss at sorted errors (Berman et al. 2018,
    Alg. 1), for each column of ``fg_sorted`` (P, C)."""
    gts = fg_sorted.sum(0)
    intersection = gts - fg_sorted.cumsum(0)
    union = gts + (1 - fg_sorted).cumsum(0)
    jaccard = 1.0 - intersection / union
    return torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])


class LovaszSoftmaxLoss:
    """Lovasz-softmax (Berman et al. 2018): the Lovasz extension of each present class's
    Jaccard loss on the batch's labelled pixels, averaged over those classes."""

    def __init__(self, ignore_index: int = 255) -> None:
        self.ignore_index = int(ignore_index)

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        probs, targets = _labelled_probabilities(logits, labels, self.ignore_index)
        present = torch.unique(targets)
        if present.numel() == 0:
            return probs.sum() * 0.0
        fg = (targets[:, None] == present[None, :]).to(probs.dtype)
        errors = (fg - probs[:, present]).abs()
        errors_sorted, order = errors.sort(dim=0, descending=True)
        fg_sorted = fg.gather(0, order)
        return (errors_sorted * lovasz_grad(fg_sorted)).sum(0).mean()


class FocalLoss:
    """Multi-class focal loss (Lin et al. 2017): ``-(1 - p_t)^gamma log p_t`` per labelled
    pixel, averaged as ``average`` says (all pixels, as the cross-entropy, or labelled ones)."""

    def __init__(self, gamma: float = 2.0, average: str = "all", ignore_index: int = 255) -> None:
        if gamma < 0:
            raise ConfigError(f"loss.gamma must be >= 0, got {gamma}.")
        self.gamma = float(gamma)
        self.average = _check_average(average)
        self.ignore_index = int(ignore_index)

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        scores = upsampled_scores(logits, labels.shape[-2:])
        targets = labels.reshape(-1)
        labelled = targets != self.ignore_index
        log_pt = scores.log_softmax(dim=1).gather(1, targets.clamp(max=scores.shape[1] - 1)[:, None])[:, 0]
        losses = torch.where(labelled, -((1 - log_pt.exp()) ** self.gamma) * log_pt, 0.0)
        return average_pixels(losses, labelled, self.average)


class CombinedLoss:
    """A weighted sum of named losses: ``terms = {name: {loss: ..., weight: w}}``.

    ``terms()`` gives each term's (unweighted) value, logged as ``train/loss_<name>``.
    """

    def __init__(self, terms: Mapping[str, Mapping[str, Any]]) -> None:
        if not terms:
            raise ConfigError("loss.terms is empty: give at least one {loss: ..., weight: ...}.")
        self.losses: dict[str, Loss] = {}
        self.weights: dict[str, float] = {}
        for name, term in terms.items():
            if not isinstance(term, Mapping) or "loss" not in term or not callable(term["loss"]):
                raise ConfigError(f"loss.terms.{name} must be {{loss: <a loss config>, weight: <number>}}, got {term!r}.")
            weight = float(term.get("weight", 1.0))
            if weight < 0:
                raise ConfigError(f"loss.terms.{name}.weight must be >= 0, got {weight}.")
            self.losses[str(name)], self.weights[str(name)] = term["loss"], weight

    def setup(self, num_classes: int, datamodule: Any = None) -> None:
        for loss in self.losses.values():
            if hasattr(loss, "setup"):
                loss.setup(num_classes, datamodule)

    def terms(self, logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return {name: loss(logits, labels) for name, loss in self.losses.items()}

    def total(self, terms: Mapping[str, Tensor]) -> Tensor:
        return sum(self.weights[name] * value for name, value in terms.items())

    def __call__(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.total(self.terms(logits, labels))


def loss_terms(loss: Loss, logits: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The total loss and, for a ``CombinedLoss``, its terms by name (empty for a single loss)."""
    if isinstance(loss, CombinedLoss):
        terms = loss.terms(logits, labels)
        return loss.total(terms), terms
    return loss(logits, labels), {}
