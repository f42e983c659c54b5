"""The real configs: defaults, paper settings, the overrides users type, and config errors."""

import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from lightning.pytorch.callbacks import (
    DeviceStatsMonitor,
    LearningRateMonitor,
    ModelCheckpoint,
    RichModelSummary,
    ThroughputMonitor,
)
from omegaconf import OmegaConf

from segformer import SegFormer, cli
from segformer.model.presets import PRESETS
from segformer.training.curves import TrainingCurves
from segformer.training.dashboards import StepProgressBar, ValidationDashboard, batch_images
from segformer.errors import DataError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


@pytest.fixture
def compose(tmp_path):
    def _compose(name, *overrides):
        return cli.compose(CONFIGS, name, overrides, run_dir=tmp_path / "run")

    return _compose


def _plain(cfg):
    return OmegaConf.to_container(cfg, resolve=True)


def test_default_training_is_b0_on_the_sample_scenes(compose, tmp_path):
    cfg = compose("train")
    assert cfg.data.dataset._target_ == "segformer.data.SampleScenes"
    assert cfg.model.variant == "b0" and cfg.model.pretrained is None
    assert cfg.model.num_classes == cfg.data.num_classes
    assert cfg.trainer.max_steps % cfg.trainer.val_check_interval == 0
    assert cfg.trainer.check_val_every_n_epoch is None and cfg.trainer.max_epochs == -1
    assert cfg.paths.output_dir == str(tmp_path / "run")
    assert cfg.callbacks.model_checkpoint.dirpath == str(tmp_path / "run" / "checkpoints")
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == cfg.trainer.val_check_interval
    assert cfg.callbacks.best_checkpoint.monitor == "val/mIoU" and cfg.callbacks.best_checkpoint.mode == "max"
    assert list(cfg.logger) == ["csv"]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_paper_experiments(compose, name):
    cfg = compose("train", f"experiment={name}")
    variant = next(part for part in name.split("_") if part[:1] == "b" and part[1:].isdigit())
    dataset = name[: name.index(f"_{variant}")]
    assert cfg.model.variant == variant
    assert cfg.model.pretrained == f"mit_{variant}_imagenet"
    assert PRESETS[cfg.model.pretrained].hub_id == f"nvidia/mit-{variant}"
    assert cfg.trainer.max_steps == (80_000 if dataset == "coco_stuff" else 160_000)
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.head_lr_mult) == (6e-5, 0.01, 10.0)
    assert (cfg.scheduler.warmup_iters, cfg.scheduler.warmup_ratio, cfg.scheduler.power) == (1500, 1e-6, 1.0)
    # The paper's global batch, on whatever devices the run has (segformer/training/batch.py).
    total_batch = cfg.global_batch_size
    assert cfg.data.batch_size is None and cfg.trainer.devices == "auto" and cfg.trainer.sync_batchnorm is None
    if dataset in ("ade20k", "coco_stuff"):
        assert cfg.data.num_classes == (150 if dataset == "ade20k" else 171) and total_batch == 16
        assert cfg.data.inference.mode == "whole"
        assert list(cfg.data.crop_size) == ([640, 640] if name.endswith("640") else [512, 512])
    else:
        assert cfg.data.num_classes == 19 and total_batch == 8
        assert list(cfg.data.crop_size) == [1024, 1024]
        assert cfg.data.inference.mode == "slide" and list(cfg.data.inference.stride) == [768, 768]


@pytest.mark.slow
@pytest.mark.parametrize("data, variant", [("ade20k", "b2"), ("cityscapes", "b0"), ("coco_stuff", "b5")])
def test_choosing_data_and_model_gives_the_paper_setting(compose, data, variant):
    by_choice = compose("train", f"model={variant}", f"data={data}")
    by_experiment = compose("train", f"experiment={data}_{variant}")
    assert _plain(by_choice) == _plain(by_experiment)


