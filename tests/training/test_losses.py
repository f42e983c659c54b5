"""Losses: each against a hand-computed value or a reference written the way the original
(mmseg 0.13, Berman's Lovasz code) computes it; each config instantiates and trains the sample
scenes; per-term logging; one-line errors."""

import functools
import math
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from segformer import SegFormer, cli
from segformer.data import SampleScenes, SegDataModule
from segformer.errors import ConfigError
from segformer.training.losses import (
    CombinedLoss,
    CrossEntropyLoss,
    DiceLoss,
    FocalLoss,
    LovaszSoftmaxLoss,
    OHEMCrossEntropyLoss,
    class_weights_from_frequencies,
    upsampled_cross_entropy,
)
from segformer.training.module import SegFormerModule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
LOSS_CONFIGS = sorted(p.stem for p in (CONFIGS / "loss").glob("*.yaml"))


def _logits_of(probs: list[list[float]]) -> torch.Tensor:
    """(1, K, 1, P) logits whose softmax over K is ``probs`` (P pixels x K classes)."""
    return torch.tensor(probs).log().T[None, :, None, :].clone().requires_grad_(True)


def _random_batch(seed: int = 0, classes: int = 4):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, classes, 4, 5, generator=generator, requires_grad=True)
    labels = torch.randint(0, classes, (2, 16, 20), generator=generator)
    labels[0, :5] = 255
    return logits, labels


def _mmseg_pixel_losses(logits, labels, class_weight=None):
    """mmseg 0.13 decode head: resize to the label size, then cross_entropy(reduction='none')."""
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return F.cross_entropy(up, labels, weight=class_weight, reduction="none", ignore_index=255)


# Cross-entropy ---------------------------------------------------------------------------------


def test_cross_entropy_hand_computed():
    # Two pixels, p(true class) = 3/4 on the labelled one; the other is ignored.
    logits, labels = _logits_of([[0.25, 0.75], [0.5, 0.5]]), torch.tensor([[[1, 255]]])
    assert CrossEntropyLoss()(logits, labels).item() == pytest.approx(-math.log(0.75) / 2)
    assert CrossEntropyLoss(average="labelled")(logits, labels).item() == pytest.approx(-math.log(0.75))
    weighted = CrossEntropyLoss(class_weight=[1.0, 4.0])(logits, labels)
    assert weighted.item() == pytest.approx(4 * -math.log(0.75) / 2)


