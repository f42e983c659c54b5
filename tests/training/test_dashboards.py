"""Dashboards: mask colours and overlays, the step progress bar (the charts: tests/inference/test_pictures.py),
and one training run logging to W&B (offline), TensorBoard and CSV at once."""

import csv

import lightning as L
import numpy as np
import pytest
import torch
from helpers import ROOT, RandomScenes, load_script, tiny_sample_overrides
from torch.utils.data import DataLoader

from segformer import SegFormer, cli
from segformer.data.sample import SCENE_SIZES
from segformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from segformer.inference.pictures import (
    colorize,
    denormalize,
    make_palette,
    overlay,
)
from segformer.training.dashboards import StepProgressBar
from segformer.training.module import SegFormerModule
from segformer.training.optim import build_adamw

CONFIGS = ROOT / "configs"
CLASSES = ["background", "stripes", "dots", "checkers", "disc", "box", "triangle"]


def test_palette_colours_and_overlay():
    given = [[10, 20, 30], [40, 50, 60]]
    palette = make_palette(2, given)
    assert palette.tolist() == given and palette.dtype == np.uint8
    generated = make_palette(150)
    assert generated.shape == (150, 3) and len({tuple(c) for c in generated}) == 150
    mask = np.array([[0, 1], [255, 1]], dtype=np.uint8)
    assert colorize(mask, palette).tolist() == [[[10, 20, 30], [40, 50, 60]], [[0, 0, 0], [40, 50, 60]]]
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    blended = overlay(image, mask, palette, alpha=0.5)
    assert blended[0, 0].tolist() == [55, 60, 65] and blended[0, 1].tolist() == [70, 75, 80]
    assert blended[1, 0].tolist() == [100, 100, 100]  # unlabelled pixels are left as they are


def test_denormalize_inverts_the_normalization():
    image = torch.randint(0, 256, (3, 5, 4)).float()
    normalized = (image - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    np.testing.assert_array_equal(denormalize(normalized, IMAGENET_MEAN, IMAGENET_STD), image.permute(1, 2, 0).numpy())


class TrainBarAtStart(L.Callback):
    """The training bar's (completed, total) when the first batch of the run starts."""

    def __init__(self, bar: StepProgressBar) -> None:
        self.bar, self.seen = bar, []

    def on_train_batch_start(self, trainer, *args) -> None:
        if not self.seen:
            self.seen.append((self.bar.train_progress_bar.completed, self.bar.train_progress_bar.total))


def _fit_with_bar(max_steps: int, tmp_path, ckpt_path=None) -> tuple[StepProgressBar, TrainBarAtStart]:
    torch.manual_seed(0)
    model = SegFormer("b0", num_classes=3)
    model.id2label = {0: "a", 1: "b", 2: "c"}
    bar = StepProgressBar()
    probe = TrainBarAtStart(bar)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=max_steps, max_epochs=-1, logger=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, callbacks=[bar, probe],
    )
    # Two batches per epoch: the bar runs over epochs.
    data = DataLoader(RandomScenes(size=4), batch_size=2)
    trainer.fit(SegFormerModule(model, optimizer=build_adamw), data, ckpt_path=ckpt_path)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    return bar, probe


@pytest.mark.slow
def test_the_training_bar_counts_optimizer_steps_of_the_whole_run(tmp_path):
    bar, probe = _fit_with_bar(3, tmp_path)
    assert probe.seen == [(0, 3)]
    task = bar.train_progress_bar  # Rich's own bar would show 1 of 2 batches of the second epoch
    assert (task.completed, task.total) == (3, 3) and "Training" in task.description
    # A resumed run's bar starts where the run stopped.
    bar, probe = _fit_with_bar(5, tmp_path, ckpt_path=tmp_path / "run.ckpt")
    assert probe.seen == [(3, 5)]
    assert (bar.train_progress_bar.completed, bar.train_progress_bar.total) == (5, 5)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    base = tmp_path_factory.mktemp("dashboards")
    mp.delenv("WANDB_API_KEY", raising=False)
    mp.setenv("HOME", str(base))  # no ~/.netrc login: W&B goes offline by itself
    overrides = [
        *tiny_sample_overrides(base / "sample", num_train=4, num_val=3),
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "logger=many",
        "callbacks=[default,dashboard]",
        "callbacks.validation_dashboard.num_images=2",
        "callbacks.throughput.window_size=2",
        "callbacks.rich_model_summary=null",
    ]
    cfg = cli.compose(CONFIGS, "train", overrides, run_dir=base / "run")
    load_script("train").train(cfg)
    yield base / "run"
    mp.undo()


@pytest.mark.slow
def test_wandb_offline_run_has_mask_images_table_and_confusion_matrix(run):
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    media = wandb_run / "files" / "media"
    # Two images, each with a prediction and a ground-truth mask.
    assert len(list((media / "images" / "mask").rglob("*.mask.png"))) == 4
    assert len(list((media / "images" / "val").glob("predictions_*.png"))) == 2
    assert len(list((media / "images" / "val").glob("confusion_matrix_*.png"))) == 1
    assert len(list((media / "images" / "val").glob("per_class_iou_*.png"))) == 1
    assert len(list((media / "table" / "val").glob("per_class_*.table.json"))) == 1


@pytest.mark.slow
def test_tensorboard_has_overlays_confusion_matrix_and_table(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    images = events.Tags()["images"]
    assert {"val/confusion_matrix", "val/per_class_iou", "val/legend"} <= set(images)
    panels = [tag for tag in images if tag.startswith("val/predictions/")]
    assert len(panels) == 2
    # image | ground truth | prediction side by side, each at the label's (the scene's) size
    panel = events.Images(panels[0])[-1]
    assert panel.width % 3 == 0 and (panel.height, panel.width // 3) in SCENE_SIZES
    assert "val/per_class/text_summary" in events.Tags()["tensors"]
    assert {"train/device/samples_per_sec", "train/loss", "val/mIoU"} <= set(events.Tags()["scalars"])


@pytest.mark.slow
def test_csv_has_one_iou_column_per_class_and_throughput(run):
    with open(run / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    present = {name for name in CLASSES if any(r.get(f"val/IoU/{name}") for r in rows)}
    assert present and all(f"val/IoU/{name}" in columns for name in present)
    assert not any(c.startswith("val/IoU/") and c[8:] not in CLASSES for c in columns)
    # Lightning's ThroughputMonitor, over a window of 2 batches: a rate once the second batch is
    # done, on the row of that step (images per second, one process).
    key = "train/device/samples_per_sec"
    speed = {int(r["step"]): float(r[key]) for r in rows if r.get(key)}
    assert list(speed) == [1] and speed[1] > 0
    assert {int(r["step"]) for r in rows if r.get("train/loss")} == {0, 1}
    assert not any(c.startswith("DeviceStatsMonitor") for c in columns)  # CPU run: no device statistics
