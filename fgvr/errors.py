"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


class FgvrError(Exception):
    """A problem with the user's input (config, files, data). Exit code 1."""

    exit_code = 1


class ConfigError(FgvrError):
    """A bad config key, value or group choice. Exit code 2."""

    exit_code = 2


class DataError(FgvrError):
    """Missing, unreadable or inconsistent data files."""
