"""Dataset-level metrics: hand-computed cases, accumulation, DDP sync, the Cityscapes script."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as csEval
from PIL import Image

from segformer.data.labels import CITYSCAPES_TRAIN_TO_LABEL_ID
from segformer.errors import ConfigError, DataError
from segformer.inference.metrics import (
    SegmentationMetrics,
    format_table,
    results_to_json,
    scores_from_confusion_matrix,
)

NAN = float("nan")


def _assert_close(actual: torch.Tensor, expected: list[float] | float) -> None:
    torch.testing.assert_close(
        actual, torch.tensor(expected, dtype=torch.float32), equal_nan=True, rtol=0, atol=1e-7
    )


def _hand_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Four classes: 0 present and predicted, 1 present but never predicted, 2 predicted but
    never present, 3 neither. The ignored pixels predict 1, 3 and 255 and must not count."""
    target = torch.tensor([[[0, 0, 0, 1, 255], [1, 255, 255, 0, 255]]])
    preds = torch.tensor([[[0, 0, 2, 0, 255], [0, 1, 3, 0, 255]]])
    return preds, target


def test_hand_computed_confusion_matrix_and_scores() -> None:
    preds, target = _hand_case()
    metric = SegmentationMetrics(num_classes=4)
    metric.update(preds, target)
    result = metric.compute()

    expected_confmat = torch.tensor([[3, 0, 1, 0], [2, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(result["confusion_matrix"], expected_confmat)
    # I = [3,0,0,0], L = [4,2,0,0], P = [5,0,1,0], union = [6,2,1,0]
    _assert_close(result["IoU"], [0.5, 0.0, 0.0, NAN])
    _assert_close(result["Acc"], [0.75, 0.0, NAN, NAN])
    _assert_close(result["mIoU"], 0.5 / 3)  # class 2 (predicted, absent) counts with 0
    _assert_close(result["mAcc"], 0.75 / 2)
    _assert_close(result["aAcc"], 3 / 6)
    for key in ("aAcc", "mIoU", "mAcc"):
        assert result[key].ndim == 0


def test_all_pixels_ignored_gives_nan_scores() -> None:
    metric = SegmentationMetrics(num_classes=3)
    metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.full((1, 2, 2), 255))
    result = metric.compute()
    assert int(result["confusion_matrix"].sum()) == 0
    assert math.isnan(float(result["mIoU"])) and math.isnan(float(result["aAcc"]))


def _reference_confmat(preds: np.ndarray, target: np.ndarray, k: int) -> np.ndarray:
    confmat = np.zeros((k, k), dtype=np.int64)
    for p, t in zip(preds.ravel(), target.ravel()):
        if t != 255:
            confmat[t, p] += 1
    return confmat


def test_several_updates_equal_one_update_on_the_concatenation() -> None:
    gen = torch.Generator().manual_seed(0)
    k = 6
    preds = torch.randint(0, k, (5, 7, 9), generator=gen)
    target = torch.randint(0, k, (5, 7, 9), generator=gen)
    target[torch.rand(target.shape, generator=gen) < 0.2] = 255

    split = SegmentationMetrics(num_classes=k)
    for i in range(5):
        split.update(preds[i : i + 1], target[i : i + 1])
    whole = SegmentationMetrics(num_classes=k)
    whole.update(preds, target)

    a, b = split.compute(), whole.compute()
    expected = torch.from_numpy(_reference_confmat(preds.numpy(), target.numpy(), k))
    assert torch.equal(a["confusion_matrix"], expected)
    assert torch.equal(b["confusion_matrix"], expected)
    for key in ("aAcc", "mIoU", "mAcc", "IoU", "Acc"):
        torch.testing.assert_close(a[key], b[key], equal_nan=True, rtol=0, atol=0)


def test_reset_clears_the_matrix() -> None:
    preds, target = _hand_case()
    metric = SegmentationMetrics(num_classes=4)
    metric.update(preds, target)
    metric.reset()
    assert int(metric.confmat.sum()) == 0


def test_out_of_range_label_is_a_data_error() -> None:
    metric = SegmentationMetrics(num_classes=150)
    target = torch.tensor([[[0, 150]]])
    with pytest.raises(DataError, match="150"):
        metric.update(torch.zeros_like(target), target)


def test_out_of_range_prediction_is_a_config_error() -> None:
    metric = SegmentationMetrics(num_classes=19)
    with pytest.raises(ConfigError, match="149"):
        metric.update(torch.tensor([[[149]]]), torch.tensor([[[3]]]))


def test_shape_mismatch_and_float_preds_are_rejected() -> None:
    metric = SegmentationMetrics(num_classes=3)
    with pytest.raises(ValueError, match="same shape"):
        metric.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        metric.update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))


def test_class_names_must_match_num_classes() -> None:
    with pytest.raises(ConfigError, match="class_names"):
        SegmentationMetrics(num_classes=3, class_names=["a", "b"])


