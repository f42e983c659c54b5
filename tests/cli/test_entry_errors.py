"""Every user mistake on train.py and eval.py ends with one message and exit status 2, without a
traceback, and leaves an existing run folder as it was."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segformer import SegFormer, cli
from segformer.errors import ConfigError
from helpers import malicious_checkpoint

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
import eval as eval_script  # noqa: E402
import train as train_script  # noqa: E402

TASKS = {"train": train_script.train, "eval": eval_script.evaluate}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[str]:
    """Overrides for a tiny sample dataset (written once)."""
    root = tmp_path_factory.mktemp("sample")
    return [f"data.root={root}", "data.dataset.num_train=4", "data.dataset.num_val=2", "data.num_workers=0"]


@pytest.fixture
def run_folder(tmp_path) -> Path:
    """A folder that already holds a run: its config, metrics and a checkpoint."""
    run = tmp_path / "run"
    files = {".hydra/config.yaml": "seed: 1\n", ".hydra/overrides.yaml": "[]\n", "csv/metrics.csv": "step\n0\n"}
    for name, text in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    return run


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _fails(monkeypatch, capsys, script: str, run: Path, *overrides: str) -> str:
    """Run ``script`` in this process on ``overrides``; returns the message it printed."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", [f"{script}.py", f"hydra.run.dir={run}", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(TASKS[script], ROOT / "configs", script)
    err = capsys.readouterr().err
    assert exit_info.value.code == cli.USER_ERROR_EXIT, err
    assert "Traceback" not in err
    assert err.startswith("error: ") and err.count("error: ") == 1, err
    return err


def _folder_dataset(root: Path, splits: dict[str, int]) -> Path:
    for split, count in splits.items():
        (root / "images" / split).mkdir(parents=True)
        (root / "masks" / split).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "images" / split / f"{i}.png")
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / "masks" / split / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "overrides, expected",
    [
        # wrong choices
        (["data=ade21k"], "Valid choices for 'data': ade20k, cityscapes, "),
        (["trainer=tpu"], "Valid choices for 'trainer': cpu, ddp"),
        # wrong types
        (["trainer.max_steps=many"], "trainer.max_steps='many' (trainer.max_steps takes a number"),
        (["data.crop_size=512"], "data.crop_size=512 (data.crop_size takes a list"),
        (["optimizer.lr=fast", "data.batch_size=two"], "optimizer.lr='fast'"),
        (["trainer.precision=17"], "trainer: Precision 17 is invalid"),
        # values out of range, refused where they are read
        (["model.drop_path_rate=2"], "drop_path_rate=2 (model.drop_path_rate) is out of range: it is the probability"),
        (["global_batch_size=0"], "global_batch_size=0 must be a whole number of images (at least 1) or null"),
        pytest.param(
            ["trainer.accelerator=gpu"],
            "trainer.accelerator=gpu asks for a GPU, but this machine has none",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
        # wrong paths
        (["ckpt_path=/nowhere/last.ckpt"], "ckpt_path=/nowhere/last.ckpt does not exist"),
        (["data=folder", "data.num_classes=3", "data.root=/nowhere/data"], "/nowhere/data"),
    ],
)
@pytest.mark.slow
def test_train_mistakes(monkeypatch, capsys, run_folder, data, overrides, expected):
    before = _contents(run_folder)
    if "data=folder" in overrides:
        data = []  # the sample dataset's keys
    err = _fails(monkeypatch, capsys, "train", run_folder, *data, *overrides)
    assert expected in err
    if "data=ade21k" in overrides:
        assert "sample" in err and ", base," not in err  # base.yaml is what the choices extend
    if "optimizer.lr='fast'" in expected:
        assert "data.batch_size='two'" in err  # every wrong value at once
    after = _contents(run_folder)
    assert {name: after[name] for name in before} == before


@pytest.mark.slow
def test_train_refuses_an_unreadable_checkpoint_in_its_run_folder(monkeypatch, capsys, run_folder, data):
    (run_folder / "checkpoints").mkdir()
    (run_folder / "checkpoints" / "last.ckpt").write_bytes(b"half a checkpoint")
    before = _contents(run_folder)
    err = _fails(monkeypatch, capsys, "train", run_folder, *data)
    assert "Cannot read checkpoint" in err and "last.ckpt" in err
    after = _contents(run_folder)
    assert {name: after[name] for name in before} == before
    # This attempt's config went beside the first one, which is untouched.
    assert (run_folder / ".hydra" / "attempt-2" / "config.yaml").is_file()


