"""The command-line layer: compose the config under Hydra, check it, build the run's parts, and
turn user mistakes into one line (``error: ...``, exit status 2) instead of a traceback."""

from segformer.cli.build import (
    best_checkpoint,
    finish_loggers,
    instantiate_callbacks,
    instantiate_loggers,
    log_config,
)
from segformer.cli.checks import check_override_types, check_required, fit_intervals_to_run, warn_about_recipe
from segformer.cli.messages import user_error_message
from segformer.cli.run import USER_ERROR_EXIT, compose, run

__all__ = [
    "USER_ERROR_EXIT",
    "best_checkpoint",
    "check_override_types",
    "check_required",
    "compose",
    "finish_loggers",
    "fit_intervals_to_run",
    "instantiate_callbacks",
    "instantiate_loggers",
    "log_config",
    "run",
    "user_error_message",
    "warn_about_recipe",
]
