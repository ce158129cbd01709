"""Errors a user can cause. The CLI prints them as one line, without a traceback."""


def first_few(items: list, shown: int = 3) -> str:
    """'a, b, c (+4 more)': the start of a long list, for a one-line message."""
    return ", ".join(map(str, items[:shown])) + (f" (+{len(items) - shown} more)" if len(items) > shown else "")


def first_line(error: BaseException | str, typed: bool = False) -> str:
    """An error's message in one line: its first non-blank line, or its class's name if it has no
    message; `typed` puts the class's name first ('ValueError: bad value'). A string stands for itself."""
    lines = str(error).strip().splitlines()
    text = lines[0].strip() if lines else ""
    if isinstance(error, str):
        return text
    name = type(error).__name__
    if typed:
        return f"{name}: {text}" if text else name
    return text or name


class FgvrError(Exception):
    """A problem with the user's input (config, files, data). Exit code 1."""

    exit_code = 1

    def __init__(self, message: str):
        # A DataLoader worker's error is re-raised in the main process with the worker's
        # traceback in its message; keep the one line the user needs.
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


class ConfigError(FgvrError):
    """A bad config key, value or group choice. Exit code 2."""

    exit_code = 2


class DataError(FgvrError):
    """Missing, unreadable or inconsistent data files."""


class RunInterrupted(FgvrError):
    """A run stopped on a signal with its checkpoint saved, and nothing relaunched it. Exit code
    128 + the signal's number, as the shell reports a process the signal ended (130 for Ctrl-C)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
