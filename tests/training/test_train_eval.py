"""train.py -> eval.py on a few sample scenes: checkpoints, logs, schedule, resume, metrics.json,
prediction PNGs."""

import copy
import json
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from PIL import Image

from segformer import SegFormer, cli
from segformer.inference import InferenceConfig, predict_batch
from segformer.training.optim import warmup_poly_factor
from helpers import ROOT, csv_rows, load_script, tiny_sample_overrides

CONFIGS = ROOT / "configs"
MAX_STEPS = 4


def _column(rows, key):
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    overrides = [
        *tiny_sample_overrides(base / "sample", num_train=8, num_val=2),
        f"trainer.max_steps={MAX_STEPS}",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
    ]
    cfg = cli.compose(CONFIGS, "train", overrides, run_dir=base / "run")
    best = load_script("train").train(cfg)
    return {"cfg": cfg, "best": best, "run": base / "run", "data": tiny_sample_overrides(base / "sample", num_train=8, num_val=2), "base": base}


@pytest.mark.slow
def test_training_writes_checkpoints_and_logs(trained):
    run = trained["run"]
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "checkpoints" / "best.ckpt").is_file()
    rows = csv_rows(run / "csv" / "metrics.csv")
    assert sorted(_column(rows, "train/loss")) == list(range(MAX_STEPS))
    # Validation after optimizer steps 2 and 4; Lightning logs it at the step index of the last
    # training batch (1 and 3).
    val = _column(rows, "val/mIoU")
    assert sorted(val) == [1, 3]
    assert set(_column(rows, "val/aAcc")) == set(_column(rows, "val/mAcc")) == {1, 3}
    assert trained["best"] == pytest.approx(max(val.values()))
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == MAX_STEPS
    assert checkpoint["segformer"]["variant"] == "b0" and checkpoint["segformer"]["num_classes"] == 7


@pytest.mark.slow
def test_learning_rate_follows_the_configured_schedule(trained):
    cfg = trained["cfg"]
    lrs = _column(csv_rows(trained["run"] / "csv" / "metrics.csv"), "train/lr")
    for step, lr in lrs.items():
        factor = warmup_poly_factor(
            step, MAX_STEPS, cfg.scheduler.warmup_iters, cfg.scheduler.warmup_ratio, cfg.scheduler.power
        )
        assert lr == pytest.approx(cfg.optimizer.lr * factor, rel=1e-5), step


@pytest.mark.slow
def test_eval_reproduces_validation_and_writes_dataset_ids(trained, tmp_path):
    best_ckpt = trained["run"] / "checkpoints" / "best.ckpt"
    overrides = [*trained["data"], f"ckpt_path={best_ckpt}", "save_predictions=true"]
    cfg = cli.compose(CONFIGS, "eval", overrides, run_dir=tmp_path / "eval")
    miou = load_script("eval").evaluate(cfg)

    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert miou == pytest.approx(trained["best"], abs=1e-6)
    assert metrics["mIoU"] == pytest.approx(miou)
    assert all(0.0 <= metrics[key] <= 1.0 for key in ("aAcc", "mIoU", "mAcc"))
    assert list(metrics["per_class"]) == ["background", "stripes", "dots", "checkers", "disc", "box", "triangle"]
    assert set(metrics["per_class"]["dots"]) == {"IoU", "Acc"}

    # One PNG per validation image, named after it, in the dataset's own ids (ADE20K-style k + 1),
    # equal to the model's prediction.
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.setup("test")
    batch = next(iter(datamodule.test_dataloader()))
    model = SegFormer.from_pretrained(best_ckpt).eval()
    preds = predict_batch(model, batch, InferenceConfig.from_mapping(datamodule.inference))
    predictions = tmp_path / "eval" / "predictions"
    assert len(list(predictions.glob("*.png"))) == 2
    for name, pred in zip(batch["names"], preds):
        saved = np.array(Image.open(predictions / f"{name}.png"))
        assert saved.dtype == np.uint8 and saved.shape == tuple(pred.shape)
        np.testing.assert_array_equal(saved, pred.numpy() + 1)


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint_step(trained, tmp_path):
    overrides = [
        *trained["data"],
        f"trainer.max_steps={MAX_STEPS + 2}",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
        f"ckpt_path={trained['run'] / 'checkpoints' / 'last.ckpt'}",
    ]
    cfg = cli.compose(CONFIGS, "train", overrides, run_dir=tmp_path / "resumed")
    load_script("train").train(cfg)
    rows = csv_rows(tmp_path / "resumed" / "csv" / "metrics.csv")
    assert sorted(_column(rows, "train/loss")) == [MAX_STEPS, MAX_STEPS + 1]
    checkpoint = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == MAX_STEPS + 2


def _fake_cityscapes_val(root: Path, rng: np.random.Generator) -> None:
    """Two 128x64 val images with random labelIds (ignored ids included); no train split."""
    (root / "leftImg8bit" / "val" / "lindau").mkdir(parents=True)
    (root / "gtFine" / "val" / "lindau").mkdir(parents=True)
    for name in ("lindau_000000_000019", "lindau_000001_000019"):
        image = rng.integers(0, 256, (64, 128, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "leftImg8bit" / "val" / "lindau" / f"{name}_leftImg8bit.png")
        label_ids = rng.integers(0, 34, (64, 128), dtype=np.uint8)
        Image.fromarray(label_ids).save(root / "gtFine" / "val" / "lindau" / f"{name}_gtFine_labelIds.png")


@pytest.mark.slow
def test_eval_mIoU_equals_the_official_cityscapes_script_on_its_predictions(tmp_path):
    cs_eval = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    _fake_cityscapes_val(tmp_path / "cityscapes", np.random.default_rng(0))
    torch.manual_seed(0)
    SegFormer("b0", num_classes=19).save_pretrained(tmp_path / "model")
    overrides = [
        "data=cityscapes",
        f"data.root={tmp_path / 'cityscapes'}",
        "data.num_workers=0",
        "data.scale=[128,64]",
        "data.inference.crop_size=[64,64]",
        "data.inference.stride=[48,48]",
        f"ckpt_path={tmp_path / 'model'}",
        "save_predictions=true",
    ]
    cfg = cli.compose(CONFIGS, "eval", overrides, run_dir=tmp_path / "eval")
    assert cfg.data.inference.mode == "slide"
    miou = load_script("eval").evaluate(cfg)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())

    args = copy.copy(cs_eval.args)
    args.predictionPath, args.predictionWalk = str(tmp_path / "eval" / "predictions"), None
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    gt_files = sorted(str(p) for p in (tmp_path / "cityscapes" / "gtFine" / "val").rglob("*_labelIds.png"))
    pred_files = [cs_eval.getPrediction(args, gt) for gt in gt_files]
    official = cs_eval.evaluateImgLists(pred_files, gt_files, args)

    assert miou == pytest.approx(official["averageScoreClasses"], abs=1e-6)
    for train_id, (name, scores) in enumerate(metrics["per_class"].items()):
        expected = official["classScores"][cs_eval.trainId2label[train_id].name]
        if np.isnan(expected):
            assert scores["IoU"] is None, name
        else:
            assert scores["IoU"] == pytest.approx(expected, abs=1e-6), name
