"""COCO-Stuff 164k, Pascal VOC 2012 (+ SBD) and Mapillary Vistas v1.2 on tiny trees in their official layouts."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script
from PIL import Image

from segformer import cli
from segformer.data import COCOStuff, MapillaryVistas, PascalVOC
from segformer.data.check import CONFIG_DIR, check
from segformer.data.labels import MAPILLARY_PALETTE, VOC_PALETTE
from segformer.errors import ConfigError, DataError

RNG = np.random.default_rng(0)


def write(path: Path, array: np.ndarray, palette: list[int] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if palette is not None:
        image.putpalette(palette)  # an L image becomes P with its values as the indices
    image.save(path)
    return path


def rgb(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# ---------------------------------------------------------------- COCO-Stuff 164k

# Raw stuffthingmap ids on both sides of every unused id {11, 25, 28, 29, 44, 65, 67, 68, 70, 82,
# 90}, the ends 0 and 181, ids past 181 and 255, with the training id each must read as.
COCO_RAW_TO_TRAIN = {
    0: 0, 10: 10, 11: 255, 12: 11, 24: 23, 25: 255, 26: 24, 27: 25, 28: 255, 29: 255, 30: 26,
    43: 39, 44: 255, 45: 40, 64: 59, 65: 255, 66: 60, 67: 255, 68: 255, 69: 61, 70: 255, 71: 62,
    81: 72, 82: 255, 83: 73, 89: 79, 90: 255, 91: 80, 181: 170, 182: 255, 200: 255, 255: 255,
}


def coco_tree(base: Path, split: str, masks: dict[str, np.ndarray]) -> Path:
    for name, mask in masks.items():
        stem = name.removesuffix("_labelTrainIds")
        write(base / "images" / split / f"{stem}.jpg", rgb(*mask.shape))
        write(base / "annotations" / split / f"{name}.png", mask)
    return base


def coco_raw_mask() -> np.ndarray:
    return np.array([list(COCO_RAW_TO_TRAIN)], dtype=np.uint8)


def test_coco_stuff_maps_raw_ids_across_every_gap_from_root_or_parent(tmp_path):
    base = coco_tree(tmp_path / "coco_stuff164k", "train2017", {"000000000009": coco_raw_mask()})
    for root in (tmp_path, base):
        ds = COCOStuff(root, "train")
        item = ds[0]
        np.testing.assert_array_equal(item["mask"][0], list(COCO_RAW_TO_TRAIN.values()))
        assert item["name"] == "000000000009" and item["image"].shape == (1, len(COCO_RAW_TO_TRAIN), 3)
    assert ds.num_classes == 171 and len(ds.palette) == 171
    # train 11 = raw 12 = COCO id 13 (id 12, "street sign", has no pixels); 80 = raw 91, the first stuff class.
    assert (ds.classes[0], ds.classes[11], ds.classes[79], ds.classes[80], ds.classes[170]) == (
        "person", "stop sign", "toothbrush", "banner", "wood")
    assert ds.palette[0] == [0, 192, 64] and ds.palette[170] == [64, 64, 0]
    np.testing.assert_array_equal(ds.to_dataset_ids(np.array([0, 11, 26, 80, 170, 255])), [0, 12, 30, 91, 181, 255])


def test_coco_stuff_round_trip_through_dataset_ids_is_exact(tmp_path):
    coco_tree(tmp_path, "val2017", {"a": coco_raw_mask()})
    ds = COCOStuff(tmp_path, "val")
    train_ids = np.arange(171)
    raw = ds.to_dataset_ids(train_ids)
    assert sorted(set(raw.tolist()) & {11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90}) == []
    np.testing.assert_array_equal(np.take(ds.raw_map, raw), train_ids)


def test_coco_stuff_prefers_converted_train_ids_and_checks_them(tmp_path):
    coco_tree(tmp_path, "train2017", {"a_labelTrainIds": np.array([[0, 170, 255]], np.uint8)})
    write(tmp_path / "annotations/train2017/a.png", np.array([[11, 11, 11]], np.uint8))  # raw: must lose
    coco_tree(tmp_path, "train2017", {"b_labelTrainIds": np.array([[171, 0, 0]], np.uint8)})
    ds = COCOStuff(tmp_path, "train")
    assert len(ds) == 2
    np.testing.assert_array_equal(ds[0]["mask"], [[0, 170, 255]])
    with pytest.raises(DataError, match=r"b_labelTrainIds\.png holds value\(s\) \[171\]"):
        ds[1]


def test_coco_stuff_layout_errors_name_the_path(tmp_path):
    coco_tree(tmp_path, "train2017", {"a": coco_raw_mask()})
    with pytest.raises(DataError) as error:
        COCOStuff(tmp_path, "val")
    assert str(tmp_path / "images" / "val2017") in one_line(error)
    with pytest.raises(DataError) as error:
        COCOStuff(tmp_path / "elsewhere", "train")
    assert str(tmp_path / "elsewhere" / "annotations") in one_line(error)
    write(tmp_path / "images/train2017/lonely.jpg", rgb(2, 2))
    with pytest.raises(DataError) as error:
        COCOStuff(tmp_path, "train")
    assert "without a mask" in one_line(error) and str(tmp_path / "images/train2017/lonely.jpg") in str(error.value)
    with pytest.raises(ConfigError, match="no split 'test'"):
        COCOStuff(tmp_path, "test")


# ---------------------------------------------------------------- Pascal VOC 2012

def flat_palette(colours) -> list[int]:
    """A PIL palette (256 r, g, b triples) starting with ``colours``."""
    return [v for colour in colours for v in colour] + [0, 0, 0] * (256 - len(colours))


def voc_tree(root: Path, lists: dict[str, dict[str, np.ndarray]], mask_dir: str = "SegmentationClass") -> Path:
    """VOCdevkit/VOC2012 with one list file per entry of ``lists`` (its ids and their masks)."""
    base = root / "VOCdevkit" / "VOC2012"
    for list_name, masks in lists.items():
        for name, mask in masks.items():
            write(base / "JPEGImages" / f"{name}.jpg", rgb(*mask.shape))
            palette = flat_palette(VOC_PALETTE) if mask_dir == "SegmentationClass" else None
            write(base / mask_dir / f"{name}.png", mask, palette)
        listed = base / "ImageSets" / "Segmentation" / list_name
        listed.parent.mkdir(parents=True, exist_ok=True)
        listed.write_text("".join(f"{n}\n" for n in masks))
    (base / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    return base


def test_voc_reads_palette_indices_not_colours_from_any_root(tmp_path):
    indices = np.array([[0, 1, 15, 20, 255]], np.uint8)
    base = voc_tree(tmp_path, {"train.txt": {"2007_000032": indices}, "val.txt": {"2007_000033": indices}})
    stored = Image.open(base / "SegmentationClass" / "2007_000032.png")
    assert stored.mode == "P"
    # What a reader that decoded colours would see: 1 is dark red (128, 0, 0), 15 pink, 20 navy.
    assert np.asarray(stored.convert("RGB"))[0].tolist()[:4] == [[0, 0, 0], [128, 0, 0], [192, 128, 128], [0, 64, 128]]
    assert np.asarray(stored.convert("L"))[0].tolist() != indices[0].tolist()
    for root in (tmp_path, tmp_path / "VOCdevkit", base):
        ds = PascalVOC(root, "train")
        assert not ds.augmented and len(ds) == 1
        np.testing.assert_array_equal(ds[0]["mask"], indices)
        assert ds[0]["name"] == "2007_000032"
    assert ds.classes[0] == "background" and ds.classes[15] == "person" and ds.num_classes == 21
    assert ds.palette[:3] == [[0, 0, 0], [128, 0, 0], [0, 128, 0]] and ds.palette[20] == [0, 64, 128]
    assert [PascalVOC(base, "val")[0]["name"]] == ["2007_000033"]
    np.testing.assert_array_equal(ds.to_dataset_ids(np.array([0, 15, 20, 255])), [0, 15, 20, 255])


def test_voc_trains_on_the_sbd_set_when_present(tmp_path):
    base = voc_tree(tmp_path, {"train.txt": {"2007_000032": np.zeros((2, 2), np.uint8)}, "val.txt": {}})
    aug = {"2007_000032": np.full((2, 2), 3, np.uint8), "2008_000002": np.array([[0, 20], [255, 7]], np.uint8)}
    for name, mask in aug.items():
        write(base / "JPEGImages" / f"{name}.jpg", rgb(2, 2))
        write(base / "SegmentationClassAug" / f"{name}.png", mask)
    with pytest.raises(DataError) as error:
        PascalVOC(tmp_path, "train", augmented=True)  # no list yet
    assert str(base / "ImageSets" / "Segmentation" / "trainaug.txt") in one_line(error)
    # DeepLab's list format: image and mask paths.
    (base / "ImageSets/Segmentation/trainaug.txt").write_text(
        "".join(f"/JPEGImages/{n}.jpg /SegmentationClassAug/{n}.png\n" for n in aug)
    )
    for augmented in (None, True):
        ds = PascalVOC(tmp_path, "train", augmented=augmented)
        assert ds.augmented and [ds[i]["name"] for i in range(len(ds))] == list(aug)
        np.testing.assert_array_equal(ds[0]["mask"], aug["2007_000032"])  # SegmentationClassAug wins
        np.testing.assert_array_equal(ds[1]["mask"], aug["2008_000002"])
    plain = PascalVOC(tmp_path, "train", augmented=False)
    assert not plain.augmented and len(plain) == 1
    np.testing.assert_array_equal(plain[0]["mask"], np.zeros((2, 2)))


def test_voc_mmseg_aug_list_adds_to_train_list(tmp_path):
    base = voc_tree(tmp_path, {"train.txt": {"a": np.ones((2, 2), np.uint8)}, "val.txt": {}})
    write(base / "JPEGImages" / "b.jpg", rgb(2, 2))
    write(base / "SegmentationClassAug" / "b.png", np.full((2, 2), 2, np.uint8))
    (base / "ImageSets/Segmentation/aug.txt").write_text("b\na\n")
    ds = PascalVOC(tmp_path, "train")
    assert ds.augmented and [ds[i]["name"] for i in range(len(ds))] == ["a", "b"]
    np.testing.assert_array_equal(ds[0]["mask"], np.ones((2, 2)))  # from SegmentationClass
    np.testing.assert_array_equal(ds[1]["mask"], np.full((2, 2), 2))


def test_voc_list_naming_a_missing_image_or_mask_names_it(tmp_path):
    ones = np.ones((2, 2), np.uint8)
    base = voc_tree(tmp_path, {"train.txt": {"a": ones}, "val.txt": {"b": ones}})
    with open(base / "ImageSets/Segmentation/val.txt", "a") as handle:
        handle.write("2007_999999\n")
    with pytest.raises(DataError) as error:
        PascalVOC(tmp_path, "val")
    message = one_line(error)
    assert str(base / "JPEGImages" / "2007_999999.jpg") in message and "val.txt" in message
    (base / "SegmentationClass" / "a.png").unlink()
    with pytest.raises(DataError) as error:
        PascalVOC(tmp_path, "train")
    assert "without a mask" in one_line(error) and str(base / "JPEGImages" / "a.jpg") in str(error.value)
    with pytest.raises(DataError) as error:
        PascalVOC(tmp_path / "nowhere", "train")
    assert str(tmp_path / "nowhere" / "VOCdevkit" / "VOC2012" / "JPEGImages") in one_line(error)
    (base / "ImageSets/Segmentation/val.txt").unlink()
    with pytest.raises(DataError) as error:
        PascalVOC(tmp_path, "val")
    assert str(base / "ImageSets" / "Segmentation" / "val.txt") in one_line(error)


def test_voc_values_outside_the_classes_are_named(tmp_path):
    voc_tree(tmp_path, {"train.txt": {"bad": np.array([[0, 21, 254]], np.uint8)}})
    with pytest.raises(DataError, match=r"bad\.png holds value\(s\) \[21, 254\].*0-20, 255"):
        PascalVOC(tmp_path, "train")[0]


# ---------------------------------------------------------------- Mapillary Vistas v1.2


def mapillary_tree(base: Path, folder: str, masks: dict[str, np.ndarray], labels: str = "labels") -> Path:
    for name, mask in masks.items():
        write(base / folder / "images" / f"{name}.jpg", rgb(*mask.shape))
        write(base / folder / labels / f"{name}.png", mask, flat_palette(MAPILLARY_PALETTE))
    return base


def test_mapillary_label_ids_are_the_66_classes_from_root_or_parent(tmp_path):
    raw = np.array([[0, 13, 64, 65, 255]], np.uint8)
    base = mapillary_tree(tmp_path / "mapillary", "training", {"__CRyFzoDOXn6unQ6a3DnQ": raw})
    for root in (tmp_path, base):
        ds = MapillaryVistas(root, "train")
        np.testing.assert_array_equal(ds[0]["mask"], raw)
        assert ds[0]["name"] == "__CRyFzoDOXn6unQ6a3DnQ"
    assert ds.num_classes == 66 and len(ds.palette) == 66
    assert [ds.classes[k] for k in (0, 13, 64, 65)] == ["Bird", "Road", "Ego Vehicle", "Unlabeled"]
    assert ds.palette[13] == [128, 64, 128] and ds.palette[65] == [0, 0, 0]
    np.testing.assert_array_equal(ds.to_dataset_ids(np.array([0, 13, 65, 255])), [0, 13, 65, 65])

    ds65 = MapillaryVistas(tmp_path, "train", ignore_unlabeled=True)
    np.testing.assert_array_equal(ds65[0]["mask"], [[0, 13, 64, 255, 255]])
    assert ds65.num_classes == 65 and ds65.classes[-1] == "Ego Vehicle" and len(ds65.palette) == 65
    np.testing.assert_array_equal(ds65.to_dataset_ids(np.array([0, 64, 255])), [0, 64, 65])


def test_mapillary_prefers_v1_2_labels_of_the_v2_archive_and_checks_values(tmp_path):
    mapillary_tree(tmp_path, "validation", {"a": np.array([[66, 1]], np.uint8)}, labels="v2.0/labels")
    mapillary_tree(tmp_path, "validation", {"a": np.array([[5, 1]], np.uint8)}, labels="v1.2/labels")
    np.testing.assert_array_equal(MapillaryVistas(tmp_path, "val")[0]["mask"], [[5, 1]])
    mapillary_tree(tmp_path, "validation", {"a": np.array([[66, 1]], np.uint8)}, labels="v1.2/labels")
    with pytest.raises(DataError, match=r"a\.png holds value\(s\) \[66\].*0-65, 255"):
        MapillaryVistas(tmp_path, "val")[0]


def test_mapillary_layout_errors_name_the_path(tmp_path):
    mapillary_tree(tmp_path, "training", {"a": np.zeros((2, 2), np.uint8)})
    with pytest.raises(DataError) as error:
        MapillaryVistas(tmp_path, "val")
    assert str(tmp_path / "validation") in one_line(error)
    (tmp_path / "validation" / "images").mkdir(parents=True)
    with pytest.raises(DataError) as error:
        MapillaryVistas(tmp_path, "val")
    assert str(tmp_path / "validation" / "labels") in one_line(error)
    write(tmp_path / "training/images/b.jpg", rgb(2, 2))
    with pytest.raises(DataError) as error:
        MapillaryVistas(tmp_path, "train")
    assert "without a mask" in one_line(error) and str(tmp_path / "training/images/b.jpg") in str(error.value)


# ---------------------------------------------------------------- the data check and training

def _coco(root: Path) -> list[str]:
    for split in ("train2017", "val2017"):
        masks = {f"{split}_{i}": RNG.choice([0, 12, 91, 181, 255], (48, 64)).astype(np.uint8) for i in range(2)}
        coco_tree(root, split, masks)
    return ["data=coco_stuff"]


def _voc(root: Path) -> list[str]:
    masks = {name: RNG.choice([0, 1, 15, 255], (48, 64)).astype(np.uint8) for name in ("2007_000032", "2007_000033")}
    voc_tree(root, {"train.txt": masks, "val.txt": masks})
    return ["data=voc"]


def _mapillary(root: Path) -> list[str]:
    for folder in ("training", "validation"):
        masks = {f"{folder}_{i}": RNG.choice([0, 13, 65], (48, 64)).astype(np.uint8) for i in range(2)}
        mapillary_tree(root, folder, masks)
    return ["data=mapillary"]


TREES = {"coco_stuff": _coco, "voc": _voc, "mapillary": _mapillary}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TREES))
def test_the_data_check_command_reads_each_layout_cleanly(name, tmp_path, monkeypatch, capsys):
    overrides = [*TREES[name](tmp_path / "data"), f"data.root={tmp_path / 'data'}", "data.num_workers=0"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["check", *overrides])
    cli.run(check, CONFIG_DIR, "check")  # exits only when it finds a problem
    out = capsys.readouterr().out
    assert "No problem found." in out
    # Two images and no problem in each split.
    assert re.search(r"train\s*│\s*2\s*│\s*0\s*│", out) and re.search(r"val\s*│\s*2\s*│\s*0\s*│", out)


# data=<name>: classes, the recipe (iterations, global batch, crops, scale) and the evaluation mode.
RECIPES = {
    "coco_stuff": (171, 80_000, 16, [512, 512], [2048, 512]),
    "voc": (21, 40_000, 16, [512, 512], [2048, 512]),
    "mapillary": (66, 300_000, 8, [1280, 1280], [2048, 1024]),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_each_dataset_brings_its_recipe_and_whole_image_evaluation(name, tmp_path):
    cfg = cli.compose(CONFIG_DIR, "train", [f"data={name}", "model=b2"], run_dir=tmp_path / "run")
    num_classes, steps, batch, crop, scale = RECIPES[name]
    assert cfg.data.num_classes == cfg.model.num_classes == num_classes
    assert cfg.trainer.max_steps == steps and cfg.trainer.max_steps % cfg.trainer.val_check_interval == 0
    assert cfg.global_batch_size == batch and cfg.data.batch_size is None  # split over the run's devices
    assert list(cfg.data.crop_size) == crop and list(cfg.data.scale) == scale
    assert cfg.data.inference.mode == "whole" and list(cfg.data.inference.scales) == [1.0]
    assert cfg.model.pretrained == "mit_b2_imagenet"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TREES))
def test_a_few_training_steps_on_each_dataset(name, tmp_path):
    overrides = [
        *TREES[name](tmp_path / "data"),
        f"data.root={tmp_path / 'data'}",
        "data.num_workers=0",
        "global_batch_size=2",
        "data.crop_size=[32,32]",
        "data.scale=[64,48]",
        "model.pretrained=null",
        "trainer=cpu",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.num_sanity_val_steps=0",
        "callbacks.rich_progress_bar=null",
        "callbacks.rich_model_summary=null",
    ]
    cfg = cli.compose(CONFIG_DIR, "train", overrides, run_dir=tmp_path / "run")
    # The dataset's own recipe was picked up (the overrides above only shrink it).
    assert cfg.data.num_classes == {"coco_stuff": 171, "voc": 21, "mapillary": 66}[name]
    best = load_script("train").train(cfg)
    assert best is not None and 0.0 <= best <= 1.0
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["segformer"]["num_classes"] == cfg.data.num_classes
