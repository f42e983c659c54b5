"""Checks of the composed config that run before anything is built."""

from __future__ import annotations

from typing import Any

import hydra
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from segformer.errors import ConfigError


def check_required(cfg: DictConfig) -> None:
    """Name every ``???`` value left in the config at once, before anything runs."""
    missing = _missing_keys(OmegaConf.to_container(cfg, resolve=False, throw_on_missing=False), "")
    if missing:
        examples = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"Missing required value(s): {', '.join(missing)}. Set them on the command line: {examples}")


# Trainer flags whose default is a number but that Lightning also takes as a string or a list.
FLEXIBLE_TYPES = frozenset({"trainer.devices", "trainer.val_check_interval"})
# Numbers whose default is null ("derive it"; segformer/training/batch.py).
NULLABLE_NUMBERS = frozenset(
    {"data.batch_size", "global_batch_size", "max_batch_per_device", "trainer.accumulate_grad_batches"}
)


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
        kind = 0 if default is None and override.key_or_group in NULLABLE_NUMBERS else default
        given = OmegaConf.select(cfg, override.key_or_group, throw_on_missing=False)
        if isinstance(given, (DictConfig, ListConfig)):
            given = OmegaConf.to_container(given, resolve=False)
        expected = _kind_mismatch(kind, given)
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
            rank_zero_warn(
                f"trainer.val_check_interval={interval} is beyond the run (trainer.max_steps={max_steps}): "
                f"validating and checkpointing at step {max_steps} instead."
            )
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




def warn_about_recipe(cfg: DictConfig) -> None:
    """One warning per setting that defeats its purpose; training goes on."""
    max_steps = cfg.trainer.get("max_steps", -1)
    warmup = (cfg.get("scheduler") or {}).get("warmup_iters")
    if isinstance(max_steps, int) and max_steps > 0 and isinstance(warmup, int) and warmup >= max_steps:
        rank_zero_warn(
            f"scheduler.warmup_iters={warmup} >= trainer.max_steps={max_steps}: the learning rate never "
            "reaches optimizer.lr (it is still warming up when the run ends)."
        )
    data = cfg.get("data") or {}
    crop, scale = data.get("crop_size"), data.get("scale")
    if not crop or not scale:
        return
    ratio = max((data.get("augment") or {}).get("ratio_range") or [1.0])
    # The train rescale fits each image into scale x ratio ([long, short]): the largest it gets.
    long_side, short_side = max(scale) * ratio, min(scale) * ratio
    if min(crop) > short_side or max(crop) > long_side:
        rank_zero_warn(
            f"data.crop_size={list(crop)} is larger than the rescaled training images (at most "
            f"{long_side:g} x {short_side:g}: data.scale={list(scale)} x the largest ratio {ratio:g}): "
            "every crop is partly padding. Use a smaller crop or a larger data.scale."
        )
