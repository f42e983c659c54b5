"""Dataset readers on tiny trees written to tmp_path: label mapping, layout checks, bad files."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segformer.data import ADE20K, Cityscapes, FolderDataset, HFDataset, SampleScenes, ensure_sample_scenes
from segformer.data.labels import ADE20K_CLASSES, ADE20K_PALETTE, CITYSCAPES_CLASSES
from segformer.data.sample import MANIFEST, SAMPLE_CLASSES
from segformer.errors import ConfigError, DataError

RNG = np.random.default_rng(0)


def write(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def rgb(height: int, width: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, 3), dtype=np.uint8)


def ade_tree(root: Path, masks: dict[str, np.ndarray], folder: str = "training") -> Path:
    base = root / "ADEChallengeData2016"
    for name, mask in masks.items():
        write(base / "images" / folder / f"{name}.jpg", rgb(*mask.shape))
        write(base / "annotations" / folder / f"{name}.png", mask)
    for other in ("training", "validation"):
        (base / "images" / other).mkdir(parents=True, exist_ok=True)
        (base / "annotations" / other).mkdir(parents=True, exist_ok=True)
    return base


# ---------------------------------------------------------------- ADE20K


def test_ade20k_reduces_labels_exactly_from_root_or_its_parent(tmp_path):
    raw = np.array([[0, 1, 2, 75], [149, 150, 255, 1]], dtype=np.uint8)
    base = ade_tree(tmp_path, {"ADE_train_00000001": raw})
    for root in (tmp_path, base):
        ds = ADE20K(root, "train")
        item = ds[0]
        np.testing.assert_array_equal(item["mask"], [[255, 0, 1, 74], [148, 149, 255, 0]])
        assert item["mask"].dtype == np.uint8
        assert item["image"].shape == (2, 4, 3) and item["image"].dtype == np.uint8
        assert item["name"] == "ADE_train_00000001"
    assert ds.classes == list(ADE20K_CLASSES) and len(ds.classes) == 150
    assert ds.classes[:3] == ["wall", "building", "sky"] and ds.classes[-1] == "flag"
    assert ds.palette[0] == [120, 120, 120] and ds.palette[149] == [92, 0, 255]
    assert len(ds.palette) == 150 and [list(c) for c in ADE20K_PALETTE] == ds.palette
    np.testing.assert_array_equal(ds.to_dataset_ids(np.array([0, 74, 149, 255])), [1, 75, 150, 0])


def test_ade20k_splits_map_to_training_and_validation(tmp_path):
    ade_tree(tmp_path, {"a": np.ones((4, 4), np.uint8)}, "training")
    ade_tree(tmp_path, {"b": np.ones((4, 4), np.uint8), "c": np.ones((4, 4), np.uint8)}, "validation")
    assert len(ADE20K(tmp_path, "train")) == 1
    val = ADE20K(tmp_path, "val")
    assert [val[i]["name"] for i in range(len(val))] == ["b", "c"]
    with pytest.raises(ConfigError, match="no split 'test'"):
        ADE20K(tmp_path, "test")


def test_ade20k_class_values_out_of_range_are_named(tmp_path):
    ade_tree(tmp_path, {"bad": np.array([[1, 151, 200]], np.uint8)})
    with pytest.raises(DataError, match=r"bad\.png.*\[151, 200\].*0-150, 255"):
        ADE20K(tmp_path, "train")[0]


def test_ade20k_missing_root_or_layout_shows_the_expected_layout(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="nowhere.*does not exist") as error:
        ADE20K(missing, "train")
    assert "annotations/training" in str(error.value)
    (tmp_path / "ADEChallengeData2016" / "images" / "training").mkdir(parents=True)
    with pytest.raises(DataError, match=r"annotations[/\\]training does not exist.*Expected layout"):
        ADE20K(tmp_path, "train")


def test_unpaired_images_and_masks_are_named(tmp_path):
    base = ade_tree(tmp_path, {"pair": np.ones((4, 4), np.uint8)})
    write(base / "images" / "training" / "lonely.jpg", rgb(4, 4))
    with pytest.raises(DataError, match=r"without a mask: .*lonely\.jpg"):
        ADE20K(tmp_path, "train")
    (base / "images" / "training" / "lonely.jpg").unlink()
    write(base / "annotations" / "training" / "orphan.png", np.ones((4, 4), np.uint8))
    with pytest.raises(DataError, match=r"without an image: .*orphan\.png"):
        ADE20K(tmp_path, "train")


def test_corrupt_and_truncated_images_are_named_when_read(tmp_path):
    base = ade_tree(tmp_path, {"broken": np.ones((64, 64), np.uint8), "cut": np.ones((64, 64), np.uint8)})
    (base / "images" / "training" / "broken.jpg").write_bytes(b"this is not a jpeg")
    buffer = io.BytesIO()
    Image.fromarray(rgb(64, 64)).save(buffer, format="JPEG")
    (base / "images" / "training" / "cut.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    ds = ADE20K(tmp_path, "train")  # layout is fine: the files are only opened when read
    with pytest.raises(DataError, match=r"Cannot read image .*broken\.jpg"):
        ds[0]
    with pytest.raises(DataError, match=r"Cannot read image .*cut\.jpg.*truncated"):
        ds[1]


def test_mask_of_another_size_is_named_with_its_image(tmp_path):
    base = ade_tree(tmp_path, {"x": np.ones((4, 6), np.uint8)})
    write(base / "annotations" / "training" / "x.png", np.ones((5, 6), np.uint8))
    with pytest.raises(DataError, match=r"Mask .*x\.png is 5x6 .* image .*x\.jpg is 4x6"):
        ADE20K(tmp_path, "train")[0]


def test_colour_masks_are_refused(tmp_path):
    base = ade_tree(tmp_path, {"x": np.ones((4, 4), np.uint8)})
    write(base / "annotations" / "training" / "x.png", rgb(4, 4))
    with pytest.raises(DataError, match=r"x\.png is a RGB image"):
        ADE20K(tmp_path, "train")[0]


# ---------------------------------------------------------------- Cityscapes

# labelId -> trainId for the 19 training classes, as listed by the Cityscapes benchmark.
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                        24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


def city_tree(root: Path, split: str, city: str, frame: str, mask: np.ndarray, kind: str = "labelIds") -> None:
    write(root / "leftImg8bit" / split / city / f"{frame}_leftImg8bit.png", rgb(*mask.shape))
    write(root / "gtFine" / split / city / f"{frame}_gtFine_{kind}.png", mask)
    write(root / "gtFine" / split / city / f"{frame}_gtFine_color.png", rgb(*mask.shape))


def test_cityscapes_maps_every_label_id_to_its_train_id(tmp_path):
    label_ids = np.array([list(range(34)) + [255]], dtype=np.uint8)
    city_tree(tmp_path, "train", "aachen", "aachen_000000_000019", label_ids)
    ds = Cityscapes(tmp_path, "train")
    item = ds[0]
    expected = [CITYSCAPES_TRAIN_IDS.get(i, 255) for i in range(34)] + [255]
    np.testing.assert_array_equal(item["mask"][0], expected)
    assert item["name"] == "aachen_000000_000019_leftImg8bit"
    assert ds.classes == list(CITYSCAPES_CLASSES) and ds.classes[0] == "road" and ds.classes[18] == "bicycle"
    assert ds.palette[0] == [128, 64, 128] and ds.palette[13] == [0, 0, 142]
    np.testing.assert_array_equal(ds.to_dataset_ids(np.array([0, 10, 18, 255])), [7, 23, 33, 0])


def test_cityscapes_prefers_label_train_ids_and_checks_values(tmp_path):
    city_tree(tmp_path, "val", "lindau", "lindau_000000_000019", np.array([[0, 18, 255]], np.uint8), "labelTrainIds")
    write(tmp_path / "gtFine/val/lindau/lindau_000000_000019_gtFine_labelIds.png", np.array([[7, 33, 0]], np.uint8))
    city_tree(tmp_path, "val", "munster", "munster_000000_000019", np.array([[7, 34, 40]], np.uint8))
    ds = Cityscapes(tmp_path, "val")
    np.testing.assert_array_equal(ds[0]["mask"], [[0, 18, 255]])
    with pytest.raises(DataError, match=r"munster_000000_000019_gtFine_labelIds\.png.*\[34, 40\]"):
        ds[1]


def test_cityscapes_layout_errors(tmp_path):
    city_tree(tmp_path, "train", "aachen", "aachen_000000_000019", np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match=r"(?s)leftImg8bit[/\\]val does not exist.*gtFine/\{train,val,test\}"):
        Cityscapes(tmp_path, "val")
    write(tmp_path / "leftImg8bit/train/aachen/aachen_000001_000019_leftImg8bit.png", rgb(2, 2))
    with pytest.raises(DataError, match=r"without a mask: .*aachen_000001_000019_leftImg8bit\.png"):
        Cityscapes(tmp_path, "train")


# ---------------------------------------------------------------- folder


def test_folder_dataset_reads_exact_pixels_and_optionally_reduces(tmp_path):
    image = rgb(3, 5)
    write(tmp_path / "images/train/one.png", image)
    write(tmp_path / "masks/train/one.png", np.array([[0, 1, 2, 255, 0]] * 3, np.uint8))
    ds = FolderDataset(tmp_path, "train", num_classes=3, classes=["a", "b", "c"])
    item = ds[0]
    np.testing.assert_array_equal(item["image"], image)
    np.testing.assert_array_equal(item["mask"][0], [0, 1, 2, 255, 0])
    assert ds.classes == ["a", "b", "c"] and len(ds.palette) == 3
    reduced = FolderDataset(tmp_path, "train", num_classes=2, reduce_labels=True)
    np.testing.assert_array_equal(reduced[0]["mask"][0], [255, 0, 1, 255, 255])
    assert reduced.classes == ["class_0", "class_1"]
    np.testing.assert_array_equal(reduced.to_dataset_ids(np.array([0, 1, 255])), [1, 2, 0])
    with pytest.raises(DataError, match=r"one\.png holds value\(s\) \[2\]"):
        FolderDataset(tmp_path, "train", num_classes=2)[0]


def test_folder_dataset_names_duplicate_stems_and_palette_size(tmp_path):
    write(tmp_path / "images/train/x.png", rgb(2, 2))
    write(tmp_path / "images/train/x.jpg", rgb(2, 2))
    write(tmp_path / "masks/train/x.png", np.zeros((2, 2), np.uint8))
    with pytest.raises(DataError, match="share the name 'x'"):
        FolderDataset(tmp_path, "train", num_classes=2)
    with pytest.raises(DataError, match=r"images[/\\]val does not exist"):
        FolderDataset(tmp_path, "val", num_classes=2)
    (tmp_path / "images/train/x.jpg").unlink()
    with pytest.raises(ConfigError, match="2 classes but a palette of 1"):
        FolderDataset(tmp_path, "train", num_classes=2, palette=[[1, 2, 3]])


# ---------------------------------------------------------------- Hugging Face


@pytest.fixture(scope="module")
def hf_splits():
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(), "scene": datasets.Value("int32")})

    def rows(masks):
        images = [Image.fromarray(rgb(*m.shape)) for m in masks]
        return datasets.Dataset.from_dict(
            {"image": images, "annotation": [Image.fromarray(m) for m in masks], "scene": list(range(len(masks)))},
            features=features,
        )

    train = rows([np.array([[0, 1, 2], [3, 255, 1]], np.uint8), np.full((4, 5), 2, np.uint8)])
    validation = rows([np.array([[1, 9]], np.uint8)])
    return datasets.DatasetDict({"train": train, "validation": validation})


def test_hf_dataset_from_save_to_disk(tmp_path, hf_splits):
    hf_splits.save_to_disk(str(tmp_path / "saved"))
    ds = HFDataset(tmp_path / "saved", "train", num_classes=3, reduce_labels=True, id2label={0: "a", 1: "b", 2: "c"})
    assert len(ds) == 2 and ds.classes == ["a", "b", "c"]
    item = ds[0]
    np.testing.assert_array_equal(item["mask"], [[255, 0, 1], [2, 255, 0]])
    assert item["image"].shape == (2, 3, 3) and item["image"].dtype == np.uint8
    assert ds[1]["mask"].shape == (4, 5)
    val = HFDataset(tmp_path / "saved", "val", num_classes=3, reduce_labels=True)
    with pytest.raises(DataError, match=r"saved \[val row 0\] column 'annotation'.*\[9\]"):
        val[0]


@pytest.mark.slow
def test_hf_dataset_from_parquet_files(tmp_path, hf_splits):
    folder = tmp_path / "parquet"
    folder.mkdir()
    hf_splits["train"].to_parquet(str(folder / "train-00000-of-00001.parquet"))
    hf_splits["validation"].to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    cache = str(tmp_path / "cache")
    ds = HFDataset(folder, "train", num_classes=4, cache_dir=cache)
    np.testing.assert_array_equal(ds[0]["mask"], [[0, 1, 2], [3, 255, 1]])
    assert len(HFDataset(folder, "val", num_classes=10, cache_dir=cache)) == 1
    single = HFDataset(folder / "train-00000-of-00001.parquet", "train", num_classes=4, cache_dir=cache)
    assert len(single) == 2
    with pytest.raises(DataError, match=r"no split for 'val'.*\['train'\]"):
        HFDataset(folder / "train-00000-of-00001.parquet", "val", num_classes=4, cache_dir=cache)


def test_hf_dataset_configuration_errors(tmp_path, hf_splits):
    hf_splits.save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ConfigError, match=r"no column\(s\) \['mask'\].*\['image', 'annotation', 'scene'\]"):
        HFDataset(tmp_path / "saved", "train", num_classes=4, mask_column="mask")
    with pytest.raises(ConfigError, match=r"ids 0\.\.2"):
        HFDataset(tmp_path / "saved", "train", num_classes=3, id2label={0: "a", 2: "c"})
    with pytest.raises(DataError, match="does not exist"):
        HFDataset(str(tmp_path / "absent"), "train", num_classes=4)
    assert len(HFDataset(tmp_path / "saved", "val", num_classes=10, split_names={"val": "validation"})) == 1


def test_hf_hub_name_offline_says_how_to_use_a_local_copy(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match=r"Could not load 'someone/no-such-dataset'.*save_to_disk"):
        HFDataset("someone/no-such-dataset", "train", num_classes=3, cache_dir=str(tmp_path))


# ---------------------------------------------------------------- sample scenes


def test_sample_scenes_are_deterministic_and_read_by_the_ade20k_reader(tmp_path):
    first = SampleScenes(tmp_path / "a", "train", seed=3, num_train=4, num_val=2)
    second = SampleScenes(tmp_path / "b", "train", seed=3, num_train=4, num_val=2)
    other = SampleScenes(tmp_path / "c", "train", seed=4, num_train=4, num_val=2)
    assert len(first) == 4 and len(SampleScenes(tmp_path / "a", "val", seed=3, num_train=4, num_val=2)) == 2
    assert first.classes == list(SAMPLE_CLASSES) and first.num_classes == 7
    for i in range(4):
        np.testing.assert_array_equal(first[i]["image"], second[i]["image"])
        np.testing.assert_array_equal(first[i]["mask"], second[i]["mask"])
    assert any(not np.array_equal(first[i]["mask"], other[i]["mask"]) for i in range(4))
    values = np.unique(np.concatenate([first[i]["mask"].ravel() for i in range(4)]))
    assert set(values.tolist()) <= set(range(7)) | {255} and 255 in values
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no staging leftovers


def test_sample_scenes_are_reused_replaced_when_stale_and_never_overwrite_user_data(tmp_path):
    root = ensure_sample_scenes(tmp_path / "s", seed=0, num_train=2, num_val=1)
    image = next((root / "ADEChallengeData2016/images/training").iterdir())
    image.write_bytes(b"marker")
    ensure_sample_scenes(root, seed=0, num_train=2, num_val=1)
    assert image.read_bytes() == b"marker"  # same manifest: reused as is
    ensure_sample_scenes(root, seed=1, num_train=2, num_val=1)
    assert image.read_bytes() != b"marker" and json.loads((root / MANIFEST).read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    user = tmp_path / "mine"
    write(user / "photo.png", rgb(2, 2))
    with pytest.raises(DataError, match=r"mine is not empty and is not a sample dataset"):
        ensure_sample_scenes(user)
    assert (user / "photo.png").exists()


@pytest.mark.slow
def test_sample_classes_are_not_separable_by_colour(tmp_path):
    """A per-pixel colour lookup (the best colour -> class table fitted on train) must do badly."""
    train = SampleScenes(tmp_path, "train", seed=0, num_train=40, num_val=20)
    val = SampleScenes(tmp_path, "val", seed=0, num_train=40, num_val=20)

    def binned(ds):
        for i in range(len(ds)):
            item = ds[i]
            keep = item["mask"] != 255
            bins = (item["image"][keep] // 32).astype(np.int64) @ np.array([64, 8, 1])
            yield bins, item["mask"][keep].astype(np.int64)

    table = np.zeros((512, 7))
    for bins, labels in binned(train):
        np.add.at(table, (bins, labels), 1)
    hits, totals = np.zeros(7), np.zeros(7)
    for bins, labels in binned(val):
        predicted = table[bins].argmax(1)
        np.add.at(totals, labels, 1)
        np.add.at(hits, labels, predicted == labels)
    balanced_accuracy = (hits / totals).mean()
    assert balanced_accuracy < 0.35  # chance is 1/7; a colour-coded dataset would be near 1.0
