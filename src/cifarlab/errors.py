"""Errors a user can cause and fix; the CLI prints them as one line and exits with `exit_code`."""


class CifarlabError(Exception):
    """A user-facing error: bad input, bad config, missing or corrupt data."""

    exit_code = 2
    reported = False  # True when the user was already told (the ranks of a data-parallel run print their own)


class ConfigError(CifarlabError):
    """A config, override, study file or command argument that cannot be used (exit code 2)."""


class DataError(CifarlabError):
    """Data, an image or a checkpoint that is missing or damaged (exit code 2)."""


class WriteError(CifarlabError):
    """A file could not be written (disk full, read-only folder, file size limit): exit code 1."""

    exit_code = 1


class RunInUse(CifarlabError):
    """Another live process is writing the run (it holds RUN/.lock): exit code 2."""


class TrainingFailed(CifarlabError):
    """Training ran but failed (for example the loss became NaN)."""

    exit_code = 1


class Interrupted(CifarlabError):
    """SIGINT or SIGTERM: the run saved its state and can be resumed (or, stopped in its analysis after
    training, be finished by `next_step`); exit code 128 + signal."""

    def __init__(self, message: str, signum: int, run_dir=None, next_step: str = ""):
        super().__init__(message)
        self.exit_code = 128 + signum
        self.run_dir = run_dir  # where last.pt was saved
        self.next_step = next_step or f"state saved, resume with: cifarlab train --resume {run_dir}"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" when it has none), for one-line reports."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
