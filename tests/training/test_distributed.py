"""DDP and SLURM: evaluation split across ranks without padding, a real 2-process CPU training
run (one folder, one set of checkpoints, metrics equal to a 1-process evaluation), SLURM
detection and run folders from its variables, requeued runs resuming, the submitit config."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import OmegaConf

from segformer import cli
from segformer.training import resume, run_folder
from segformer.data.sampler import EvalSampler
from segformer.errors import DataError
from helpers import ROOT, csv_rows, load_script, tiny_sample_overrides

CONFIGS = ROOT / "configs"
SLURM_VARS = (
    "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_STEP_ID",
)


def _tiny(data_root: Path, num_val: int = 2) -> list[str]:
    return [
        *tiny_sample_overrides(data_root, num_train=8, num_val=num_val, val_batch_size=1),
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "callbacks.rich_model_summary=null",
        "callbacks.rich_progress_bar=null",
    ]


@pytest.fixture
def no_slurm(monkeypatch):
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_eval_sampler_puts_every_image_on_exactly_one_rank():
    shards = [list(EvalSampler(range(7), num_replicas=3, rank=r)) for r in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    assert [len(EvalSampler(range(7), num_replicas=3, rank=r)) for r in range(3)] == [3, 2, 2]
    # Without a process group: one process sees everything.
    assert list(EvalSampler(range(3))) == [0, 1, 2]
    with pytest.raises(DataError, match="2 image\\(s\\) but the run has 4 processes"):
        list(EvalSampler(range(2), num_replicas=4, rank=0))


@pytest.mark.slow
def test_two_process_ddp_run_matches_one_process_evaluation(tmp_path, no_slurm):
    # 3 validation images on 2 ranks: a padded sampler would score one image twice.
    overrides = [*_tiny(tmp_path / "sample", num_val=3), "trainer.max_steps=2", "callbacks=[default,dashboard]"]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR", "WORLD_SIZE")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "trainer=ddp_cpu", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "global batch 4 = 2 devices x 2 per device x 1 accumulation step" in result.stdout + result.stderr

    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()  # one folder for both ranks
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    rows = csv_rows(run / "csv" / "metrics.csv")
    ddp = {key: [float(r[f"val/{key}"]) for r in rows if r.get(f"val/{key}")] for key in ("mIoU", "aAcc", "mAcc")}
    assert all(len(values) == 1 for values in ddp.values()), ddp

    # The same weights scored by one process on the same 3 images.
    eval_overrides = [*tiny_sample_overrides(tmp_path / "sample", num_train=8, num_val=3, val_batch_size=1), f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]
    cfg = cli.compose(CONFIGS, "eval", eval_overrides, run_dir=tmp_path / "eval")
    load_script("eval").evaluate(cfg)
    single = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key, (value,) in ddp.items():
        assert value == pytest.approx(single[key], abs=1e-6), key


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "seg"}, "slurm-4242"),
        ({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "seg", "SLURM_STEP_ID": "0"}, "slurm-4242"),
        ({"SLURM_NTASKS": "8", "SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "3"}, "slurm-4242.3"),
        (
            {"SLURM_NTASKS": "1", "SLURM_JOB_ID": "101", "SLURM_ARRAY_JOB_ID": "100", "SLURM_ARRAY_TASK_ID": "1"},
            "slurm-100_1",
        ),
        ({"SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "interactive"}, None),
        ({"SLURM_NTASKS": "2", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "bash"}, None),
        ({"SLURM_JOB_ID": "4242"}, None),
        ({}, None),
    ],
)
def test_slurm_job_name_from_the_environment(env, expected):
    assert run_folder.slurm_job_name(env) == expected


def _output_dir(monkeypatch, tmp_path) -> Path:
    seen = {}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    cli.run(lambda cfg: seen.setdefault("dir", cfg.paths.output_dir), CONFIGS, "train")
    return Path(seen["dir"])


@pytest.mark.slow
def test_under_slurm_every_rank_and_requeue_uses_the_jobs_folder(no_slurm, tmp_path):
    slurm = {
        "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "segformer", "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0",
    }
    for key, value in slurm.items():
        no_slurm.setenv(key, value)
    assert _output_dir(no_slurm, tmp_path) == tmp_path / "logs" / "train" / "runs" / "slurm-4242"
    # Lightning takes the ranks from SLURM (srun started both processes). It also records the
    # rank for its rank-zero-only logging: restored after the test.
    no_slurm.setattr(rank_zero_only, "rank", rank_zero_only.rank)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False)
    assert isinstance(trainer._accelerator_connector.cluster_environment, SLURMEnvironment)
    assert (trainer.global_rank, trainer.world_size) == (1, 2)

    no_slurm.setenv("SLURM_JOB_NAME", "interactive")  # salloc: every run gets a fresh folder
    assert _output_dir(no_slurm, tmp_path).name != "slurm-4242"


def test_resume_checkpoint_is_the_newest_left_in_the_run_folder(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=checkpoints, save_last=True),
        ModelCheckpoint(dirpath=checkpoints, monitor="x"),
    ]
    trainer = Trainer(default_root_dir=tmp_path, logger=False, callbacks=callbacks)
    assert resume.resume_checkpoint(trainer, callbacks) is None
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"")
    assert resume.resume_checkpoint(trainer, callbacks) == str(checkpoints / "last.ckpt")
    # Lightning's SLURM signal handler saved later, twice: the highest number wins.
    for n in (1, 2, 10):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"")
    os.utime(checkpoints / "last.ckpt", (1, 1))
    assert resume.resume_checkpoint(trainer, callbacks) == str(tmp_path / "hpc_ckpt_10.ckpt")


@pytest.mark.slow
def test_a_requeued_run_resumes_from_its_folder(tmp_path, no_slurm):
    train = load_script("train").train
    base = [*_tiny(tmp_path / "sample"), "logger=csv"]
    cfg = cli.compose(CONFIGS, "train", [*base, "trainer.max_steps=2"], run_dir=tmp_path / "run")
    train(cfg)
    # The requeued job: same folder, no ckpt_path; it continues at step 2.
    cfg = cli.compose(CONFIGS, "train", [*base, "trainer.max_steps=4"], run_dir=tmp_path / "run")
    train(cfg)
    rows = csv_rows(tmp_path / "run" / "csv" / "metrics.csv")
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss")) == [2, 3]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


def test_slurm_launcher_config_composes(no_slurm, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    overrides = ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["max_num_timeout"] > 0  # time limits requeue
    from hydra.utils import get_class

    assert get_class(launcher["_target_"]).__name__ == "SlurmLauncher"
