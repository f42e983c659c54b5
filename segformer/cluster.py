"""Running under SLURM: one run folder per job, and resuming a requeued job where it stopped.

``srun`` starts every rank as its own ``python train.py``, so a timestamped run folder could
differ between ranks, and a requeued job (preemption, time limit) would start in a new one.
Under SLURM the run folder is therefore named after the job (``slurm-<job id>``), the same for
every rank and every requeue, and ``resume_checkpoint`` finds what the previous attempt saved.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import OmegaConf

RUN_NAME_RESOLVER = "run_name"


def slurm_job_name(environ: Mapping[str, str] | None = None) -> str | None:
    """``slurm-<job id>[_<array task>][.<step>]`` when SLURM started this process as a job's task.

    Like Lightning's ``SLURMEnvironment.detect``: SLURM_NTASKS is set and the job is not an
    interactive allocation (job name bash or interactive). A step other than the first (a second
    ``srun`` in the same batch script) gets its own folder.
    """
    env = os.environ if environ is None else environ
    if "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    job = env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID")
    if not job:
        return None
    name = f"slurm-{job}"
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        name += f"_{env['SLURM_ARRAY_TASK_ID']}"
    step = env.get("SLURM_STEP_ID", "")
    if step.isdigit() and step != "0":
        name += f".{step}"
    return name


def run_name(default: str) -> str:
    """The run folder's name: the SLURM job's (see ``slurm_job_name``), else ``default``."""
    return slurm_job_name() or default


def register_resolvers() -> None:
    """``${run_name:<default>}`` for configs/hydra (called before Hydra composes anything)."""
    if not OmegaConf.has_resolver(RUN_NAME_RESOLVER):
        OmegaConf.register_new_resolver(RUN_NAME_RESOLVER, run_name)


def _checkpoint_number(path: Path) -> int:
    match = re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", path.name)
    return int(match.group(1)) if match else -1


def resume_checkpoint(trainer: Trainer, callbacks: Sequence[Callback]) -> str | None:
    """The newest checkpoint a previous attempt of this run left in its folder, or None.

    Candidates: ``last.ckpt`` of every ModelCheckpoint with ``save_last``, and the
    ``hpc_ckpt_<n>.ckpt`` that Lightning saves in ``default_root_dir`` when SLURM signals the
    end of the job (``#SBATCH --signal=SIGUSR1@90``). A fresh run folder has none of them, so a
    new run starts from scratch.
    """
    candidates = [
        Path(callback.dirpath) / f"{callback.CHECKPOINT_NAME_LAST}{callback.FILE_EXTENSION}"
        for callback in callbacks
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath
    ]
    hpc = sorted(Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt"), key=_checkpoint_number)
    candidates += hpc[-1:]
    found = [path for path in candidates if path.is_file()]
    if not found:
        return None
    newest = max(found, key=lambda path: path.stat().st_mtime)
    rank_zero_info(f"Resuming from {newest} (left in this run's folder by an earlier attempt).")
    return str(newest)
