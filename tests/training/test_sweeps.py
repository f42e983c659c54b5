"""Sweeps: a Hydra multirun of two jobs (own folders, own closed W&B runs) and an Optuna search
of two trials maximising the val/mIoU that train.py returns."""

import csv
import sys
from pathlib import Path

import hydra
import pytest
import yaml
from packaging.version import Version

from segformer import cli
from helpers import ROOT, load_script, tiny_sample_overrides

CONFIGS = ROOT / "configs"


def _tiny(tmp_path: Path) -> list[str]:
    return [
        *tiny_sample_overrides(tmp_path / "sample", num_train=4, num_val=2),
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "callbacks.rich_model_summary=null",
        "callbacks.rich_progress_bar=null",
    ]


def _sweep(monkeypatch, tmp_path, *overrides) -> list[float | None]:
    """Run ``train.py -m ...`` in this process; returns what each job returned."""
    train = load_script("train").train
    returned = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["train.py", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}", *overrides])
    cli.run(lambda cfg: returned.append(train(cfg)) or returned[-1], CONFIGS, "train")
    return returned


def _best_val(job: Path) -> float:
    with open(job / "csv" / "metrics.csv") as handle:
        return max(float(r["val/mIoU"]) for r in csv.DictReader(handle) if r.get("val/mIoU"))


@pytest.mark.slow
def test_multirun_jobs_get_their_own_folders_and_wandb_runs(monkeypatch, tmp_path):
    import wandb

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc: offline
    returned = _sweep(monkeypatch, tmp_path, "optimizer.lr=1e-4,2e-4", "logger=[csv,wandb]", *_tiny(tmp_path))
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    runs = []
    for job, lr, value in zip(jobs, (1e-4, 2e-4), returned):
        assert (job / "checkpoints" / "last.ckpt").is_file()
        assert yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["optimizer"]["lr"] == lr
        assert value == pytest.approx(_best_val(job))
        (run,) = (job / "wandb").glob("offline-run-*")
        runs.append(run.name.rsplit("-", 1)[1])
    assert runs[0] != runs[1]  # the second job did not log into the first job's run
    assert wandb.run is None


@pytest.mark.slow
def test_optuna_sweep_maximises_the_returned_val_miou(monkeypatch, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper is not installed")
    if Version(hydra.__version__) >= Version("1.4.0.dev0"):
        pytest.skip(
            "hydra-optuna-sweeper 1.3.0 does not work on hydra-core 1.4 "
            "(Key 'infer_relative_search_space' not in 'SamplerConfig')"
        )
    returned = _sweep(
        monkeypatch, tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2", "logger=csv", *_tiny(tmp_path)
    )
    results = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    trials = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1"]
    scores = [_best_val(trial) for trial in trials]
    assert returned == pytest.approx(scores)
    assert results["best_value"] == pytest.approx(max(scores))
    assert set(results["best_params"]) == {"optimizer.lr", "optimizer.weight_decay", "optimizer.head_lr_mult"}
    assert 1e-5 <= results["best_params"]["optimizer.lr"] <= 1e-3
