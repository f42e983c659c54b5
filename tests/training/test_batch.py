"""The recipe's global batch on any number of devices: the per-device batch and accumulation
derived from it, explicit settings winning, the line stating it, and real runs that keep it."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from PIL import Image

from segformer import cli
from segformer.errors import ConfigError
from segformer.training.batch import configure_batch, count_devices, derive, plan_batch
from helpers import ROOT, load_script, tiny_sample_overrides

CONFIGS = ROOT / "configs"


@pytest.mark.parametrize(
    "global_batch, processes, max_per_device, expected",
    [
        (16, 1, None, (16, 1)),
        (16, 2, None, (8, 1)),
        (16, 8, None, (2, 1)),
        (16, 16, None, (1, 1)),  # 2 nodes x 8 GPUs
        (8, 8, None, (1, 1)),
        (16, 1, 4, (4, 4)),
        (16, 2, 4, (4, 2)),
        (16, 8, 1, (1, 2)),
        (16, 1, 3, (2, 8)),  # exact beats a bigger per-device batch
        (16, 4, 3, (2, 2)),
    ],
)
def test_derivation_keeps_the_global_batch(global_batch, processes, max_per_device, expected):
    per_device, accumulate = derive(global_batch, processes, max_per_device)
    assert (per_device, accumulate) == expected
    assert per_device * processes * accumulate == global_batch
    assert max_per_device is None or per_device <= max_per_device


def test_when_no_split_is_exact_the_closest_global_batch():
    assert derive(16, 3) == (5, 1)  # 15: 3 x 5; 18 would be further
    assert derive(16, 32) == (1, 1)  # 32 processes cannot take fewer than 32 images


def test_the_line_states_the_split():
    assert str(plan_batch(16, devices=2, max_per_device=4)) == (
        "global batch 16 = 2 devices x 4 per device x 2 accumulation steps"
    )
    assert str(plan_batch(16, devices=4, num_nodes=2)) == (
        "global batch 16 = 2 nodes x 4 devices x 2 per device x 1 accumulation step"
    )
    assert str(plan_batch(8, devices=1)) == "global batch 8 = 1 device x 8 per device x 1 accumulation step"


def test_explicit_settings_win_and_the_line_says_the_global_batch_then():
    plan = plan_batch(16, devices=2, per_device=2)
    assert (plan.per_device, plan.accumulate, plan.global_batch) == (2, 1, 4)
    assert str(plan).endswith("= 2 devices x 2 per device x 1 accumulation step (not the recipe's global_batch_size=16)")
    plan = plan_batch(16, devices=2, accumulate=2)
    assert (plan.per_device, plan.accumulate, plan.global_batch) == (4, 2, 16)
    assert plan_batch(None, devices=3, per_device=2).global_batch == 6
    with pytest.raises(ConfigError, match="global_batch_size"):
        plan_batch(None, devices=1)
    with pytest.raises(ConfigError, match="data.batch_size=8 is larger than max_batch_per_device=4"):
        plan_batch(16, devices=1, per_device=8, max_per_device=4)


def test_devices_are_counted_as_lightning_counts_them():
    assert count_devices("cpu", 3) == 3
    assert count_devices("cpu", "auto") == 1
    assert count_devices("auto", "auto") == (torch.cuda.device_count() if torch.cuda.is_available() else 1)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.accelerator=gpu asks for a GPU"):
            count_devices("gpu", 1)


def _ade20k(root: Path, size: tuple[int, int] = (48, 64)) -> Path:
    """A tiny ADEChallengeData2016 tree: 2 training and 1 validation image."""
    rng = np.random.default_rng(0)
    for folder, count in (("training", 2), ("validation", 1)):
        for kind in ("images", "annotations"):
            (root / "ADEChallengeData2016" / kind / folder).mkdir(parents=True)
        for i in range(count):
            name = f"ADE_{folder}_{i:08d}"
            pixels = rng.integers(0, 255, (*size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "ADEChallengeData2016" / "images" / folder / f"{name}.jpg")
            mask = rng.integers(0, 151, size, dtype=np.uint8)
            Image.fromarray(mask).save(root / "ADEChallengeData2016" / "annotations" / folder / f"{name}.png")
    return root


def test_the_paper_setting_composes_for_one_cpu_process(tmp_path):
    cfg = cli.compose(CONFIGS, "train", ["model=b2", "data=ade20k"], run_dir=tmp_path / "run")
    assert cfg.global_batch_size == 16 and cfg.data.batch_size is None
    plan = configure_batch(cfg)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 1
    assert plan.global_batch == 16 and plan.devices == devices
    assert cfg.data.batch_size * devices * cfg.trainer.accumulate_grad_batches == 16
    assert cfg.trainer.sync_batchnorm is (devices > 1)
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    assert trainer.num_devices == devices and trainer.accumulate_grad_batches == cfg.trainer.accumulate_grad_batches

    cfg = cli.compose(CONFIGS, "train", ["model=b2", "data=ade20k", "max_batch_per_device=4"], run_dir=tmp_path / "r")
    assert str(configure_batch(cfg)).startswith("global batch 16 = ")
    assert cfg.data.batch_size <= 4


@pytest.mark.slow
def test_python_train_py_model_b2_data_ade20k_starts_on_one_cpu_process(tmp_path, caplog):
    """The README's first command, on a tiny ADE20K tree, from scratch, for one step."""
    root = _ade20k(tmp_path / "ade")
    cfg = cli.compose(
        CONFIGS,
        "train",
        [
            "model=b2", "data=ade20k", f"data.root={root}", "model.pretrained=null", "trainer.max_steps=1",
            "data.crop_size=[32,32]", "data.scale=[64,48]", "data.num_workers=0", "data.augment.ratio_range=[1.0,1.0]",
            "callbacks.rich_progress_bar=null", "callbacks.rich_model_summary=null", "logger=csv",
        ],
        run_dir=tmp_path / "run",
    )
    with caplog.at_level(logging.INFO):
        load_script("train").train(cfg)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 1  # one CPU process here
    assert str(plan_batch(16, devices)) in caplog.text
    assert devices > 1 or "global batch 16 = 1 device x 16 per device x 1 accumulation step" in caplog.text
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


def _sample_run(tmp_path: Path, name: str, *overrides: str) -> tuple[str, dict]:
    tiny = [o for o in tiny_sample_overrides(tmp_path / "sample", num_train=16, num_val=2) if "batch_size=" not in o]
    run = tmp_path / name
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE")}
    result = subprocess.run(
        [
            sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={run}", *tiny, "trainer.max_steps=2",
            "trainer.val_check_interval=2", "trainer.log_every_n_steps=1", "callbacks.rich_model_summary=null",
            "callbacks.rich_progress_bar=null", "logger=csv", *overrides,
        ],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr, torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.slow
def test_two_ddp_processes_and_one_accumulating_process_train_with_the_same_global_batch(tmp_path):
    ddp, ddp_checkpoint = _sample_run(tmp_path, "ddp", "trainer=ddp_cpu")
    assert "global batch 8 = 2 devices x 4 per device x 1 accumulation step" in ddp
    single, checkpoint = _sample_run(tmp_path, "single", "trainer=cpu", "max_batch_per_device=2")
    assert "global batch 8 = 1 device x 2 per device x 4 accumulation steps" in single
    for saved in (ddp_checkpoint, checkpoint):
        assert saved["global_step"] == 2
        # The schedule counts optimizer steps (2), not the 8 batches the accumulating run read.
        (scheduler,) = saved["lr_schedulers"]
        assert scheduler["last_epoch"] == 2
