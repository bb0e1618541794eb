"""Atomic file writes: readers never see half a file, and a failed write leaves no temporary file
and ends in a WriteError naming the file and the reason (disk full, read-only, file too large)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Union

from .errors import WriteError

Content = Union[str, bytes, Callable[[Path], None]]


def atomic_write(path: Union[str, Path], content: Content) -> Path:
    """Write `content` (text, bytes, or a function that writes to the path it is given) to a
    temporary file of its own beside `path` (two writers never share one), then rename it over `path`."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
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
    """Append one line with a single unbuffered write; if it fails the file is cut back to where it
    was, so it never ends in half a line."""
    path = Path(path)
    data = (line + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None
    try:
        start = os.fstat(fd).st_size
        try:
            done = 0
            while done < len(data):  # a short write (the disk or a size limit is reached): the next says why
                written = os.write(fd, data[done:])
                if written == 0:
                    raise OSError(5, "the file does not grow")
                done += written
        except OSError as e:
            os.ftruncate(fd, start)
            raise WriteError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        os.close(fd)


def save_array(path: Path, array) -> None:
    """np.save to exactly `path` (np.save itself appends .npy to a name without it); for atomic_write."""
    import numpy as np

    with open(path, "wb") as f:
        np.save(f, array)
