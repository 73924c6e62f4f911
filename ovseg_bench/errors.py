"""One exception family for everything a user can fix.

The CLI catches :class:`OvsegError` alone and prints its message; anything else is a bug and
keeps its traceback. Messages say what was found, what was expected and what to do.
"""
from __future__ import annotations


class OvsegError(Exception):
    """Base of every error caused by input, configuration or environment."""

    exit_code = 2


class ConfigError(OvsegError):
    """A config, card or preset file is malformed, or a name is unknown."""


class DataError(OvsegError):
    """A dataset on disk is missing, incomplete or does not match its card."""


class WeightsError(OvsegError):
    """Model weights or a checkpoint cannot be found, fetched or loaded."""


class TrackError(OvsegError):
    """A method cannot serve the task type (track) of a dataset."""


class NumericsError(OvsegError):
    """A method produced non-finite scores."""
