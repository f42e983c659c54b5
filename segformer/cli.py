"""What train.py and eval.py share: running under Hydra, and building loggers and callbacks.

A user mistake (a wrong config choice, a misspelled key, a missing value, a bad path) ends the
run with one message on stderr and exit status 2, without a traceback. Anything else is a bug
and keeps its full traceback (exit status 1).
"""

from __future__ import annotations

import difflib
import netrc
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import hydra
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import (
    CompactHydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from segformer import cluster
from segformer.errors import ConfigError, UserError

USER_ERROR_EXIT = 2

# ${run_name:...} in configs/hydra: resolvable wherever a config is composed, launcher workers included.
cluster.register_resolvers()

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

    @hydra.main(version_base="1.3", config_path=str(Path(config_dir).resolve()), config_name=config_name)
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
    with initialize_config_dir(config_dir=str(Path(config_dir).resolve()), version_base="1.3"):
        cfg = hydra.compose(config_name, overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.cwd = os.getcwd()
        cfg.hydra.runtime.output_dir = str(Path(run_dir or cfg.hydra.run.dir).resolve())
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def check_required(cfg: DictConfig) -> None:
    """Name every ``???`` value left in the config at once, before anything runs."""
    missing = _missing_keys(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False), "")
    if missing:
        examples = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"Missing required value(s): {', '.join(missing)}. Set them on the command line: {examples}")


# Trainer flags whose default is a number but that Lightning also takes as a string or a list.
FLEXIBLE_TYPES = frozenset({"trainer.devices", "trainer.val_check_interval"})


def check_override_types(cfg: DictConfig, config_name: str) -> None:
    """Name every ``key=value`` override whose value has the wrong kind for its key (text where
    the config holds a number, a scalar where it holds a list, ...), before anything is built.

    The expected kind is that of the key's value in the config composed without the value
    overrides (the chosen groups only); keys that default to null, text or an interpolation
    take anything.
    """
    hydra_cfg = HydraConfig.get()
    overrides = OverridesParser.create().parse_overrides(list(hydra_cfg.overrides.task))
    groups = set(hydra_cfg.runtime.choices)
    group_overrides = [o.input_line for o in overrides if o.key_or_group in groups]
    values = [
        o
        for o in overrides
        if o.key_or_group not in groups
        and not (o.is_delete() or o.is_add() or o.is_force_add() or o.is_sweep_override())
        and not o.key_or_group.startswith("hydra.")
        and o.key_or_group not in FLEXIBLE_TYPES
    ]
    # A launcher's worker process (submitit) runs the job without Hydra's global state: skip there.
    if not values or not GlobalHydra.instance().is_initialized():
        return
    defaults = OmegaConf.to_container(hydra.compose(config_name, overrides=group_overrides), resolve=False)
    mistakes = []
    for override in {o.key_or_group: o for o in values}.values():
        default = _lookup(defaults, override.key_or_group)
        given = OmegaConf.select(cfg, override.key_or_group, throw_on_missing=False)
        if isinstance(given, (DictConfig, ListConfig)):
            given = OmegaConf.to_container(given, resolve=False)
        expected = _kind_mismatch(default, given)
        if expected:
            key = override.key_or_group
            mistakes.append(f"{key}={given!r} ({key} takes {expected}, default {default!r})")
    if mistakes:
        raise ConfigError(f"Wrong type in override(s): {'; '.join(mistakes)}.")


def _lookup(node: Any, key: str) -> Any:
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _kind_mismatch(default: Any, given: Any) -> str | None:
    """What ``given`` should have been, judged by ``default``; None when it fits."""
    if given is None or default is None or (isinstance(default, str) and "${" in default):
        return None
    if isinstance(default, bool):
        return None if isinstance(given, bool) else "true or false"
    if isinstance(default, (int, float)):
        return None if isinstance(given, (int, float)) and not isinstance(given, bool) else "a number"
    if isinstance(default, list):
        return None if isinstance(given, list) else "a list such as [a,b]"
    if isinstance(default, dict):
        return None if isinstance(given, dict) else "a group of keys"
    return None


def _missing_keys(node: Any, prefix: str) -> list[str]:
    if isinstance(node, dict):
        items = [(f"{prefix}{key}", value) for key, value in node.items()]
    elif isinstance(node, list):
        items = [(f"{prefix.rstrip('.')}[{i}]", value) for i, value in enumerate(node)]
    else:
        return []
    missing = []
    for key, value in items:
        if value == "???":
            missing.append(key)
        else:
            missing += _missing_keys(value, f"{key}.")
    return missing


def user_error_message(error: BaseException) -> str | None:
    """The message to show for a user mistake, or None when ``error`` is a bug."""
    cause = _user_cause(error)
    if cause is not None:
        return _clean_worker_message(str(cause))
    if isinstance(error, InstantiationException):
        # A constructor refusing its arguments (Lightning's Trainer: precision=17, devices=abc).
        if error.__cause__ is None:
            return str(error)
        if isinstance(error.__cause__, (TypeError, ValueError, ImportError)):
            key = re.search(r"^full_key: (\S+)", str(error), flags=re.MULTILINE)
            return f"{key.group(1) if key else 'config'}: {error.__cause__}"
        return None
    if isinstance(error, MissingConfigException):
        return _missing_config_message(error)
    if isinstance(error, OverrideParseException):
        reason = str(error).split("\nSee https://")[0].replace("\n", " ")
        return (
            f"Could not parse the override {error.override!r}: {reason}. Overrides look like "
            "key=value, group=choice or key=[a,b]."
        )
    if isinstance(error, CompactHydraException):
        if isinstance(error.__cause__, OmegaConfBaseException):
            return _bad_key_message(error, error.__cause__)
        return str(error).replace("\n", " ")
    if isinstance(error, MisconfigurationException):
        return str(error)
    return None


