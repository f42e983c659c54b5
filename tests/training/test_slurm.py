"""SLURM for real: a one-machine cluster (scripts/slurm/cluster.sh, one per test session) runs
scripts/slurm/train.sbatch as a cluster user would: two DDP tasks in one run folder, a job
requeued mid-run that resumes and ends with the weights of an uninterrupted one, a job that
reaches its time limit, saves Lightning's HPC checkpoint, requeues itself and finishes, and a
Hydra sweep through hydra/launcher=slurm (submitit). Skipped where SLURM cannot be installed or
started (the cluster needs root and apt-get); CI runs them as root."""

import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT, csv_rows, tiny_sample_overrides
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from omegaconf.errors import InterpolationResolutionError

from segformer.training.run_folder import register_resolvers

CLUSTER = ROOT / "scripts" / "slurm" / "cluster.sh"
SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"
DONE = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# The machine's 2 cores are shared: a job of a few steps still spends most of its time importing.
JOB_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The environment of a user of the one-machine cluster: SLURM_CONF, and this venv's python first."""
    if sys.platform != "linux":
        pytest.skip("the one-machine SLURM cluster needs Linux")
    folder = tmp_path_factory.mktemp("slurm")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "PL_")) and k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    started = subprocess.run(["bash", str(CLUSTER), "start", str(folder)], check=False, capture_output=True, text=True, timeout=900)
    if started.returncode != 0:
        pytest.skip(f"no SLURM cluster on this machine: {started.stderr.strip()[-500:]}")
    env["SLURM_CONF"] = str(folder / "slurm.conf")
    yield env
    subprocess.run(["bash", str(CLUSTER), "stop", str(folder)], check=False, capture_output=True, timeout=120)


def _overrides(base: Path, *extra: str) -> list[str]:
    return [
        f"paths.log_dir={base / 'logs'}",
        *tiny_sample_overrides(base / "sample", num_train=8, num_val=2, val_batch_size=1),
        "trainer.log_every_n_steps=1",
        "callbacks.rich_model_summary=null",
        "callbacks.rich_progress_bar=null",
        *extra,
    ]


