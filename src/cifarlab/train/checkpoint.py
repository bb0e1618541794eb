"""Checkpoints: atomic writes, and loads that only accept plain tensors and containers."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device: str = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a cifarlab checkpoint ({str(e).splitlines()[0]})") from None