def test_overrides_users_type(compose):
    cfg = compose(
        "train",
        "model=b2",
        "data=ade20k",
        "data.root=/data/ade",
        "trainer.max_steps=1000",
        "data.batch_size=4",
        "data.crop_size=[512,512]",
        "optimizer.lr=1e-4",
        "ckpt_path=/runs/x/checkpoints/last.ckpt",
        "seed=7",
    )
    assert cfg.data.root == "/data/ade" and cfg.data.batch_size == 4 and list(cfg.data.crop_size) == [512, 512]
    assert cfg.trainer.max_steps == 1000 and cfg.optimizer.lr == 1e-4 and cfg.seed == 7
    assert cfg.ckpt_path == "/runs/x/checkpoints/last.ckpt"
    # A run shorter than the paper's validation interval still validates and checkpoints at its end.
    cli.fit_intervals_to_run(cfg)
    assert cfg.trainer.val_check_interval == 1000
    assert cfg.callbacks.model_checkpoint.every_n_train_steps == 1000


def test_eval_config_takes_the_dataset_inference_and_overrides(compose):
    cfg = compose("eval", "ckpt_path=x.ckpt", "data=cityscapes", "data.inference.mode=whole")
    assert cfg.data.inference.mode == "whole" and cfg.save_predictions is False
    cfg = compose("eval", "ckpt_path=x.ckpt", "data.inference.scales=[0.75,1.0,1.25]", "data.inference.flip=true")
    assert list(cfg.data.inference.scales) == [0.75, 1.0, 1.25] and cfg.data.inference.flip


@pytest.mark.slow
def test_training_objects_instantiate(compose):
    cfg = compose("train", "callbacks=[default,lr_monitor]")
    model = SegFormer("b0", num_classes=3)
    optimizer = hydra.utils.instantiate(cfg.optimizer)(model)
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 4
    scheduler = hydra.utils.instantiate(cfg.scheduler)(optimizer, 100)
    assert isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR)
    callbacks = cli.instantiate_callbacks(cfg.callbacks, has_logger=False)
    assert [type(c) for c in callbacks] == [
        ModelCheckpoint,
        ModelCheckpoint,
        StepProgressBar,
        RichModelSummary,
        ValidationDashboard,
        ThroughputMonitor,
        TrainingCurves,
    ]
    assert callbacks[-2].batch_size_fn is batch_images
    assert cli.best_checkpoint(callbacks, "val/mIoU") is callbacks[1]
    # With a logger: the learning rates and (on GPUs; nothing on CPU) the device statistics too.
    with_logger = [type(c) for c in cli.instantiate_callbacks(cfg.callbacks, has_logger=True)]
    needs_logger = (DeviceStatsMonitor, LearningRateMonitor)
    assert [t for t in with_logger if t not in needs_logger] == [type(c) for c in callbacks]
    assert set(needs_logger) <= set(with_logger)
    for choice in ("default", "cpu", "ddp_cpu"):
        trainer = hydra.utils.instantiate(compose("train", f"trainer={choice}").trainer, logger=False)
        assert trainer.max_steps == cfg.trainer.max_steps


def test_wandb_logger_never_asks_for_a_key(compose, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    (logger,) = cli.instantiate_loggers(compose("train", "logger=wandb").logger)
    assert logger._offline
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    (logger,) = cli.instantiate_loggers(compose("train", "logger=wandb").logger)
    assert not logger._offline


def _run(monkeypatch, capsys, tmp_path, config_name, *overrides, task=lambda cfg: None):
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", [f"{config_name}.py", f"hydra.run.dir={tmp_path / 'run'}", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(task, CONFIGS, config_name)
    err = capsys.readouterr().err
    assert exit_info.value.code == cli.USER_ERROR_EXIT
    assert "Traceback" not in err and err.startswith("error: ")
    return err


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, expected",
    [
        ("model=b9", ["'model'", "b0, b1, b2, b3, b4, b5"]),
        ("experiment=ade20k_b7", ["ade20k_b0", "cityscapes_b5", "ade20k_b5_640"]),
        ("optimizer.lrr=1", ["'optimizer.lrr'", "Did you mean 'lr'?", "lr, betas, eps, weight_decay"]),
        ("trainer.max_step=5", ["Did you mean 'max_steps'?", "val_check_interval"]),
        ("seeed=1", ["Did you mean 'seed'?", "ckpt_path", "optimizer"]),
        ("data.crop_size=[512,512", ["Could not parse the override 'data.crop_size=[512,512'"]),
    ],
)
def test_config_mistakes_end_with_one_message(monkeypatch, capsys, tmp_path, override, expected):
    err = _run(monkeypatch, capsys, tmp_path, "train", override)
    for text in expected:
        assert text in err


