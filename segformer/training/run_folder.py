"""Run folders: one per run (per SLURM job under SLURM), never overwritten by running again in it.

``srun`` starts every rank as its own ``python train.py``, so a timestamped run folder could
differ between ranks, and a requeued job (preemption, time limit) would start in a new one.
Under SLURM the run folder is therefore named after the job (``slurm-<job id>``), the same for
every rank and every requeue (``${run_name:...}`` in configs/hydra), and the requeued job finds
what the previous attempt saved there (``resume.resume_checkpoint``).

Hydra saves the composed config in ``<run dir>/.hydra/`` before the task starts, so a second
command with the same ``hydra.run.dir`` (resuming, a requeued job, or a mistake) would replace
the config the run was started with. ``KeepEarlierConfig`` (configs/hydra, a Hydra callback)
sends each later attempt's config to ``.hydra/attempt-<n>/`` instead and says so.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, read_write

from segformer.errors import ConfigError

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


def slurm_gpus_per_node(accelerator: str, devices: Any) -> int:
    """GPUs per node that hydra/launcher=slurm asks for: none for a CPU trainer (trainer=ddp_cpu),
    else one per device, so one launcher config serves CPU-only and GPU clusters."""
    if accelerator == "cpu":
        return 0
    if not str(devices).isdigit():
        raise ConfigError(
            f"hydra/launcher=slurm starts one task per device, so trainer.devices must be a number here "
            f"(the GPUs per node), got {devices!r}: add trainer.devices=<GPUs per node>."
        )
    return int(devices)


RESOLVERS = {RUN_NAME_RESOLVER: run_name, "slurm_gpus_per_node": slurm_gpus_per_node}


def register_resolvers() -> None:
    """``${run_name:<default>}`` for configs/hydra and ``${slurm_gpus_per_node:...}`` for
    configs/hydra/launcher/slurm.yaml (called before Hydra composes anything)."""
    # omegaconf 2.4 renamed register_new_resolver (now deprecated) to register_resolver, a name
    # that in 2.3 is the legacy, string-only API: the new signature tells them apart.
    if "use_cache" in inspect.signature(OmegaConf.register_resolver).parameters:
        register = OmegaConf.register_resolver
    else:
        register = OmegaConf.register_new_resolver
    for name, function in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            register(name, function)


def _rank() -> int:
    """The process's global rank when a cluster launcher (srun, torchrun) started it, else 0."""
    for name in ("SLURM_PROCID", "RANK"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


class KeepEarlierConfig(Callback):
    """On a run folder that already holds a saved config, save this attempt's in ``attempt-<n>``."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        subdir = config.hydra.output_subdir
        if subdir is None:
            return
        # hydra.run.dir refers to ${hydra:runtime.cwd} (configs/paths), which resolves only once
        # HydraConfig holds this config; Hydra sets it only later, when the job starts. The folder
        # is pinned so that the job's own resolution (${now:...}) cannot pick another one.
        HydraConfig.instance().set_config(config)
        run_dir = str(config.hydra.run.dir)
        with read_write(config.hydra):
            config.hydra.run.dir = run_dir
        saved = Path(run_dir) / subdir
        if not (saved / "config.yaml").is_file():
            return
        with read_write(config.hydra):
            if _rank() != 0:
                # Every srun task runs this; one copy of the attempt's config is enough.
                config.hydra.output_subdir = None
                return
            number = 2
            while True:
                try:
                    (saved / f"attempt-{number}").mkdir()
                    break
                except FileExistsError:
                    number += 1
            config.hydra.output_subdir = f"{subdir}/attempt-{number}"
        # Hydra's logging is not set up yet; stdout keeps stderr for the error, if one follows.
        print(
            f"The run folder {saved.parent} was used before: its first config stays in {saved}, "
            f"this attempt's goes to {saved / f'attempt-{number}'}."
        )
