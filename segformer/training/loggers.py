"""Loggers that behave on any machine: W&B without a login prompt."""

from __future__ import annotations

import netrc
import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger



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
