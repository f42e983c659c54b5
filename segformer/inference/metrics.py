"""Dataset-level segmentation metrics derived from one confusion matrix.

The confusion matrix (rows: label, columns: prediction) is a torchmetrics state summed across
DDP ranks, so every score below is computed over the whole dataset at once, the way MMSeg and
the official Cityscapes script do it, and never as a mean of per-image scores.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from segformer.errors import ConfigError, DataError


class SegmentationMetrics(Metric):
    """aAcc, mIoU, mAcc and per-class IoU / Acc accumulated over a dataset.

    ``update`` takes label maps, not logits, so the caller decides how predictions are made
    (see ``segformer.inference``). ``compute`` returns the scores and the confusion matrix.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    confmat: Tensor

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes}.")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(
                f"class_names has {len(class_names)} names but num_classes is {num_classes}; "
                "give one name per class."
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.add_state(
            "confmat",
            default=torch.zeros(num_classes, num_classes, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Count (label, prediction) pairs; target pixels equal to ``ignore_index`` are skipped.

        Counting uses ``torch.bincount`` directly: torchmetrics' own helper switches to an
        N x K^2 comparison when deterministic algorithms are on (Lightning ``deterministic=True``),
        which for 150 classes and one 512x512 image would need billions of elements. An integer
        bincount without weights is deterministic, so nothing is lost.
        """
        if preds.shape != target.shape:
            raise ValueError(
                f"preds {tuple(preds.shape)} and target {tuple(target.shape)} must have the same "
                "shape; resize predictions to the label size before updating the metric."
            )
        if preds.is_floating_point() or target.is_floating_point():
            raise ValueError("preds and target must be integer label maps, not scores.")
        if target.numel() == 0:
            return
        valid = target != self.ignore_index
        preds, target = preds.long(), target.long()
        self._check_range(preds.masked_fill(~valid, 0), target.masked_fill(~valid, 0))
        k = self.num_classes
        # Ignored pixels go to one extra bin that is dropped: cheaper than selecting valid pixels.
        index = (target * k + preds).masked_fill_(~valid, k * k)
        counts = torch.bincount(index.flatten(), minlength=k * k + 1)[: k * k]
        self.confmat += counts.reshape(k, k)

    def _check_range(self, preds: Tensor, target: Tensor) -> None:
        k = self.num_classes
        t_min, t_max, p_min, p_max = torch.stack([*torch.aminmax(target), *torch.aminmax(preds)]).tolist()
        if t_min < 0 or t_max >= k:
            bad = t_max if t_max >= k else t_min
            raise DataError(
                f"Label value {bad} is outside 0..{k - 1} (num_classes={k}) and is not the ignore "
                f"index {self.ignore_index}. Check num_classes and the label encoding of the "
                "dataset (ADE20K labels are reduced: 0 becomes 255 and k becomes k-1)."
            )
        if p_min < 0 or p_max >= k:
            bad = p_max if p_max >= k else p_min
            raise ConfigError(
                f"Predicted class {bad} is outside 0..{k - 1}: the model predicts more classes "
                f"than the metric's num_classes={k}. Make model.num_classes equal the dataset's."
            )

    def compute(self) -> dict[str, Tensor]:
        """Scores of the (rank-summed) confusion matrix; see ``scores_from_confusion_matrix``."""
        return scores_from_confusion_matrix(self.confmat)


def scores_from_confusion_matrix(confmat: Tensor) -> dict[str, Tensor]:
    """All scores from a (label x prediction) count matrix.

    IoU = I / (P + L - I) and Acc = I / L per class, NaN where the denominator is zero; mIoU
    and mAcc average the defined entries, so a class predicted but never labelled scores 0 and
    counts, while a class absent from both labels and predictions is left out. aAcc = sum I /
    sum L. Computed in float64 on the CPU (the matrix is small), returned as float32 on the
    matrix's device, with the raw matrix under ``confusion_matrix``.
    """
    counts = confmat.detach().to("cpu", torch.float64)
    intersection = counts.diagonal()
    label_area = counts.sum(dim=1)
    pred_area = counts.sum(dim=0)
    union = label_area + pred_area - intersection
    nan = torch.tensor(math.nan, dtype=torch.float64)
    iou = torch.where(union > 0, intersection / union.clamp(min=1), nan)
    acc = torch.where(label_area > 0, intersection / label_area.clamp(min=1), nan)
    total = label_area.sum()
    a_acc = intersection.sum() / total if total > 0 else nan
    scores = {
        "aAcc": a_acc,
        "mIoU": iou.nanmean(),
        "mAcc": acc.nanmean(),
        "IoU": iou,
        "Acc": acc,
    }
    out = {key: value.to(device=confmat.device, dtype=torch.float32) for key, value in scores.items()}
    out["confusion_matrix"] = confmat.detach().clone()
    return out


def _names(num_classes: int, class_names: Sequence[str] | None) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    if len(class_names) != num_classes:
        raise ConfigError(
            f"class_names has {len(class_names)} names but the results have {num_classes} classes."
        )
    return list(class_names)


def _as_float(value: Tensor | float) -> float | None:
    number = float(value)
    return None if math.isnan(number) else number


def format_table(results: Mapping[str, Tensor], class_names: Sequence[str] | None = None) -> str:
    """A per-class table (IoU and Acc in percent) followed by aAcc / mIoU / mAcc, for printing."""
    iou, acc = results["IoU"], results["Acc"]
    names = _names(len(iou), class_names)
    width = max([len("Class"), *map(len, names)])

    def pct(value: Tensor | float) -> str:
        number = float(value)
        return f"{'nan':>7}" if math.isnan(number) else f"{100 * number:7.2f}"

    rule = "-" * (width + 18)
    lines = [f"{'Class':<{width}}  {'IoU':>7}  {'Acc':>7}", rule]
    lines += [f"{name:<{width}}  {pct(i)}  {pct(a)}" for name, i, a in zip(names, iou, acc)]
    lines.append(rule)
    lines += [f"{key:<{width}}  {pct(results[key])}" for key in ("aAcc", "mIoU", "mAcc")]
    return "\n".join(lines)


def results_to_json(
    results: Mapping[str, Tensor], class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Scores as plain floats (fractions, NaN as None) keyed by class name, ready for json.dump."""
    names = _names(len(results["IoU"]), class_names)
    return {
        "aAcc": _as_float(results["aAcc"]),
        "mIoU": _as_float(results["mIoU"]),
        "mAcc": _as_float(results["mAcc"]),
        "per_class": {
            name: {"IoU": _as_float(i), "Acc": _as_float(a)}
            for name, i, a in zip(names, results["IoU"], results["Acc"])
        },
    }
