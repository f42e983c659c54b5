"""SegDataModule: batch contracts, padding collate, seeded determinism, Hydra configs, errors."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from segformer import cli
from segformer.data import FolderDataset, SampleScenes, SegDataModule
from segformer.data.sample import SAMPLE_CLASSES, SAMPLE_PALETTE
from segformer.errors import ConfigError, DataError
from segformer.training.batch import configure_batch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def data_config(tmp_path: Path, *overrides: str):
    """The training config as train.py composes it (the recipe's global batch split over this
    machine's devices), with the data under tmp_path."""
    cfg = cli.compose(CONFIGS, "train", [f"paths.data_dir={tmp_path}", *overrides], run_dir=tmp_path / "run")
    configure_batch(cfg)
    return cfg


@pytest.fixture(scope="module")
def sample_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sample")


def sample_module(root: Path, **overrides) -> SegDataModule:
    settings = dict(
        dataset=functools.partial(SampleScenes, num_train=8, num_val=5),
        root=str(root),
        num_classes=7,
        batch_size=4,
        val_batch_size=3,
        num_workers=0,
        crop_size=[64, 96],
        scale=[192, 160],
        augment={"photometric": {}},
    )
    settings.update(overrides)
    return SegDataModule(**settings)


def test_train_batches_follow_the_contract(sample_root):
    dm = sample_module(sample_root)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"pixel_values", "labels"}
    assert batch["pixel_values"].shape == (4, 3, 64, 96) and batch["pixel_values"].dtype == torch.float32
    assert batch["labels"].shape == (4, 64, 96) and batch["labels"].dtype == torch.long
    assert set(batch["labels"].unique().tolist()) <= set(range(7)) | {255}
    assert len(dm.train_dataloader()) == 2  # 8 images, batch 4, last partial batch dropped


def test_val_batches_keep_original_labels_and_pad_mixed_sizes(sample_root):
    dm = sample_module(sample_root, scale=[96, 80], val_batch_size=5)
    dm.setup("validate")
    raw = dm.dataset("val")
    batch = next(iter(dm.val_dataloader()))
    assert set(batch) == {"pixel_values", "labels", "image_sizes", "label_sizes", "names"}
    assert batch["names"] == [raw[i]["name"] for i in range(5)]
    sizes = {tuple(raw[i]["mask"].shape) for i in range(5)}
    assert len(sizes) > 1  # the scenes come in several sizes
    for i in range(5):
        mask = raw[i]["mask"]
        height, width = mask.shape
        assert batch["label_sizes"][i].tolist() == [height, width]
        np.testing.assert_array_equal(batch["labels"][i, :height, :width].numpy(), mask)
        assert (batch["labels"][i, height:] == 255).all() and (batch["labels"][i, :, width:] == 255).all()
        h, w = batch["image_sizes"][i].tolist()
        assert max(h, w) <= 96 and min(h, w) <= 80 and (max(h, w) == 96 or min(h, w) == 80)
        assert (batch["pixel_values"][i, :, h:] == 0).all() and (batch["pixel_values"][i, :, :, w:] == 0).all()
    assert batch["pixel_values"].shape[-2:] == tuple(batch["image_sizes"].max(0).values.tolist())
    assert batch["labels"].dtype == torch.long


def test_module_exposes_dataset_description(sample_root):
    dm = sample_module(sample_root, inference={"mode": "slide", "stride": [48, 48]})
    assert dm.num_classes == 7 and dm.ignore_index == 255
    assert dm.classes == list(SAMPLE_CLASSES) and dm.palette == [list(c) for c in SAMPLE_PALETTE]
    assert dm.inference == {"mode": "slide", "crop_size": [64, 96], "stride": [48, 48], "scales": [1.0], "flip": False, "window_batch": 1}
    assert dm.dataset("train") is dm.dataset("train") and len(dm.dataset("train")) == 8