def _sbatch(env: dict, base: Path, tasks: int, *options_and_overrides: str) -> str:
    """Submit train.sbatch from the repository root, CPU only; returns the job id."""
    base.mkdir(parents=True, exist_ok=True)  # SLURM opens the --output file before the job starts
    submitted = subprocess.run(
        [
            "sbatch", "--parsable", f"--chdir={ROOT}", f"--output={base}/%x-%j.out",
            "--nodes=1", f"--ntasks-per-node={tasks}", "--gpus-per-node=0", "--cpus-per-task=1",
            *options_and_overrides,
        ],
        env=env, check=False, capture_output=True, text=True, timeout=60,
    )
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def _job(env: dict, job: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", "--oneliner", job], env=env, check=False, capture_output=True, text=True)
    return dict(re.findall(r"(\w+)=(\S*)", shown.stdout))


def _wait(env: dict, job: str, until=None) -> dict[str, str]:
    """Poll the job until it ends (or ``until(job info)`` holds); returns its scontrol fields."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        info = _job(env, job)
        if (until is not None and until(info)) or (until is None and info.get("JobState") in DONE):
            return info
        time.sleep(1)
    subprocess.run(["scancel", job], env=env, check=False)
    pytest.fail(f"SLURM job {job} did not get there within {JOB_TIMEOUT_S} s: {_job(env, job)}")


def _release(env: dict, job: str, *updates: str) -> None:
    """Once the job is requeued, start it now: SLURM holds a requeued job for two minutes
    (Reason=BeginTime) before it runs again. ``updates``: more job fields to change first."""

    def requeued(info: dict[str, str]) -> bool:
        if info.get("JobState") in DONE:
            pytest.fail(f"job {job} ended instead of being requeued: {info}")
        return info.get("JobState") == "PENDING"

    _wait(env, job, until=requeued)
    command = ["scontrol", "update", f"JobId={job}", *updates, "StartTime=now"]
    subprocess.run(command, env=env, check=True, capture_output=True)


def _output(base: Path, job: str) -> str:
    return (base / f"segformer-{job}.out").read_text()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_sbatch_with_two_tasks_trains_both_ranks_in_one_run_folder(slurm, tmp_path):
    job = _sbatch(slurm, tmp_path, 2, str(SBATCH), *_overrides(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2"))
    info = _wait(slurm, job)
    output = _output(tmp_path, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), output[-3000:]

    # srun started two train.py processes; Lightning took each rank from SLURM.
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in output and "GLOBAL_RANK: 1, MEMBER: 2/2" in output, output[-3000:]
    assert output.count("global batch 4 = 2 devices x 2 per device x 1 accumulation step") == 1
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    assert run.name == f"slurm-{job}"
    assert sorted(p.name for p in (run / "csv").iterdir()) == ["hparams.yaml", "metrics.csv"]  # one logger run
    rows = csv_rows(run / "csv" / "metrics.csv")
    assert sorted(int(r["step"]) for r in rows if r.get("train/loss")) == [0, 1]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.slow
def test_a_job_requeued_mid_run_resumes_in_its_folder_and_ends_as_an_uninterrupted_one(slurm, tmp_path):
    steps = 12
    settings = (
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.deterministic=true",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    )
    # One task each, side by side on the two cores.
    reference = _sbatch(slurm, tmp_path / "reference", 1, str(SBATCH), *_overrides(tmp_path / "reference", *settings))
    job = _sbatch(slurm, tmp_path / "preempted", 1, str(SBATCH), *_overrides(tmp_path / "preempted", *settings))
    run = tmp_path / "preempted" / "logs" / "train" / "runs" / f"slurm-{job}"

    def saved_mid_run(info: dict[str, str]) -> bool:
        last = run / "checkpoints" / "last.ckpt"
        if info.get("JobState") in DONE:
            pytest.fail(f"job {job} ended before it could be preempted: {_output(tmp_path / 'preempted', job)[-3000:]}")
        return last.is_file() and torch.load(last, weights_only=True)["global_step"] < steps

    _wait(slurm, job, until=saved_mid_run)
    requeued = subprocess.run(["scontrol", "requeue", job], env=slurm, check=False, capture_output=True, text=True)
    assert requeued.returncode == 0, requeued.stderr
    _release(slurm, job)
    info = _wait(slurm, job)
    output = _output(tmp_path / "preempted", job)
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), output[-3000:]
    assert f"Resuming from {run / 'checkpoints' / 'last.ckpt'}" in output
    assert "not resumable" not in output  # our sampler resumes mid-epoch exactly
    assert [p.name for p in run.parent.iterdir()] == [run.name]

    assert _wait(slurm, reference)["JobState"] == "COMPLETED"
    (reference_run,) = (tmp_path / "reference" / "logs" / "train" / "runs").iterdir()
    expected, resumed = _weights(reference_run), _weights(run)
    assert expected.keys() == resumed.keys()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


@pytest.mark.slow
def test_a_hydra_sweep_through_the_slurm_launcher_runs_each_job_on_the_cluster(slurm, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    swept = subprocess.run(
        [
            sys.executable, str(ROOT / "train.py"), "-m", "hydra/launcher=slurm", "trainer=ddp_cpu", "trainer.devices=1",
            "hydra.launcher.cpus_per_task=1", f"hydra.sweep.dir={tmp_path / 'sweep'}",
            *_overrides(tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2"), "optimizer.lr=1e-4,2e-4",
        ],
        cwd=tmp_path, env=slurm, check=False, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    assert swept.returncode == 0, swept.stderr[-3000:]
    # submitit submits the sweep as one array job, one task per sweep point, each with its own run
    # folder and its own result (train's return value, the best val/mIoU of that folder).
    submitit = tmp_path / "sweep" / ".submitit"
    tasks = sorted(p.name for p in submitit.iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert [task.split("_")[1] for task in tasks] == ["0", "1"] and len({task.split("_")[0] for task in tasks}) == 1
    for task, lr in zip(tasks, ("0.0001", "0.0002")):
        assert _wait(slurm, task)["JobState"] == "COMPLETED"  # submitit returns once the results are written
        run = tmp_path / "sweep" / task.split("_")[1]
        assert f"optimizer.lr={lr}" in (run / ".hydra" / "overrides.yaml").read_text()
        assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
        with open(submitit / task / f"{task}_0_result.pkl", "rb") as handle:
            outcome, returned = pickle.load(handle)  # the test's own sweep wrote it
        scores = [float(r["val/mIoU"]) for r in csv_rows(run / "csv" / "metrics.csv") if r.get("val/mIoU")]
        assert outcome == "success" and returned.return_value == pytest.approx(max(scores))


def _seconds(duration: str) -> int:
    """Seconds of a SLURM duration: [days-]hours:minutes:seconds."""
    days, _, clock = duration.rpartition("-")
    hours, minutes, seconds = (int(part) for part in clock.split(":"))
    return int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds


@pytest.mark.slow
def test_a_job_at_its_time_limit_saves_the_hpc_checkpoint_requeues_itself_and_finishes(slurm, tmp_path):
    # Margins for a loaded machine: slurmctld sends the signal at its next time-limit check (every
    # 30 s), Lightning acts on it at the next batch and must save and requeue before the limit
    # (at least 4 minutes after the signal is due); a minute and a half of training in all keeps the first
    # attempt running until the signal comes.
    warning_s = 300
    job = _sbatch(
        slurm, tmp_path, 1, "--time=30", f"--signal=SIGUSR1@{warning_s}", str(SBATCH),
        # Lightning's Timer is saved in checkpoints: the 90 s are over both attempts.
        *_overrides(
            tmp_path, "trainer.max_steps=100000", "trainer.val_check_interval=100000", "+trainer.max_time=00:00:01:30",
            "callbacks.model_checkpoint.every_n_train_steps=2",
        ),
    )
    out = tmp_path / f"segformer-{job}.out"
    last = tmp_path / "logs" / "train" / "runs" / f"slurm-{job}" / "checkpoints" / "last.ckpt"
    info = _wait(slurm, job, until=lambda info: last.is_file())
    # Training has taken steps: shorten the limit so that the signal is due now (limits count whole minutes,
    # and slurmctld sends the signal at its next time-limit check, within 30 s).
    limit = (_seconds(info["RunTime"]) + warning_s) // 60
    subprocess.run(["scontrol", "update", f"JobId={job}", f"TimeLimit={limit}"], env=slurm, check=True, capture_output=True)
    # Lightning saved its HPC checkpoint and requeued the job; the next attempt gets the full limit again.
    _release(slurm, job, "TimeLimit=30")
    info = _wait(slurm, job)
    output = out.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), output[-3000:]

    run = tmp_path / "logs" / "train" / "runs" / f"slurm-{job}"
    hpc = run / "hpc_ckpt_1.ckpt"
    # The signal saved the HPC checkpoint; the job may take a step or two more (and save last.ckpt)
    # before the requeue stops it: the next attempt resumes from whichever of the two is newer.
    resumed = re.search(r"Resuming from (\S+) \(left in this run's folder", output)
    assert hpc.is_file() and resumed and resumed.group(1) in (str(hpc), str(last)), output[-3000:]
    assert "Time limit reached" in output  # the second attempt trained the rest of the 90 s
    saved = torch.load(hpc, weights_only=True)["global_step"]
    assert 0 < saved < torch.load(last, weights_only=True)["global_step"]
    # The second attempt continued after the signal's step, not from 0 (Lightning's logging step also
    # counts the batch the signal interrupted).
    steps = [int(r["step"]) for r in csv_rows(run / "csv" / "metrics.csv") if r.get("train/loss")]
    assert min(steps) >= saved and len(steps) == len(set(steps))


def _launcher(*overrides: str) -> dict:
    register_resolvers()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", *overrides], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.mark.slow
def test_the_slurm_launcher_asks_for_gpus_only_for_a_gpu_trainer():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher is not installed")
    cpu = _launcher("trainer=ddp_cpu", "trainer.devices=2")
    assert (cpu["tasks_per_node"], cpu["gpus_per_node"]) == (2, 0)
    gpu = _launcher("trainer=ddp", "trainer.devices=4")
    assert (gpu["tasks_per_node"], gpu["gpus_per_node"]) == (4, 4)
    # devices: auto. OmegaConf wraps the resolver's ConfigError, keeping its message.
    with pytest.raises(InterpolationResolutionError, match="ConfigError .* trainer.devices must be a number"):
        _launcher("trainer=ddp")