def _user_cause(error: BaseException) -> UserError | None:
    """The UserError that ``error`` is or was raised from (Hydra wraps errors of constructors)."""
    current: BaseException | None = error
    while current is not None:
        if isinstance(current, UserError):
            return current
        current = current.__cause__
    return None


def _clean_worker_message(message: str) -> str:
    """A DataLoader worker re-raises our error with its traceback inside the message; keep the message."""
    if "Original Traceback" not in message:
        return message
    match = re.search(r"^segformer\.errors\.\w+: (.*)", message, flags=re.MULTILINE | re.DOTALL)
    return match.group(1).strip() if match else message


def _missing_config_message(error: MissingConfigException) -> str:
    text = str(error).split("\nConfig search path:")[0]
    head, _, options = text.partition("\n\nAvailable options in")
    if not options:
        return head
    group, _, names = options.partition(":")
    choices = [name.strip() for name in names.split() if name.strip()]
    return f"{head.strip()}. Valid choices for{group}: {', '.join(choices)}."


def _bad_key_message(error: CompactHydraException, cause: OmegaConfBaseException) -> str:
    full_key = cause.full_key or ""
    parent = cause.parent_node
    if isinstance(parent, DictConfig) and isinstance(cause.key, str):
        at_top = full_key == cause.key
        valid = [str(key) for key in parent.keys() if not (at_top and key == "hydra")]
        where = "the top level" if at_top else full_key.rsplit(".", 1)[0]
        message = f"Unknown config key {full_key!r}: {where} has no key {cause.key!r}."
        close = difflib.get_close_matches(cause.key, valid, n=1)
        if close:
            message += f" Did you mean {close[0]!r}?"
        return (
            f"{message} Valid keys under {where}: {', '.join(valid)}. "
            "(To add a new key on purpose, prefix the override with '+'.)"
        )
    if isinstance(parent, ListConfig):
        return f"Config key {full_key!r} is out of range: the list has {len(parent)} item(s)."
    first = str(cause).splitlines()[0] if str(cause) else type(cause).__name__
    return f"{str(error).splitlines()[0]} {first}"


def fit_intervals_to_run(cfg: DictConfig) -> None:
    """Validate and checkpoint at least once: intervals longer than the run become its length.

    ``trainer.max_steps=1000`` on a paper recipe (validation every 16k steps) then still ends
    with a validation and a last.ckpt instead of nothing.
    """
    max_steps = cfg.trainer.get("max_steps", -1)
    if not isinstance(max_steps, int) or max_steps < 1:
        return
    with open_dict(cfg):
        interval = cfg.trainer.get("val_check_interval")
        if isinstance(interval, int) and interval > max_steps:
            cfg.trainer.val_check_interval = max_steps
        for node in (cfg.get("callbacks") or {}).values():
            every = node.get("every_n_train_steps") if isinstance(node, DictConfig) else None
            if isinstance(every, int) and every > max_steps:
                node.every_n_train_steps = max_steps
    interval = cfg.trainer.get("val_check_interval")
    if isinstance(interval, int) and max_steps % interval:
        rank_zero_warn(
            f"trainer.max_steps={max_steps} is not a multiple of trainer.val_check_interval={interval}: "
            f"the last {max_steps % interval} steps are neither validated nor checkpointed."
        )


def instantiate_callbacks(cfg: DictConfig | None, has_logger: bool) -> list[Callback]:
    """Callbacks from the ``callbacks`` group; an entry set to null is left out.

    LearningRateMonitor raises without a logger, so it is dropped (with a warning) then.
    """
    callbacks: list[Callback] = []
    for name, node in (cfg or {}).items():
        if node is None:
            continue
        callback = hydra.utils.instantiate(node)
        if isinstance(callback, LearningRateMonitor) and not has_logger:
            rank_zero_warn(f"callbacks.{name} (LearningRateMonitor) needs a logger; left out because logger=null.")
            continue
        callbacks.append(callback)
    return callbacks


def instantiate_loggers(cfg: DictConfig | None) -> list[Logger]:
    """Loggers from the ``logger`` group; an entry set to null is left out."""
    return [hydra.utils.instantiate(node) for node in (cfg or {}).values() if node is not None]


def log_config(loggers: list[Logger], cfg: DictConfig) -> None:
    """Record the whole resolved config with every logger (W&B's config panel, hparams.yaml)."""
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)


def finish_loggers(loggers: list[Logger]) -> None:
    """Close the W&B run of this process (WandbLogger leaves it open, and a later WandbLogger in
    the same process, the next job of a multirun, would log into it)."""
    if any(isinstance(logger, WandbLogger) for logger in loggers):
        import wandb

        if wandb.run is not None:
            wandb.finish()


def best_checkpoint(callbacks: list[Callback], monitor: str) -> ModelCheckpoint | None:
    """The ModelCheckpoint that keeps the best ``monitor`` score, if any."""
    return next((c for c in callbacks if isinstance(c, ModelCheckpoint) and c.monitor == monitor), None)


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A WandbLogger that never prompts for a login.

    ``offline=None`` means offline unless an API key is available (WANDB_API_KEY, or a
    ``wandb login`` in ~/.netrc); offline runs can be uploaded later with ``wandb sync``.
    """
    if offline is None:
        offline = not _has_wandb_credentials()
    return WandbLogger(offline=offline, **kwargs)


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False