@pytest.mark.parametrize("class_weight", [None, [0.5, 1.0, 2.0, 3.0]])
def test_cross_entropy_averages_over_all_pixels_as_mmseg_0_13(class_weight):
    logits, labels = _random_batch()
    weight = torch.tensor(class_weight) if class_weight else None
    # mmseg 0.13: weight_reduce_loss(loss, reduction='mean') = loss.mean() over every pixel.
    expected = _mmseg_pixel_losses(logits, labels, weight).mean()
    assert CrossEntropyLoss(class_weight=class_weight)(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    # mmseg >= 0.23 avg_non_ignore: divided by the number of labelled pixels (not the weights).
    labelled = _mmseg_pixel_losses(logits, labels, weight).sum() / (labels != 255).sum()
    got = CrossEntropyLoss(class_weight=class_weight, average="labelled")(logits, labels)
    assert got.item() == pytest.approx(labelled.item(), rel=1e-6)


def test_label_smoothing_is_torchs():
    logits, labels = _random_batch()
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    expected = F.cross_entropy(up, labels, ignore_index=255, label_smoothing=0.1)  # torch: labelled mean
    got = upsampled_cross_entropy(logits, labels, label_smoothing=0.1, average="labelled")
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


def test_a_batch_without_labels_gives_zero_and_still_backpropagates():
    for average in ("all", "labelled"):
        logits = torch.randn(1, 3, 4, 4, requires_grad=True)
        loss = CrossEntropyLoss(average=average)(logits, torch.full((1, 16, 16), 255))
        loss.backward()
        assert loss.item() == 0.0 and logits.grad is not None and torch.isfinite(logits.grad).all()


def test_class_weight_mistakes_are_one_line():
    logits, labels = _random_batch()
    with pytest.raises(ConfigError, match="class_weight has 3 values but the model predicts 4 classes"):
        CrossEntropyLoss(class_weight=[1.0, 1.0, 1.0])(logits, labels)
    with pytest.raises(ConfigError, match="class_weight has 3 values but the model predicts 4 classes"):
        CrossEntropyLoss(class_weight=[1.0, 1.0, 1.0]).setup(4)
    with pytest.raises(ConfigError, match="must not be negative"):
        CrossEntropyLoss(class_weight=[1.0, -1.0])
    with pytest.raises(ConfigError, match="list of numbers, auto or null"):
        CrossEntropyLoss(class_weight="inverse")
    with pytest.raises(ConfigError, match="average must be one of all, labelled"):
        CrossEntropyLoss(average="mean")


def test_auto_class_weights_are_median_frequency_balancing(tmp_path):
    # Frequencies 1/2, 1/4, 1/4, absent: median 1/4 -> weights 0.5, 1, 1, and 1 for the absent class.
    assert class_weights_from_frequencies(np.array([200, 100, 100, 0])).tolist() == pytest.approx([0.5, 1, 1, 1])

    dm = SegDataModule(
        dataset=functools.partial(SampleScenes, num_train=3, num_val=1), root=str(tmp_path), num_classes=7,
        num_workers=0, crop_size=[64, 64], scale=[96, 64],
    )
    counts = np.zeros(7)
    train = dm.dataset(dm.splits["train"])
    for index in range(len(train)):
        mask = train[index]["mask"]
        counts += np.bincount(mask[mask != 255], minlength=7)[:7]
    loss = CrossEntropyLoss(class_weight="auto")
    with pytest.raises(ConfigError, match="setup"):
        loss(*_random_batch(classes=7))
    loss.setup(7, dm)
    freq = counts / counts.sum()
    expected = np.where(counts > 0, np.median(freq[counts > 0]) / np.where(counts > 0, freq, 1), 1.0)
    assert loss.weight.tolist() == pytest.approx(expected.tolist(), rel=1e-6)
    with pytest.raises(ConfigError, match="needs a SegDataModule"):
        CrossEntropyLoss(class_weight="auto").setup(7, None)


# OHEM ------------------------------------------------------------------------------------------


def _mmseg_ohem(logits, labels, thresh, min_kept):
    """OHEMPixelSampler.sample of mmseg 0.13, then the cross-entropy weighted by it, .mean()."""
    seg_logit = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    with torch.no_grad():
        batch_kept = min_kept * labels.size(0)
        valid_mask = labels != 255
        seg_weight = seg_logit.new_zeros(size=labels.size())
        valid_seg_weight = seg_weight[valid_mask]
        seg_prob = F.softmax(seg_logit, dim=1)
        tmp_seg_label = labels.clone().unsqueeze(1)
        tmp_seg_label[tmp_seg_label == 255] = 0
        seg_prob = seg_prob.gather(1, tmp_seg_label).squeeze(1)
        sort_prob, _ = seg_prob[valid_mask].sort()
        min_threshold = sort_prob[min(batch_kept, sort_prob.numel() - 1)] if sort_prob.numel() > 0 else 0.0
        threshold = max(min_threshold, thresh)
        valid_seg_weight[seg_prob[valid_mask] < threshold] = 1.0
        seg_weight[valid_mask] = valid_seg_weight
    return (F.cross_entropy(seg_logit, labels, reduction="none", ignore_index=255) * seg_weight).mean()


def test_ohem_hand_computed():
    # True-class probabilities 0.9, 0.6, 0.3, ignored. thresh 0.7, min_kept 1: threshold
    # max(0.7, 2nd smallest 0.6) = 0.7 keeps 0.6 and 0.3; over all 4 pixels.
    logits = _logits_of([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    labels = torch.tensor([[[0, 0, 1, 255]]])
    expected = (-math.log(0.6) - math.log(0.3)) / 4
    assert OHEMCrossEntropyLoss(0.7, 1)(logits, labels).item() == pytest.approx(expected)
    # min_kept 2: the 3rd smallest (0.9) raises the threshold, but only p < 0.9 count: the same two.
    assert OHEMCrossEntropyLoss(0.7, 2)(logits, labels).item() == pytest.approx(expected)
    # thresh 0.5: only 0.3 is hard; min_kept 0 keeps nothing more.
    assert OHEMCrossEntropyLoss(0.5, 0)(logits, labels).item() == pytest.approx(-math.log(0.3) / 4)


@pytest.mark.parametrize(("thresh", "min_kept"), [(0.7, 10), (0.3, 50), (0.9, 1000)])
def test_ohem_matches_mmseg_sampler(thresh, min_kept):
    logits, labels = _random_batch(seed=1)
    expected = _mmseg_ohem(logits, labels, thresh, min_kept)
    assert OHEMCrossEntropyLoss(thresh, min_kept)(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)


# Dice, Lovasz, focal ---------------------------------------------------------------------------


def test_dice_hand_computed():
    # Pixel 0 (class 0) p = (.75, .25), pixel 1 (class 1) p = (.25, .75), pixel 2 ignored.
    # Each class: intersection .75, sum p + sum y = 1 + 1; smooth 0 -> dice .75, loss .25.
    logits, labels = _logits_of([[0.75, 0.25], [0.25, 0.75], [0.9, 0.1]]), torch.tensor([[[0, 1, 255]]])
    assert DiceLoss(smooth=0.0)(logits, labels).item() == pytest.approx(0.25)
    assert DiceLoss(smooth=1.0)(logits, labels).item() == pytest.approx(1 - 2.5 / 3)
    # Both labelled pixels class 0: intersection .75 + .25, sum p 1, sum y 2 -> dice 2/3; the
    # absent class 1 does not count.
    assert DiceLoss(smooth=0.0)(logits, torch.tensor([[[0, 0, 255]]])).item() == pytest.approx(1 - 2 / 3)


def test_lovasz_hand_computed():
    # Pixel 0 (class 0) p = (.75, .25), pixel 1 (class 1) p = (.4, .6).
    # Class 0: errors (.25, .4) -> sorted .4 (not fg), .25 (fg); Jaccard along it .5, 1 -> grad
    #   .5, .5 -> .4 * .5 + .25 * .5 = .325.
    # Class 1: errors (.25, .4) -> sorted .4 (fg), .25 (not fg); Jaccard 1, 1 -> grad 1, 0 -> .4.
    logits, labels = _logits_of([[0.75, 0.25], [0.4, 0.6]]), torch.tensor([[[0, 1]]])
    assert LovaszSoftmaxLoss()(logits, labels).item() == pytest.approx((0.325 + 0.4) / 2)


def _berman_lovasz_softmax(probas, labels):
    """Berman's reference lovasz_softmax_flat (classes='present'), one class at a time."""

    def lovasz_grad(gt_sorted):
        gts = gt_sorted.sum()
        intersection = gts - gt_sorted.float().cumsum(0)
        union = gts + (1 - gt_sorted).float().cumsum(0)
        jaccard = 1.0 - intersection / union
        jaccard[1:] = jaccard[1:] - jaccard[:-1]
        return jaccard

    losses = []
    for c in range(probas.size(1)):
        fg = (labels == c).float()
        if fg.sum() == 0:
            continue
        errors = (fg - probas[:, c]).abs()
        errors_sorted, perm = torch.sort(errors, 0, descending=True)
        losses.append(torch.dot(errors_sorted, lovasz_grad(fg[perm])))
    return sum(losses) / len(losses)


def test_lovasz_matches_bermans_reference():
    logits, labels = _random_batch(seed=2)
    up = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    probas = up.softmax(1).permute(0, 2, 3, 1).reshape(-1, 4)
    flat = labels.reshape(-1)
    expected = _berman_lovasz_softmax(probas[flat != 255], flat[flat != 255])
    assert LovaszSoftmaxLoss()(logits, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_focal_hand_computed():
    logits, labels = _logits_of([[0.25, 0.75], [0.5, 0.5]]), torch.tensor([[[1, 255]]])
    assert FocalLoss(gamma=2.0)(logits, labels).item() == pytest.approx(0.25**2 * -math.log(0.75) / 2)
    assert FocalLoss(gamma=2.0, average="labelled")(logits, labels).item() == pytest.approx(0.25**2 * -math.log(0.75))
    # gamma 0 is the cross-entropy.
    batch = _random_batch()
    assert FocalLoss(gamma=0.0)(*batch).item() == pytest.approx(CrossEntropyLoss()(*batch).item(), rel=1e-6)


# Combinations, configs -------------------------------------------------------------------------


def test_combined_loss_is_the_weighted_sum_of_its_terms():
    batch = _random_batch()
    combined = CombinedLoss({"ce": {"loss": CrossEntropyLoss(), "weight": 1.0}, "dice": {"loss": DiceLoss(), "weight": 0.5}})
    terms = combined.terms(*batch)
    assert terms["ce"].item() == pytest.approx(CrossEntropyLoss()(*batch).item())
    assert terms["dice"].item() == pytest.approx(DiceLoss()(*batch).item())
    assert combined(*batch).item() == pytest.approx(terms["ce"].item() + 0.5 * terms["dice"].item())
    with pytest.raises(ConfigError, match=r"loss.terms.dice.weight must be >= 0, got -1.0"):
        CombinedLoss({"dice": {"loss": DiceLoss(), "weight": -1}})
    with pytest.raises(ConfigError, match="loss.terms.ce must be"):
        CombinedLoss({"ce": {"weight": 1.0}})


def _compose(*overrides: str):
    return cli.compose(CONFIGS, "train", list(overrides), run_dir=Path("/nonexistent"))


def test_default_loss_is_the_papers_cross_entropy():
    loss = hydra.utils.instantiate(_compose().loss)
    assert isinstance(loss, CrossEntropyLoss) and loss.average == "all" and loss.weight is None
    assert loss.label_smoothing == 0.0


def test_a_wrong_loss_name_is_one_line(capsys, monkeypatch):
    import sys

    from helpers import load_script

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", ["train.py", "loss=nope"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_script("train").train, CONFIGS, "train")
    err = capsys.readouterr().err
    assert exit_info.value.code == cli.USER_ERROR_EXIT
    assert err.startswith("error: ") and "nope" in err and "ohem" in err and "Traceback" not in err


@pytest.fixture(scope="module")
def sample_batch(tmp_path_factory):
    dm = SegDataModule(
        dataset=functools.partial(SampleScenes, num_train=2, num_val=1), root=str(tmp_path_factory.mktemp("s")),
        num_classes=7, batch_size=2, num_workers=0, crop_size=[64, 64], scale=[96, 64], augment={"photometric": None},
    )
    dm.setup("fit")
    return next(iter(dm.train_dataloader()))


@pytest.mark.slow
@pytest.mark.parametrize("name", LOSS_CONFIGS)
def test_every_loss_config_trains_the_sample_scenes(name, sample_batch):
    # OHEM keeps min_kept pixels per image: a 64x64 crop has 4096, so keep a few hundred.
    overrides = [f"loss={name}", *(["loss.min_kept=200"] if name == "ohem" else [])]
    loss = hydra.utils.instantiate(_compose(*overrides).loss)
    torch.manual_seed(0)
    model = SegFormer("b0", num_classes=7)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    values = []
    for _ in range(8):
        value = loss(model(sample_batch["pixel_values"]), sample_batch["labels"])
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(value.item())
    assert all(math.isfinite(v) for v in values), values
    assert values[-1] < 0.9 * values[0], values


@pytest.mark.slow
def test_the_module_logs_each_term(sample_batch):
    torch.manual_seed(0)
    model = SegFormer("b0", num_classes=7, id2label={i: str(i) for i in range(7)})
    combined = hydra.utils.instantiate(_compose("loss=ce_dice").loss)
    module = SegFormerModule(model, optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.0), loss=combined)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, train_dataloaders=DataLoader([sample_batch], batch_size=None))
    logged = trainer.callback_metrics
    assert 0 < logged["train/loss_dice"].item() < 1 and logged["train/loss_ce"].item() > 0
    assert logged["train/loss"].item() == pytest.approx(logged["train/loss_ce"].item() + logged["train/loss_dice"].item())
