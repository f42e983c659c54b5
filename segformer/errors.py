"""User-facing errors.

A ``UserError`` is a mistake the user can fix (a wrong path, a bad value, a checkpoint of
another model). Entry points print its message as one paragraph and exit non-zero, with no
traceback; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A mistake in what the user gave us; the message says what and how to fix it."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


class DataError(UserError, ValueError):
    """A dataset on disk that is missing, malformed or inconsistent."""


class ConfigError(UserError, ValueError):
    """A configuration value or choice that is not valid."""