def test_table_and_json_report_percent_and_null() -> None:
    preds, target = _hand_case()
    metric = SegmentationMetrics(num_classes=4, class_names=["road", "car", "bus", "sky"])
    metric.update(preds, target)
    result = metric.compute()

    table = format_table(result, metric.class_names)
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()}
    assert rows["road"] == ["50.00", "75.00"]
    assert rows["bus"] == ["0.00", "nan"]
    assert rows["sky"] == ["nan", "nan"]
    assert rows["mIoU"] == ["16.67"]
    assert rows["aAcc"] == ["50.00"]

    report = json.loads(json.dumps(results_to_json(result, metric.class_names)))
    assert report["aAcc"] == pytest.approx(0.5)
    assert report["mIoU"] == pytest.approx(0.5 / 3)
    assert report["per_class"]["road"] == pytest.approx({"IoU": 0.5, "Acc": 0.75})
    assert report["per_class"]["bus"] == {"IoU": 0.0, "Acc": None}
    assert report["per_class"]["sky"] == {"IoU": None, "Acc": None}


def test_scores_from_confusion_matrix_keeps_large_counts_exact() -> None:
    # 2048x1024 x 500 images overflows float32 integers; the scores must not drift.
    big = 2048 * 1024 * 500
    confmat = torch.tensor([[big - 1, 1], [0, big]])
    result = scores_from_confusion_matrix(confmat)
    torch.testing.assert_close(
        result["IoU"].double(), torch.tensor([(big - 1) / big, big / (big + 1)], dtype=torch.float64)
    )


def _ddp_worker(rank: int, world_size: int, tmp_dir: str, preds, target) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_dir}/init", rank=rank, world_size=world_size)
    try:
        metric = SegmentationMetrics(num_classes=5)
        metric.update(preds[rank::world_size], target[rank::world_size])
        torch.save(metric.compute()["confusion_matrix"], f"{tmp_dir}/confmat{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_sum_their_confusion_matrices(tmp_path) -> None:
    gen = torch.Generator().manual_seed(1)
    preds = torch.randint(0, 5, (4, 6, 6), generator=gen)
    target = torch.randint(0, 5, (4, 6, 6), generator=gen)
    target[:, 0] = 255
    mp.spawn(_ddp_worker, args=(2, str(tmp_path), preds, target), nprocs=2)
    single = SegmentationMetrics(num_classes=5)
    single.update(preds, target)
    expected = single.compute()["confusion_matrix"]
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"confmat{rank}.pt"), expected)


def test_agrees_with_the_official_cityscapes_script(tmp_path) -> None:
    assert [csEval.trainId2label[t].id for t in range(19)] == list(CITYSCAPES_TRAIN_TO_LABEL_ID)
    train_to_id = dict(enumerate(CITYSCAPES_TRAIN_TO_LABEL_ID))
    lut = np.full(256, 255, dtype=np.int64)
    for train_id, label_id in train_to_id.items():
        lut[label_id] = train_id

    rng = np.random.default_rng(0)
    # Ground truth from every label id (ignored ones included) except bus (28) and train (31);
    # predictions never use bus, use train (predicted but absent) and never use bicycle (33).
    gt_ids = np.array([i for i in range(34) if i not in (28, 31)])
    pred_train_ids = np.array([t for t in range(19) if train_to_id[t] not in (28, 33)])
    metric = SegmentationMetrics(num_classes=19)
    gt_files, pred_files = [], []
    for n, (h, w) in enumerate([(12, 20), (16, 16), (9, 31)]):
        gt = rng.choice(gt_ids, size=(h, w)).astype(np.uint8)
        gt_train = lut[gt]
        pred_train = rng.choice(pred_train_ids, size=(h, w))
        # Make some predictions right so IoUs are not all tiny.
        hit = (rng.random((h, w)) < 0.5) & (gt_train != 255) & (gt_train != 18)
        pred_train[hit] = gt_train[hit]
        pred_ids = np.vectorize(train_to_id.get)(pred_train).astype(np.uint8)
        stem = f"city_{n:06d}_000019"
        gt_files.append(str(tmp_path / f"{stem}_gtFine_labelIds.png"))
        pred_files.append(str(tmp_path / f"{stem}_pred.png"))
        Image.fromarray(gt).save(gt_files[-1])
        Image.fromarray(pred_ids).save(pred_files[-1])
        metric.update(torch.from_numpy(pred_train)[None], torch.from_numpy(gt_train)[None])

    args = copy.copy(csEval.args)
    args.evalInstLevelScore = False
    args.JSONOutput = False
    args.quiet = True
    official = csEval.evaluateImgLists(pred_files, gt_files, args)

    result = metric.compute()
    names = [csEval.id2label[train_to_id[t]].name for t in range(19)]
    official_iou = torch.tensor([official["classScores"][name] for name in names])
    torch.testing.assert_close(result["IoU"].double(), official_iou, equal_nan=True, rtol=0, atol=1e-6)
    assert math.isnan(official_iou[names.index("bus")])
    assert official_iou[names.index("train")] == 0.0
    assert official_iou[names.index("bicycle")] == 0.0
    assert float(result["mIoU"]) == pytest.approx(official["averageScoreClasses"], abs=1e-6)
