"""segformer.export: the transformers folder runs in transformers' pipeline with our predictions,
the ONNX model matches PyTorch under onnxruntime at several sizes, and the model card tells the
variant, dataset, classes, eval scores and training config."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from segformer import SegFormer, cli
from segformer.errors import ConfigError
from segformer.export import export
from segformer.inference.export import onnx_parity
from segformer.inference.predictor import find_images, load_predictor, predict_images

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
NAMES = ["background", "stripes", "dots", "checkers", "disc", "box", "triangle"]
SCALE = (128, 96)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A train.py run folder (checkpoints/best.ckpt, .hydra/config.yaml) and an eval.py run of it."""
    base = tmp_path_factory.mktemp("logs")
    torch.manual_seed(0)
    model = SegFormer("b0", num_classes=len(NAMES), id2label=dict(enumerate(NAMES)))
    # A spread-out classifier gives label maps with several classes and many boundaries.
    torch.nn.init.normal_(model.decode_head.classifier.weight, std=0.5)
    folder = base / "train" / "runs" / "2024-05-01_12-00-00"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / ".hydra").mkdir()
    checkpoint = folder / "checkpoints" / "best.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "segformer": model.config}, checkpoint)
    data = {
        "_target_": "segformer.data.SegDataModule",
        "dataset": {"_target_": "segformer.data.SampleScenes", "_partial_": True},
        "scale": list(SCALE),
        "inference": {"mode": "whole"},
    }
    OmegaConf.save(
        {"data": data, "model": {"variant": "b0"}, "optimizer": {"lr": 6e-5}}, folder / ".hydra" / "config.yaml"
    )
    scores = {
        "aAcc": 0.9,
        "mIoU": 0.5,
        "mAcc": 0.6,
        "per_class": {name: {"IoU": k / 10, "Acc": 0.5} for k, name in enumerate(NAMES)},
        "checkpoint": str(checkpoint),
        "split": "val",
        "inference": {"mode": "whole"},
    }
    (base / "eval" / "runs" / "older").mkdir(parents=True)
    (base / "eval" / "runs" / "older" / "metrics.json").write_text(json.dumps({**scores, "checkpoint": "other.ckpt"}))
    (base / "eval" / "runs" / "latest").mkdir(parents=True)
    (base / "eval" / "runs" / "latest" / "metrics.json").write_text(json.dumps(scores))
    return folder


def _export(run: Path, tmp_path: Path, *overrides: str) -> Path:
    cfg = cli.compose(
        CONFIGS,
        "export",
        [f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", f"paths.log_dir={run.parents[2]}", *overrides],
        run_dir=tmp_path / "run",
    )
    return export(cfg)


def _noise_image(path: Path, height: int, width: int) -> Path:
    rng = np.random.default_rng(1)
    ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None] * np.ones((height, 1, 3), np.float32)
    Image.fromarray(np.clip(ramp + rng.normal(0, 40, (height, width, 3)), 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.mark.slow
def test_transformers_pipeline_gives_the_masks_of_our_predict(run, tmp_path):
    # The keep-ratio processor size (shortest_edge + longest_edge) needs transformers 5.
    transformers = pytest.importorskip("transformers", minversion="5")
    folder = _export(run, tmp_path, f"output={tmp_path / 'hf'}")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    processor_config = json.loads((folder / "preprocessor_config.json").read_text())
    assert processor_config["size"] == {"shortest_edge": 96, "longest_edge": 128}
    np.testing.assert_allclose(processor_config["image_mean"], [0.485, 0.456, 0.406], atol=1e-12)
    np.testing.assert_allclose(processor_config["image_std"], [0.229, 0.224, 0.225], atol=1e-12)
    assert processor_config["do_reduce_labels"] is False  # no data= given: the ids are unknown

    # 96x128 already has the test size [128, 96]: both pipelines feed the model the same pixels.
    image = _noise_image(tmp_path / "photo.png", 96, 128)
    predictor = load_predictor(run / "checkpoints" / "best.ckpt", device="cpu")
    predict_images(predictor, find_images(image), tmp_path / "ours", num_workers=0, progress=False)
    ours = np.asarray(Image.open(tmp_path / "ours" / "labels" / "photo.png"))
    theirs = np.full(ours.shape, -1)
    for segment in transformers.pipeline("image-segmentation", model=str(folder))(str(image)):
        theirs[np.asarray(segment["mask"]) > 0] = NAMES.index(segment["label"])
    assert len(np.unique(ours)) >= 4
    # transformers normalises (x/255 - m/255)/(s/255) and computes LayerNorm with eps 1e-5 (this
    # model: 1e-6); both move logits by ~1e-6, which could flip only a pixel whose two best
    # classes are that close. In practice none is.
    assert (theirs != ours).mean() <= 1e-3

    # The processor keeps the aspect ratio as our test transform does (150x90 -> 128x77).
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder))
    tall = Image.open(_noise_image(tmp_path / "tall.png", 150, 90))
    assert tuple(processor(tall, return_tensors="pt")["pixel_values"].shape) == (1, 3, 128, 77)
    ours_tall = predictor.preprocessing.transforms()[0](image=np.asarray(tall))["image"]
    assert tuple(ours_tall.shape) == (3, 128, 77)