def first_batches(dm: SegDataModule, seed: int, count: int = 2) -> list[dict]:
    L.seed_everything(seed, workers=True)
    loader = dm.train_dataloader()
    batches = []
    for batch in loader:
        batches.append(batch)
        if len(batches) == count:
            break
    return batches


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_is_reproducible_under_seed_everything(sample_root, num_workers):
    dm = sample_module(sample_root, num_workers=num_workers, persistent_workers=False)
    first, again, other = first_batches(dm, 11), first_batches(dm, 11), first_batches(dm, 12)
    for a, b in zip(first, again):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(first[0]["pixel_values"], other[0]["pixel_values"])


def test_workers_draw_different_augmentations(sample_root):
    # One sample seen by every worker slot: identical crops would mean the workers share a seed.
    dm = sample_module(sample_root, batch_size=1, num_workers=2, persistent_workers=False)
    L.seed_everything(0, workers=True)
    samples = dm.train_dataloader().dataset
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(samples, [0] * 4), batch_size=1, num_workers=2)
    crops = [b["pixel_values"] for b in loader]
    assert len({c.sum().item() for c in crops}) == 4


def test_configuration_errors_are_named(sample_root):
    with pytest.raises(ConfigError, match="data.num_classes is 9 .* has 7 classes"):
        sample_module(sample_root, num_classes=9).dataset("train")
    with pytest.raises(ConfigError, match=r"Unknown key\(s\) \['flip'\] in data.augment"):
        sample_module(sample_root, augment={"flip": 0.5})
    with pytest.raises(ConfigError, match="data.inference.mode must be one of"):
        sample_module(sample_root, inference={"mode": "tiles"})
    with pytest.raises(ConfigError, match="data.batch_size must be at least 1"):
        sample_module(sample_root, batch_size=0)


def test_a_bad_file_read_in_a_worker_raises_data_error_naming_it(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "images/train").mkdir(parents=True, exist_ok=True)
        (tmp_path / "masks/train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"images/train/{name}.png")
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / f"masks/train/{name}.png")
    (tmp_path / "images/train/b.png").write_bytes(b"\x89PNG broken")
    dm = SegDataModule(functools.partial(FolderDataset, num_classes=2), str(tmp_path), 2, batch_size=2,
                       num_workers=1, persistent_workers=False, crop_size=[8, 8], scale=[8, 8])
    batches = iter(dm.train_dataloader())
    with pytest.raises(DataError, match=r"Cannot read image .*b\.png") as caught:
        next(batches)
    del caught, batches  # the traceback holds the loader: free it so its worker stops now


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ade20k", "cityscapes", "sample", "hf", "folder"])
def test_every_data_config_instantiates(tmp_path, name):
    extra = ["data.num_classes=3"] if name == "folder" else []
    cfg = data_config(tmp_path, f"data={name}", *extra)
    dm = instantiate(cfg.data)
    assert isinstance(dm, SegDataModule)
    assert dm.root == (str(tmp_path / name) if name != "hf" else "scene_parse_150")
    assert len(dm.crop_size) == 2 and len(dm.scale) == 2 and dm.inference["mode"] in ("whole", "slide")
    assert isinstance(dm.dataset_factory, functools.partial)


@pytest.mark.slow
def test_config_values_reach_the_pipeline(tmp_path):
    ade = data_config(tmp_path, "data=ade20k").data
    assert ade.crop_size == [512, 512] and ade.scale == [2048, 512] and ade.augment.ratio_range == [0.5, 2.0]
    assert ade.augment.cat_max_ratio == 0.75 and ade.augment.photometric.hue_delta == 18
    city = data_config(tmp_path, "data=cityscapes").data
    assert city.crop_size == [1024, 1024] and city.scale == [2048, 1024] and city.inference.stride == [768, 768]
    cfg = data_config(tmp_path, "data.dataset.num_train=4", "data.dataset.num_val=2")
    dm = instantiate(cfg.data)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 128, 128)
    assert len(dm.dataset("val")) == 2 and dm.classes == list(SAMPLE_CLASSES)
