"""Atomic file writes: readers never see half a file, and a failed write leaves no temporary file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Union

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
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
