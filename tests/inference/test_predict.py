"""predict.py on folders of generated images: the three output files per image, the evaluation's
preprocessing and inference, dataset ids and palettes, unreadable and too-small inputs, outputs
that already exist, and where the settings come from."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from segformer import SegFormer, cli
from segformer.data import SAMPLE_PALETTE
from segformer.data.labels import generated_palette
from segformer.data.transforms import eval_transform
from segformer.errors import CheckpointError, ConfigError, DataError
from segformer.inference import InferenceConfig, predict_probs
from segformer.inference.predictor import find_images, load_predictor
from helpers import ROOT, load_script

CONFIGS = ROOT / "configs"
SCALE = [128, 96]
SIZES = {"wide": (96, 128), "tall": (150, 90), "small": (40, 50), "square": (70, 70)}  # (h, w)


def _tiny_model(num_classes: int) -> SegFormer:
    torch.manual_seed(0)
    model = SegFormer("b0", num_classes=num_classes, id2label={k: f"thing{k}" for k in range(num_classes)})
    # A random decoder predicts nearly one class everywhere; a spread-out classifier gives
    # label maps with several classes and boundaries to compare.
    torch.nn.init.normal_(model.decode_head.classifier.weight, std=0.5)
    return model.eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    _tiny_model(4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :, None] * np.ones((h, 1, 3), np.float32)
        pixels = np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{name}.{'jpg' if name == 'tall' else 'png'}")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (folder / "notes.txt").write_text("not an image")
    (folder / "nested").mkdir()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "nested" / "inner.png")
    return folder


def _compose(tmp_path: Path, *overrides: str):
    return cli.compose(CONFIGS, "predict", ["num_workers=0", "progress=false", *overrides], run_dir=tmp_path / "run")


def _expected(model: SegFormer, path: Path, scale=SCALE) -> np.ndarray:
    image = np.asarray(Image.open(path).convert("RGB"))
    pixel_values = eval_transform(scale)(image=image)["image"][None]
    return predict_probs(model, pixel_values, image.shape[:2], InferenceConfig()).argmax(0).numpy()


@pytest.mark.slow
def test_predict_writes_label_palette_and_overlay_per_image(model_dir, images, tmp_path):
    out = tmp_path / "out"
    cfg = _compose(
        tmp_path, f"ckpt_path={model_dir}", f"input={images}", f"output={out}", f"scale={SCALE}", "batch_size=3"
    )
    with pytest.raises(DataError, match="corrupt.png") as error:
        load_script("predict").predict(cfg)
    assert "1 input(s)" in str(error.value) and "wide" not in str(error.value)

    model, palette = _tiny_model(4), np.array(generated_palette(4), np.uint8)
    for name, (h, w) in SIZES.items():
        path = next(images.glob(f"{name}.*"))
        labels = np.asarray(Image.open(out / "labels" / f"{name}.png"))
        # Batches of 3 differently sized images, padded together, give each image's own prediction.
        np.testing.assert_array_equal(labels, _expected(model, path))
        colour = np.asarray(Image.open(out / "colour" / f"{name}.png"))
        np.testing.assert_array_equal(colour, palette[labels])
        overlay = np.asarray(Image.open(out / "overlay" / f"{name}.jpg"))
        assert overlay.shape == (h, w, 3)
    assert len(np.unique(np.asarray(Image.open(out / "labels" / "wide.png")))) > 1
    assert sorted(p.name for p in (out / "labels").iterdir()) == sorted(f"{n}.png" for n in SIZES)


@pytest.mark.slow
def test_command_names_unreadable_inputs_and_exits_non_zero(model_dir, images, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "predict.py"),
            f"ckpt_path={model_dir}",
            f"input={images}/*.png",
            f"output={tmp_path / 'out'}",
            "scale=[128,96]",
            "num_workers=1",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert run.returncode == 2, run.stderr
    assert f"skipped cannot read {images / 'corrupt.png'}" in run.stderr + run.stdout
    assert "Traceback" not in run.stderr
    assert "error: 1 input(s) could not be segmented" in run.stderr
    assert sorted(p.name for p in (tmp_path / "out" / "labels").iterdir()) == ["small.png", "square.png", "wide.png"]


@pytest.mark.slow
def test_too_small_images_are_skipped_by_name(model_dir, tmp_path):
    Image.fromarray(np.zeros((12, 300, 3), np.uint8)).save(tmp_path / "strip.png")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "fine.png")
    cfg = _compose(
        tmp_path, f"ckpt_path={model_dir}", f"input={tmp_path}/*.png", f"output={tmp_path / 'out'}", f"scale={SCALE}"
    )
    with pytest.raises(DataError, match="strip.png"):
        load_script("predict").predict(cfg)
    assert (tmp_path / "out" / "labels" / "fine.png").is_file()
    assert not (tmp_path / "out" / "labels" / "strip.png").exists()


@pytest.mark.slow
def test_photos_are_segmented_upright_as_viewers_show_them(model_dir, tmp_path):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 96, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    photo.save(tmp_path / "phone.jpg", exif=exif)
    cfg = _compose(tmp_path, f"ckpt_path={model_dir}", f"input={tmp_path / 'phone.jpg'}", f"output={tmp_path / 'out'}")
    load_script("predict").predict(cfg)
    for kind, name in (("labels", "phone.png"), ("colour", "phone.png"), ("overlay", "phone.jpg")):
        assert Image.open(tmp_path / "out" / kind / name).size == (48, 96)  # (width, height)


@pytest.mark.slow
def test_existing_outputs_are_refused_unless_overwrite(model_dir, images, tmp_path):
    out = tmp_path / "out"
    (out / "colour").mkdir(parents=True)
    (out / "colour" / "wide.png").write_bytes(b"user file")
    args = [f"ckpt_path={model_dir}", f"input={images}/wide.png", f"output={out}", f"scale={SCALE}"]
    with pytest.raises(ConfigError, match=r"already holds 1 file.*wide.png.*overwrite=true"):
        load_script("predict").predict(_compose(tmp_path, *args))
    assert (out / "colour" / "wide.png").read_bytes() == b"user file"
    assert load_script("predict").predict(_compose(tmp_path, *args, "overwrite=true")) == 1
    assert np.asarray(Image.open(out / "colour" / "wide.png")).shape == (96, 128, 3)


@pytest.mark.slow
def test_dataset_config_gives_dataset_ids_palette_and_test_scale(tmp_path, images):
    model = _tiny_model(7)
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "out"
    cfg = _compose(
        tmp_path,
        f"ckpt_path={tmp_path / 'model'}",
        f"input={images}/wide.png",
        f"output={out}",
        "data=sample",
        f"data.root={tmp_path / 'sample'}",
        "data.dataset.num_train=1",
        "data.dataset.num_val=1",
        "data.scale=[64,48]",
    )
    load_script("predict").predict(cfg)
    train_ids = _expected(model, images / "wide.png", scale=[64, 48])
    # The sample scenes use ADE20K's encoding: dataset id = training id + 1 (0 = unlabelled).
    np.testing.assert_array_equal(np.asarray(Image.open(out / "labels" / "wide.png")), train_ids + 1)
    colour = np.asarray(Image.open(out / "colour" / "wide.png"))
    np.testing.assert_array_equal(colour, np.array(SAMPLE_PALETTE, np.uint8)[train_ids])


def test_dataset_with_other_class_count_is_refused(model_dir, images, tmp_path):
    cfg = _compose(
        tmp_path,
        f"ckpt_path={model_dir}",
        f"input={images}",
        f"output={tmp_path / 'out'}",
        "data=sample",
        f"data.root={tmp_path / 'sample'}",
        "data.dataset.num_train=1",
        "data.dataset.num_val=1",
    )
    with pytest.raises(CheckpointError, match="predicts 4 classes but SampleScenes has 7"):
        load_script("predict").predict(cfg)


def test_settings_come_from_the_training_run_unless_overridden(tmp_path):
    model = _tiny_model(3)
    run = tmp_path / "runs" / "2024-01-01_00-00-00"
    (run / "checkpoints").mkdir(parents=True)
    (run / ".hydra").mkdir()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "segformer": model.config}, run / "checkpoints" / "best.ckpt")
    data = {
        "scale": [64, 48],
        "size_divisor": 16,
        "inference": {"mode": "slide", "crop_size": [32, 32], "stride": [24, 24]},
    }
    OmegaConf.save({"data": data}, run / ".hydra" / "config.yaml")

    predictor = load_predictor(run / "checkpoints" / "best.ckpt", device="cpu")
    assert predictor.preprocessing.scale == (64, 48) and predictor.preprocessing.size_divisor == 16
    assert predictor.inference == InferenceConfig("slide", (32, 32), (24, 24))
    assert predictor.run_dir == run and predictor.class_names == ["thing0", "thing1", "thing2"]

    overridden = load_predictor(
        run / "checkpoints" / "best.ckpt", scale=[96, 80], inference={"mode": "whole", "flip": True}, device="cpu"
    )
    assert overridden.preprocessing.scale == (96, 80) and overridden.preprocessing.size_divisor == 16
    assert overridden.inference.mode == "whole" and overridden.inference.flip

    model.save_pretrained(tmp_path / "plain")
    fresh = load_predictor(tmp_path / "plain", device="cpu")
    assert fresh.run_dir is None and fresh.preprocessing.scale == (2048, 512) and fresh.inference == InferenceConfig()


def test_inputs_are_image_files_of_a_file_folder_or_glob(images, tmp_path):
    assert [p.name for p in find_images(images)] == ["corrupt.png", "small.png", "square.png", "tall.jpg", "wide.png"]
    assert [p.name for p in find_images(f"{images}/**/*.png")] == [
        "corrupt.png",
        "inner.png",
        "small.png",
        "square.png",
        "wide.png",
    ]
    assert find_images(images / "tall.jpg") == [images / "tall.jpg"]
    with pytest.raises(DataError, match="matches no image files"):
        find_images(f"{images}/*.gif")
    with pytest.raises(DataError, match="does not exist"):
        find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        find_images(tmp_path / "empty")


def test_inputs_writing_the_same_outputs_are_refused(model_dir, images, tmp_path):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "wide.jpg")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "wide.png")
    cfg = _compose(tmp_path, f"ckpt_path={model_dir}", f"input={tmp_path}/wide.*", f"output={tmp_path / 'out'}")
    with pytest.raises(DataError, match="same file name.*wide.jpg and .*wide.png"):
        load_script("predict").predict(cfg)
