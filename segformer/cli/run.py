"""Running a task under Hydra: ``python train.py ...`` and ``compose`` for tests and notebooks.

A user mistake (a wrong config choice, a misspelled key, a missing value, a bad path) ends the
run with one message on stderr and exit status 2, without a traceback. Anything else is a bug
and keeps its full traceback (exit status 1).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

import hydra
from hydra import initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from segformer.cli.checks import check_override_types, check_required
from segformer.cli.messages import user_error_message
from segformer.training import run_folder

USER_ERROR_EXIT = 2

# The _target_s our configs instantiate. Hydra 1.4 asks for them (it refuses others and warns
# without a list) and drops version_base (its defaults are 1.3's); Hydra 1.3 needs
# version_base="1.3" to keep the 1.3 behaviour.
TRUSTED_TARGETS = ["segformer.*", "lightning.pytorch.*", "hydra.utils.get_method"]
if hasattr(hydra.utils, "execution_whitelist"):
    MAIN_OPTIONS: dict = {"execution_whitelist": TRUSTED_TARGETS}
    COMPOSE_OPTIONS: dict = {}
else:
    MAIN_OPTIONS = COMPOSE_OPTIONS = {"version_base": "1.3"}

# ${run_name:...} in configs/hydra: resolvable wherever a config is composed, launcher workers included.
run_folder.register_resolvers()

T = TypeVar("T")


def run(task: Callable[[DictConfig], T], config_dir: str | os.PathLike, config_name: str) -> None:
    """Compose ``config_dir/config_name.yaml`` with the command line and call ``task`` on it.

    Hydra's own handling prints composition errors without the valid keys and task errors with
    a traceback, so Hydra is told to re-raise (HYDRA_FULL_ERROR) and the errors are reported
    here instead. ``HYDRA_FULL_ERROR=1`` set by the user still shows every traceback.
    """
    previous = os.environ.get("HYDRA_FULL_ERROR")
    show_traceback = previous == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"

    def report(error: Exception) -> NoReturn:
        message = user_error_message(error)
        if message is None or show_traceback:
            raise error
        print(f"error: {message}", file=sys.stderr)
        sys.exit(USER_ERROR_EXIT)

    @hydra.main(config_path=str(Path(config_dir).resolve()), config_name=config_name, **MAIN_OPTIONS)
    def main(cfg: DictConfig) -> T:
        # Exiting from inside the job keeps Hydra from printing its own "Error executing job" line.
        try:
            check_required(cfg)
            check_override_types(cfg, config_name)
            return task(cfg)
        except Exception as error:
            report(error)

    try:
        main()
    except Exception as error:
        report(error)
    finally:
        # Called in-process (tests, notebooks), the setting must not reach later runs or children.
        if previous is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = previous


def compose(
    config_dir: str | os.PathLike,
    config_name: str,
    overrides: Sequence[str] = (),
    run_dir: str | os.PathLike | None = None,
) -> DictConfig:
    """The config a script would get from ``overrides``, composed outside a Hydra run (tests,
    notebooks). ``${hydra:...}`` values resolve as in a run whose folder is ``run_dir``."""
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), **COMPOSE_OPTIONS):
        cfg = hydra.compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.runtime.output_dir = str(Path(run_dir or cfg.hydra.run.dir).resolve())
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