@pytest.mark.slow
def test_a_dataset_without_the_split_or_without_images(monkeypatch, capsys, tmp_path):
    folder = _folder_dataset(tmp_path / "folder", {"train": 2, "val": 0})
    common = ["data=folder", f"data.root={folder}", "data.num_classes=2", "data.num_workers=0"]
    err = _fails(monkeypatch, capsys, "train", tmp_path / "a", *common)
    assert "FolderDataset split 'val'" in err and "holds no images" in err
    err = _fails(monkeypatch, capsys, "train", tmp_path / "b", *common, "+data.val_split=valid")
    assert str(folder / "images" / "valid") in err and "does not exist" in err
    # ADE20K has no test split.
    err = _fails(monkeypatch, capsys, "eval", tmp_path / "c", "data=ade20k", "+data.test_split=test", "ckpt_path=x")
    assert "ADE20K has no split 'test'" in err and "'train', 'val'" in err


@pytest.mark.slow
def test_eval_mistakes(monkeypatch, capsys, tmp_path, data):
    err = _fails(monkeypatch, capsys, "eval", tmp_path / "a", *data, "ckpt_path=/nowhere/model.ckpt")
    assert "/nowhere/model.ckpt" in err
    torch.manual_seed(0)
    SegFormer("b0", num_classes=19).save_pretrained(tmp_path / "cityscapes_model")
    err = _fails(monkeypatch, capsys, "eval", tmp_path / "b", *data, f"ckpt_path={tmp_path / 'cityscapes_model'}")
    assert "predicts 19 classes but the dataset has 7" in err
    err = _fails(monkeypatch, capsys, "eval", tmp_path / "c", *data, "ckpt_path=x", "data.val_batch_size=big")
    assert "data.val_batch_size='big'" in err


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train", "eval"])
def test_the_scripts_exit_with_one_line(tmp_path, script):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("seed: 1\n")
    result = subprocess.run(
        [sys.executable, str(ROOT / f"{script}.py"), f"hydra.run.dir={run}", "ckpt_path=/nowhere/x.ckpt", "seed=abc"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == cli.USER_ERROR_EXIT
    expected = {
        "train": "error: Wrong type in override(s): seed='abc' (seed takes a number, default 42).",
        "eval": "error: Unknown config key 'seed': the top level has no key 'seed'.",
    }
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(expected[script])
    assert (run / ".hydra" / "config.yaml").read_text() == "seed: 1\n"


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused_by_train_and_eval(monkeypatch, capsys, tmp_path, data):
    marker = tmp_path / "created"
    checkpoint = malicious_checkpoint(tmp_path / "evil.ckpt", marker, via_shell=True)
    err = _fails(monkeypatch, capsys, "eval", tmp_path / "eval", *data, f"ckpt_path={checkpoint}")
    assert str(checkpoint) in err and "could run code" in err
    err = _fails(monkeypatch, capsys, "train", tmp_path / "train", *data, f"ckpt_path={checkpoint}")
    assert str(checkpoint) in err and "Cannot read checkpoint" in err
    assert not marker.exists()


def _cityscapes(root: Path) -> Path:
    for split in ("train", "val"):
        for folder, suffix, channels in (("leftImg8bit", "leftImg8bit", (32, 64, 3)), ("gtFine", "gtFine_labelIds", (32, 64))):
            (root / folder / split / "aachen").mkdir(parents=True)
            Image.fromarray(np.full(channels, 7, np.uint8)).save(root / folder / split / "aachen" / f"aachen_000000_000019_{suffix}.png")
    return root


@pytest.fixture
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.mark.slow
def test_offline_the_pretrained_encoder_is_named_with_the_ways_out(monkeypatch, capsys, tmp_path, offline):
    common = ["data=cityscapes", "data.num_workers=0", "callbacks.rich_model_summary=null"]
    # The wrong data root is named first, before any network work.
    err = _fails(monkeypatch, capsys, "train", tmp_path / "a", *common, f"data.root={tmp_path / 'nowhere'}")
    assert str(tmp_path / "nowhere") in err and "model.pretrained" not in err
    err = _fails(monkeypatch, capsys, "train", tmp_path / "b", *common, f"data.root={_cityscapes(tmp_path / 'cs')}")
    assert "model.pretrained=" in err and "nvidia/mit-b0" in err
    assert "model.pretrained=<transformers folder or .pth file>" in err and "model.pretrained=null" in err


@pytest.mark.parametrize(
    "setting, expected",
    [
        ({"drop_path_rate": 1.0}, r"drop_path_rate=1.0 \(model.drop_path_rate\) is out of range.*\[0, 1\)"),
        ({"drop_path_rate": -0.1}, r"model.drop_path_rate"),
        ({"decoder_dropout": 1.5}, r"decoder_dropout=1.5 \(model.decoder_dropout\) is out of range.*\[0, 1\)"),
        ({"norm_eps": 0.0}, r"norm_eps=0.0 \(model.norm_eps\) must be > 0"),
    ],
)
def test_out_of_range_model_settings_are_refused_where_they_are_read(setting, expected):
    with pytest.raises(ConfigError, match=expected):
        SegFormer("b0", num_classes=2, **setting)
