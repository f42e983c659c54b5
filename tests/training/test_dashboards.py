"""Dashboards: mask colours and overlays, the confusion-matrix picture, and one training run
logging to W&B (offline), TensorBoard and CSV at once."""

import csv

import numpy as np
import pytest
import torch

from segformer import cli
from segformer.data.sample import SCENE_SIZES
from segformer.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from segformer.inference.pictures import colorize, confusion_matrix_image, denormalize, make_palette, overlay
from helpers import ROOT, load_script, tiny_sample_overrides

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


def test_confusion_matrix_image_shades_row_shares():
    confmat = torch.tensor([[3, 1, 0], [0, 0, 0], [0, 2, 2]])
    image = confusion_matrix_image(confmat)  # unnamed: the heatmap alone, one border pixel
    cell = 32  # cells are 480 // classes pixels, at most 32
    assert image.shape == (3 * cell + 1, 3 * cell + 1, 3)

    def centre(i, j):
        return image[i * cell + cell // 2, j * cell + cell // 2].tolist()

    assert centre(0, 0) == [70, 100, 144]  # 3/4 of the way from white to (8, 48, 107)
    assert centre(0, 1) == [193, 203, 218]  # 1/4
    assert centre(1, 1) == [255, 255, 255]  # a class never labelled: empty row
    assert centre(2, 2) == centre(2, 1) == [132, 152, 181]  # 1/2
    named = confusion_matrix_image(confmat, ["sky", "road", "car"])
    assert named.shape[0] == image.shape[0] and named.shape[1] > image.shape[1]


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
        "callbacks.rich_model_summary=null",
    ]
    cfg = cli.compose(CONFIGS, "train", overrides, run_dir=base / "run")
    load_script("train").train(cfg)
    yield base / "run"
    mp.undo()


def test_wandb_offline_run_has_mask_images_table_and_confusion_matrix(run):
    (wandb_run,) = (run / "wandb").glob("offline-run-*")
    media = wandb_run / "files" / "media"
    # Two images, each with a prediction and a ground-truth mask.
    assert len(list((media / "images" / "mask").rglob("*.mask.png"))) == 4
    assert len(list((media / "images" / "val").glob("predictions_*.png"))) == 2
    assert len(list((media / "images" / "val").glob("confusion_matrix_*.png"))) == 1
    assert len(list((media / "table" / "val").glob("per_class_*.table.json"))) == 1


def test_tensorboard_has_overlays_confusion_matrix_and_table(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    images = events.Tags()["images"]
    assert "val/confusion_matrix" in images and "val/legend" in images
    panels = [tag for tag in images if tag.startswith("val/predictions/")]
    assert len(panels) == 2
    # image | ground truth | prediction side by side, each at the label's (the scene's) size
    panel = events.Images(panels[0])[-1]
    assert panel.width % 3 == 0 and (panel.height, panel.width // 3) in SCENE_SIZES
    assert "val/per_class/text_summary" in events.Tags()["tensors"]
    assert {"train/images_per_sec", "train/loss", "val/mIoU"} <= set(events.Tags()["scalars"])


def test_csv_has_one_iou_column_per_class_and_throughput(run):
    with open(run / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0])
    present = {name for name in CLASSES if any(r.get(f"val/IoU/{name}") for r in rows)}
    assert present and all(f"val/IoU/{name}" in columns for name in present)
    assert not any(c.startswith("val/IoU/") and c[8:] not in CLASSES for c in columns)
    speed = [float(r["train/images_per_sec"]) for r in rows if r.get("train/images_per_sec")]
    assert len(speed) == 2 and all(s > 0 for s in speed)
    assert "train/gpu_mem_gb" not in columns  # CPU run
