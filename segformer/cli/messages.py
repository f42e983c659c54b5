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
    refusal = _constructor_refusal(error)
    if refusal is not None:
        key, refused = refusal
        return f"{key or 'config'}: {_one_line(str(refused))}"
    if isinstance(error, InstantiationException):
        # Hydra's own (a _target_ that does not exist); with a cause other than a refusal, a bug.
        return _one_line(str(error)) if error.__cause__ is None else None
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


# What a constructor raises when it refuses its arguments (Lightning's Trainer: precision=17).
REFUSALS = (TypeError, ValueError, ImportError, MisconfigurationException)


def _constructor_refusal(error: BaseException) -> tuple[str | None, BaseException] | None:
    """(config key, error) when a ``_target_`` called by Hydra's instantiate refused its
    arguments: Hydra 1.3 wraps the error in an InstantiationException, 1.4 lets it through. The
    key is ``full_key`` of Hydra's ``_call_target`` frame on the way."""
    refused = error.__cause__ if isinstance(error, InstantiationException) else error
    if not isinstance(refused, REFUSALS):
        return None
    frames = []
    trace = error.__traceback__
    while trace is not None:
        frames.append(trace.tb_frame)
        trace = trace.tb_next
    calls = [
        f for f in frames if f.f_code.co_name == "_call_target" and f.f_globals.get("__name__", "").startswith("hydra.")
    ]
    if not calls:
        return None
    return calls[-1].f_locals.get("full_key") or None, refused


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


