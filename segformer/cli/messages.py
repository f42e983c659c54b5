"""The one-line message for a user mistake, or None for a bug (which keeps its traceback)."""

from __future__ import annotations

import difflib
import re

from hydra.errors import (
    CompactHydraException,
    HydraException,
    InstantiationException,
    MissingConfigException,
    OverrideParseException,
)
from lightning.fabric.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, ListConfig
from omegaconf.errors import OmegaConfBaseException

from segformer.errors import UserError


def user_error_message(error: BaseException) -> str | None:
    """The message to show for a user mistake, or None when ``error`` is a bug.

    Judged by exception types and their attributes, never by the wording of library messages.
    """
    cause = _user_cause(error)
    if cause is not None:
        return _clean_worker_message(str(cause))
    if isinstance(error, InstantiationException):
        # A constructor refusing its arguments (Lightning's Trainer: precision=17, devices=abc).
        refused = error.__cause__
        if refused is None:
            return _one_line(str(error))
        if isinstance(refused, (TypeError, ValueError, ImportError, MisconfigurationException)):
            key = _instantiated_key(error)
            return f"{key or 'config'}: {_one_line(str(refused))}"
        return None
    if isinstance(error, MissingConfigException):
        return _missing_config_message(error)
    if isinstance(error, OverrideParseException):
        reason = error.message.strip().splitlines()[0] if error.message.strip() else ""
        return (
            f"Could not parse the override {error.override!r}: {reason}. Overrides look like "
            "key=value, group=choice or key=[a,b]."
        )
    if isinstance(error, HydraException):
        if isinstance(error.__cause__, OmegaConfBaseException):
            return _bad_key_message(error, error.__cause__)
        if isinstance(error, CompactHydraException):
            return _one_line(str(error))
        return None
    if isinstance(error, MisconfigurationException):
        return _one_line(str(error))
    return None


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _instantiated_key(error: InstantiationException) -> str | None:
    """The config key whose ``_target_`` raised: ``full_key`` of Hydra's frame that wrapped it."""
    frame = error.__traceback__
    key = None
    while frame is not None:
        key = frame.tb_frame.f_locals.get("full_key", key)
        frame = frame.tb_next
    return key or None


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
    group, _, choice = (error.missing_cfg_file or "").rpartition("/")
    # configs/<group>/base.yaml is what the group's choices extend, not a choice.
    options = [name for name in error.options or [] if name != "base"]
    if not group or not options:
        return f"Could not find the config {error.missing_cfg_file!r}."
    return f"Could not find {choice!r} in '{group}'. Valid choices for '{group}': {', '.join(options)}."


def _bad_key_message(error: HydraException, cause: OmegaConfBaseException) -> str:
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


