"""A run folder is never overwritten by running again in it.

Hydra saves the composed config in ``<run dir>/.hydra/`` before the task starts, so a second
command with the same ``hydra.run.dir`` (resuming, a requeued job, or a mistake) would replace
the config the run was started with. ``KeepEarlierConfig`` (configs/hydra, a Hydra callback)
sends each later attempt's config to ``.hydra/attempt-<n>/`` instead and says so.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, read_write


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
        saved = Path(config.hydra.run.dir) / subdir
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