@pytest.mark.slow
def test_onnx_matches_pytorch_at_two_sizes(run, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    folder = _export(run, tmp_path, "format=onnx", f"output={tmp_path / 'onnx'}", "onnx.check_sizes=[[64,96]]")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.onnx",
        "preprocessor_config.json",
    ]
    session = onnxruntime.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (pixel_values,) = session.get_inputs()
    assert pixel_values.name == "pixel_values" and pixel_values.shape == ["batch", 3, "height", "width"]

    model = SegFormer.from_pretrained(run / "checkpoints" / "best.ckpt")
    difference, magnitude = onnx_parity(model, folder / "model.onnx", [(96, 128), (75, 50)])
    assert difference < 1e-4 and magnitude > 5  # logits as large as a trained model's
    logits = session.run(["logits"], {"pixel_values": np.zeros((3, 3, 75, 50), np.float32)})[0]
    assert logits.shape == (3, len(NAMES), 19, 13)
    assert json.loads((folder / "config.json").read_text())["id2label"]["4"] == "disc"


@pytest.mark.slow
def test_model_card_has_variant_dataset_classes_scores_and_training_config(run, tmp_path):
    folder = _export(run, tmp_path, f"output={tmp_path / 'hf'}")
    card = (folder / "README.md").read_text()
    assert "# SegFormer-B0 trained on SampleScenes" in card
    assert "| Classes | 7 |" in card
    assert "fit 128x96 (long x short side)" in card
    # The scores of the newest eval run of this checkpoint, not of another checkpoint's.
    assert str(run.parents[2] / "eval" / "runs" / "latest" / "metrics.json") in card
    assert "| 50.00 | 60.00 | 90.00 |" in card
    assert "| 4 | disc | 40.00 |" in card
    assert "optimizer:\n  lr: 6.0e-05" in card
    assert "LayerNorm eps 1e-06" in card

    explicit = tmp_path / "scores.json"
    explicit.write_text(json.dumps({"aAcc": 0.99, "mIoU": 0.75, "mAcc": 0.8, "per_class": {}}))
    card = (_export(run, tmp_path, f"output={tmp_path / 'again'}", f"metrics={explicit}") / "README.md").read_text()
    assert "| 75.00 | 80.00 | 99.00 |" in card


def test_dataset_config_sets_label_reduction_and_names(run, tmp_path):
    folder = _export(
        run,
        tmp_path,
        f"output={tmp_path / 'hf'}",
        "data=sample",
        f"data.root={tmp_path / 'sample'}",
        "data.dataset.num_train=1",
        "data.dataset.num_val=1",
    )
    # The sample scenes are stored like ADE20K (0 = unlabelled, class k as k + 1).
    assert json.loads((folder / "preprocessor_config.json").read_text())["do_reduce_labels"] is True
    # data=sample's own scale [192, 160] wins over the training run's.
    assert json.loads((folder / "preprocessor_config.json").read_text())["size"] == {
        "shortest_edge": 160,
        "longest_edge": 192,
    }


def test_existing_exports_and_unknown_formats_are_refused(run, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "README.md").write_text("mine")
    with pytest.raises(ConfigError, match="already holds README.md.*overwrite=true"):
        _export(run, tmp_path, f"output={tmp_path / 'out'}")
    assert (tmp_path / "out" / "README.md").read_text() == "mine"
    with pytest.raises(ConfigError, match="format must be one of"):
        _export(run, tmp_path, f"output={tmp_path / 'other'}", "format=tflite")
    with pytest.raises(ConfigError, match="metrics='nowhere.json' is not a file"):
        _export(run, tmp_path, f"output={tmp_path / 'other'}", "metrics=nowhere.json")
