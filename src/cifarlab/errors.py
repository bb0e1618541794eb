"""Errors a user can cause and fix; the CLI prints them as one line and exits with `exit_code`."""


class CifarlabError(Exception):
    """A user-facing error: bad input, bad config, missing or corrupt data."""

    exit_code = 2


class ConfigError(CifarlabError):
    pass


class DataError(CifarlabError):
    pass


class TrainingFailed(CifarlabError):
    """Training ran but failed (for example the loss became NaN)."""

    exit_code = 1


class Interrupted(CifarlabError):
    """SIGINT or SIGTERM: the run saved its state and can be resumed; exit code 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum
