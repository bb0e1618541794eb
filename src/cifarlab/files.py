"""Atomic file writes: readers never see half a file, and a failed write leaves no temporary file
and ends in a WriteError naming the file and the reason (disk full, read-only, file too large)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

from .errors import WriteError

Content = Union[str, bytes, Callable[[Path], None]]


def atomic_write(path: Union[str, Path], content: Content) -> Path:
    """Write `content` (text, bytes, or a function that writes to the path it is given) to a
    temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def append_line(path: Union[str, Path], line: str) -> None:
    """Append one line; if the write fails the file is cut back to where it was, so it never holds
    half a line."""
    path = Path(path)
    try:
        with open(path, "a") as f:
            start = f.tell()
            try:
                f.write(line + "\n")
                f.flush()
            except OSError:
                f.truncate(start)
                raise
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None


def save_array(path: Path, array) -> None:
    """np.save to exactly `path` (np.save itself appends .npy to a name without it); for atomic_write."""
    import numpy as np

    with open(path, "wb") as f:
        np.save(f, array)