def test_missing_required_values_are_named(monkeypatch, capsys, tmp_path):
    err = _run(monkeypatch, capsys, tmp_path, "eval", "data=folder")
    assert "ckpt_path" in err and "data.num_classes" in err


@pytest.mark.slow
def test_user_errors_from_the_run_end_with_their_message(monkeypatch, capsys, tmp_path):
    def task(cfg):
        raise DataError("No images in /nowhere.")

    assert _run(monkeypatch, capsys, tmp_path, "train", task=task).strip() == "error: No images in /nowhere."


@pytest.mark.slow
def test_bugs_keep_their_traceback(monkeypatch, tmp_path):
    def task(cfg):
        raise RuntimeError("a bug")

    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")
    monkeypatch.setattr(sys, "argv", ["train.py", f"hydra.run.dir={tmp_path}"])
    with pytest.raises(RuntimeError, match="a bug"):
        cli.run(task, CONFIGS, "train")


@pytest.mark.slow
def test_the_script_reports_a_missing_checkpoint_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == cli.USER_ERROR_EXIT
    assert result.stderr.strip().splitlines() == [
        "error: Missing required value(s): ckpt_path. Set them on the command line: ckpt_path=..."
    ]


def test_messages_of_errors_raised_elsewhere():
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    worker = DataError(
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\nsegformer.errors.DataError: Mask m.png holds values up to 300.\n'
    )
    assert cli.user_error_message(worker) == "Mask m.png holds values up to 300."
    wrapped = hydra.errors.InstantiationException("Error in call to target")
    wrapped.__cause__ = DataError("No images.")
    assert cli.user_error_message(wrapped) == "No images."
    assert cli.user_error_message(MisconfigurationException("You requested gpu: [0]")) == "You requested gpu: [0]"
    assert cli.user_error_message(RuntimeError("bug")) is None


@pytest.mark.slow
def test_a_second_run_in_the_same_folder_keeps_the_first_config(monkeypatch, tmp_path, recwarn):
    """hydra.run.dir through ${paths.log_dir} (${hydra:runtime.cwd}): resolvable in the callback."""
    monkeypatch.chdir(tmp_path)
    seeds = []
    for seed in (1, 2, 3):
        monkeypatch.setattr(sys, "argv", ["train.py", "hydra.run.dir=${paths.log_dir}/again", f"seed={seed}"])
        cli.run(lambda cfg: seeds.append(cfg.seed), CONFIGS, "train")
    assert seeds == [1, 2, 3]
    saved = tmp_path / "logs" / "again" / ".hydra"
    assert OmegaConf.load(saved / "config.yaml").seed == 1
    assert OmegaConf.load(saved / "attempt-2" / "config.yaml").seed == 2
    assert OmegaConf.load(saved / "attempt-3" / "config.yaml").seed == 3
    assert not [w for w in recwarn if "KeepEarlierConfig" in str(w.message)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["trainer.max_steps=40", "trainer.val_check_interval=20"], r"scheduler.warmup_iters=50 >= trainer.max_steps=40: the learning rate never reaches"),
        (["trainer.max_steps=150"], r"trainer.val_check_interval=200 is beyond the run \(trainer.max_steps=150\)"),
        (["data.crop_size=[256,256]"], r"data.crop_size=\[256, 256\] is larger than the rescaled training images"),
    ],
)
def test_recipe_settings_that_defeat_their_purpose_warn(compose, overrides, expected):
    cfg = compose("train", *overrides)
    with pytest.warns(UserWarning, match=expected) as warned:
        cli.fit_intervals_to_run(cfg)
        cli.warn_about_recipe(cfg)
    assert len([w for w in warned if "\n" not in str(w.message)]) == len(warned) == 1


def test_the_paper_recipes_do_not_warn(compose, recwarn):
    for data in ("ade20k", "cityscapes"):
        cfg = compose("train", f"data={data}")
        cli.fit_intervals_to_run(cfg)
        cli.warn_about_recipe(cfg)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
