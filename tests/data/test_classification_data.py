"""Classification data: the image-folder and Hugging Face readers, the pipelines, the sample
shapes (not told apart by colour), and one-line errors on bad input (exit 2 through train.py)."""

import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, load_script
from PIL import Image

from segformer import cli
from segformer.data.classification import (
    SAMPLE_CLASSES,
    ClassificationDataModule,
    HFImageClassification,
    ImageFolder,
    SampleShapes,
    eval_transform,
)
from segformer.errors import DataError


def write_folder(root, classes: dict[str, int], split: str = "train", size=(40, 50)):
    rng = np.random.default_rng(0)
    for name, count in classes.items():
        (root / split / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / name / f"{i}.png")
    return root


def test_image_folder_labels_are_sorted_class_folders(tmp_path):
    write_folder(tmp_path, {"zebra": 2, "ant": 1, "moth": 3})
    data = ImageFolder(tmp_path, "train")
    assert data.classes == ["ant", "moth", "zebra"]
    assert [label for _, label in data.samples] == [0, 1, 1, 1, 2, 2]
    item = data[0]
    assert item["image"].shape == (40, 50, 3) and item["image"].dtype == np.uint8 and item["label"] == 0


def test_folder_without_class_folders_is_named(tmp_path):
    (tmp_path / "train").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "train" / "loose.png")
    with pytest.raises(DataError, match=r"has no class sub-folders"):
        ImageFolder(tmp_path, "train")


def test_empty_class_is_named(tmp_path):
    write_folder(tmp_path, {"cat": 1})
    (tmp_path / "train" / "dog").mkdir()
    with pytest.raises(DataError, match=r"train/dog holds no images"):
        ImageFolder(tmp_path, "train")


def test_undecodable_image_is_named(tmp_path):
    write_folder(tmp_path, {"cat": 1})
    (tmp_path / "train" / "cat" / "broken.png").write_bytes(b"not a png")
    data = ImageFolder(tmp_path, "train")
    index = [p.name for p, _ in data.samples].index("broken.png")
    with pytest.raises(DataError, match=r"Cannot read image .*broken\.png"):
        data[index]


def hf_source(tmp_path, columns=("image", "label")):
    import datasets

    features = datasets.Features({columns[0]: datasets.Image(), columns[1]: datasets.ClassLabel(names=["a", "b", "c"])})
    images = [Image.fromarray(np.full((36, 30, 3), 40 * i, np.uint8)) for i in range(3)]
    data = datasets.Dataset.from_dict({columns[0]: images, columns[1]: [2, 0, 1]}, features=features)
    datasets.DatasetDict({"train": data, "validation": data}).save_to_disk(str(tmp_path / "hf"))
    return tmp_path / "hf"


@pytest.mark.slow
def test_hf_source_with_image_and_label_columns(tmp_path):
    data = HFImageClassification(hf_source(tmp_path), "val")
    assert data.classes == ["a", "b", "c"] and len(data) == 3
    assert data[0]["label"] == 2 and data[1]["image"].shape == (36, 30, 3) and int(data[1]["image"][0, 0, 0]) == 40


@pytest.mark.slow
def test_hf_source_without_the_label_column_is_named(tmp_path):
    source = hf_source(tmp_path, columns=("image", "target"))
    with pytest.raises(DataError, match=r"no label column 'label'.*\['image', 'target'\]"):
        HFImageClassification(source, "train")


def test_eval_pipeline_resizes_the_short_side_then_centre_crops():
    """224 / 0.875 = 256: a 100x200 image (crop 28, ratio 0.875 -> short side 32) becomes 32x64,
    whose centre 28x28 is rows 2..29, columns 18..45."""
    image = np.zeros((100, 200, 3), np.uint8)
    image[:, 100:] = 255  # right half white: the crop's columns 18..31 dark, 32..45 white
    out = eval_transform(28, 0.875, mean=(0, 0, 0), std=(1, 1, 1))(image=image)["image"]
    assert out.shape == (3, 28, 28)
    assert torch.all(out[:, :, :13] == 0) and torch.all(out[:, :, 15:] == 255)


def test_train_pipeline_is_reproducible_from_the_sample_seed(tmp_path):
    write_folder(tmp_path, {"a": 2, "b": 2}, split="train")
    write_folder(tmp_path, {"a": 1, "b": 1}, split="val")
    module = ClassificationDataModule(ImageFolder, str(tmp_path), num_classes=2, batch_size=2, num_workers=0, crop_size=32)
    assert module.classes == ["a", "b"]
    samples = module.train_dataloader().dataset
    first, again, other = samples[(1, 7)], samples[(1, 7)], samples[(1, 8)]
    assert first["pixel_values"].shape == (3, 32, 32) and int(first["labels"]) == 0
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and not torch.equal(first["pixel_values"], other["pixel_values"])


@pytest.mark.slow
def test_sample_shapes_are_not_separable_by_colour(tmp_path):
    """Nearest class mean of each image's mean colour stays near chance (1/6): shape and texture decide."""
    train, val = SampleShapes(tmp_path, "train", per_class_train=30, per_class_val=10), SampleShapes(tmp_path, "val", per_class_train=30, per_class_val=10)
    assert train.classes == sorted(SAMPLE_CLASSES) and len(train) == 180 and len(val) == 60

    def colours(data):
        return np.stack([data[i]["image"].reshape(-1, 3).mean(0) for i in range(len(data))]), np.array([label for _, label in data.samples])

    x, y = colours(train)
    centroids = np.stack([x[y == k].mean(0) for k in range(6)])
    xv, yv = colours(val)
    accuracy = (np.linalg.norm(xv[:, None] - centroids[None], axis=-1).argmin(1) == yv).mean()
    assert accuracy < 0.4


@pytest.mark.slow
def test_bad_folder_through_train_py_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path):
    for split in ("train", "val"):
        (tmp_path / "data" / split).mkdir(parents=True)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", [
        "train.py", "--config-name", "train_cls", f"hydra.run.dir={tmp_path / 'run'}", "data=cls_folder",
        f"data.root={tmp_path / 'data'}", "data.num_classes=2",
    ])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(load_script("train").train, ROOT / "configs", "train")
    err = capsys.readouterr().err
    assert exit_info.value.code == cli.USER_ERROR_EXIT
    assert err.startswith("error: ") and "Traceback" not in err and "has no class sub-folders" in err
    assert str(tmp_path / "data" / "val") in err
