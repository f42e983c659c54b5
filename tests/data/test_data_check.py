"""python -m segformer.data.check: every broken file named, the class histogram, the exit status."""

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from segformer.data import FolderDataset, SegDataModule
from segformer import cli
from segformer.data.check import CONFIG_DIR, check, check_dataset, print_report
from segformer.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _pair(root: Path, split: str, name: str, image: np.ndarray, mask: np.ndarray | None) -> None:
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "masks" / split).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "images" / split / f"{name}.png")
    if mask is not None:
        Image.fromarray(mask).save(root / "masks" / split / f"{name}.png")


def _clean(root: Path) -> None:
    """train: 2 images; val: 1 image. Masks: left half class 0, right half class 1, one ignored row."""
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 1
    mask[0] = 255
    for split, names in (("train", ["a", "b"]), ("val", ["c"])):
        for name in names:
            _pair(root, split, name, np.full((8, 8, 3), 100, np.uint8), mask)


def _module(root: Path) -> SegDataModule:
    return SegDataModule(
        functools.partial(FolderDataset, num_classes=3), str(root), 3, num_workers=0, crop_size=[8, 8], scale=[8, 8]
    )


def test_a_clean_dataset_has_no_problem_and_exact_class_pixels(tmp_path):
    _clean(tmp_path)
    reports = check_dataset(_module(tmp_path))
    assert [(r.split, r.images, r.problems) for r in reports] == [("train", 2, []), ("val", 1, [])]
    # 8x8 masks: row 0 ignored, then 7 rows x 4 columns of each class; class 2 absent.
    assert reports[0].pixels.tolist() == [56, 56, 0, 16]
    assert reports[1].pixels.tolist() == [28, 28, 0, 8]
    console = Console(record=True, width=200)
    print_report(reports, ["road", "car", "sky"], console)
    text = console.export_text()
    assert "No problem found." in text and "no pixel of 1 class(es): sky" in text
    assert "43.75" in text  # 28 of 64 pixels are road


def test_every_broken_file_is_named(tmp_path):
    _clean(tmp_path)
    good = np.zeros((8, 8), np.uint8)
    _pair(tmp_path, "train", "wrong_size", np.zeros((8, 8, 3), np.uint8), np.zeros((6, 8), np.uint8))
    _pair(tmp_path, "train", "bad_value", np.zeros((8, 8, 3), np.uint8), np.full((8, 8), 7, np.uint8))
    _pair(tmp_path, "train", "truncated", np.zeros((8, 8, 3), np.uint8), good)
    data = (tmp_path / "images/train/truncated.png").read_bytes()
    (tmp_path / "images/train/truncated.png").write_bytes(data[: len(data) // 2])
    _pair(tmp_path, "val", "lonely", np.zeros((8, 8, 3), np.uint8), None)

    train, val = check_dataset(_module(tmp_path))
    assert train.images == 5 and len(train.problems) == 3
    problems = "\n".join(train.problems)
    assert "bad_value.png holds value(s) [7]" in problems
    assert "wrong_size.png is 6x8" in problems
    assert "Cannot read image" in problems and "truncated.png" in problems
    # The bad samples' pixels are not counted; the two clean ones are.
    assert train.pixels.tolist() == [56, 56, 0, 16]
    assert val.images == 0 and len(val.problems) == 1 and "without a mask" in val.problems[0]
    assert "lonely.png" in val.problems[0]


def _check_command(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "segformer.data.check", *overrides],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
    )


@pytest.mark.slow
def test_the_command_exits_1_on_problems_and_0_when_clean(tmp_path):
    _clean(tmp_path / "data")
    args = ["data=folder", f"data.root={tmp_path / 'data'}", "data.num_classes=3", "data.num_workers=0"]
    clean = _check_command(tmp_path, *args)
    assert clean.returncode == 0, clean.stderr
    assert "No problem found." in clean.stdout

    (tmp_path / "data/masks/train/b.png").write_bytes(b"not a png")
    broken = _check_command(tmp_path, *args, "splits=train")
    assert broken.returncode == 1
    assert "b.png" in broken.stdout and "1 problem(s) found." in broken.stdout
    assert "Traceback" not in broken.stdout + broken.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data=folder", "data.root=/nonexistent/data", "data.num_classes=3"], "/nonexistent/data"),
        (["data=folder"], "data.num_classes"),
        (["data=nosuchdata"], "Valid choices"),
        (["max_listed=all"], "max_listed='all' (max_listed takes a number"),
    ],
)
def test_command_mistakes_end_with_one_message(monkeypatch, capsys, tmp_path, overrides, expected):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", ["check", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(check, CONFIG_DIR, "check")
    err = capsys.readouterr().err
    assert exit_info.value.code == cli.USER_ERROR_EXIT
    assert "Traceback" not in err and err.startswith("error: ") and expected in err


@pytest.mark.slow
def test_training_fails_on_a_bad_sample_or_skips_it_when_asked(tmp_path, caplog):
    _clean(tmp_path)
    (tmp_path / "masks/train/b.png").write_bytes(b"not a png")
    strict = _module(tmp_path)
    strict.batch_size = 2
    with pytest.raises(DataError, match=r"Cannot read mask .*b\.png"):
        next(iter(strict.train_dataloader()))

    lenient = SegDataModule(
        functools.partial(FolderDataset, num_classes=3), str(tmp_path), 3, batch_size=2, num_workers=0,
        crop_size=[8, 8], scale=[8, 8], skip_bad_samples=True,
    )
    with caplog.at_level("WARNING"):
        (batch,) = list(lenient.train_dataloader())
    assert batch["pixel_values"].shape == (2, 3, 8, 8)  # b replaced by the next index (a)
    assert lenient.train_dataloader().dataset.skipped == 0  # a fresh loader counts anew
    assert "Skipped bad training sample (1 in this loader process)" in caplog.text and "b.png" in caplog.text
