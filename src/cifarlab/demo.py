"""Which data the quick start trains on: the best dataset this machine has or can get."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from .data.sources import load_dataset
from .errors import DataError

log = logging.getLogger(__name__)


def choose_demo_data(cifar10_root: Optional[str] = None, try_download: bool = True,
                     timeout: float = 15.0) -> tuple[list[str], str]:
    """(config overrides, why): CIFAR-10 from the cache or `cifar10_root`, else downloaded,
    else Debian's Fashion-MNIST, else the synthetic set."""
    try:
        load_dataset("cifar10")
        return ["data.dataset=cifar10"], "CIFAR-10 found in the cache"
    except DataError as e:
        missing = str(e)
    if cifar10_root and Path(cifar10_root).exists():
        try:
            load_dataset("cifar10", cifar10_root)
            return ["data.dataset=cifar10", f"data.root={cifar10_root}"], f"CIFAR-10 found at {cifar10_root}"
        except DataError as e:
            missing = str(e)
    if try_download:
        try:
            from .data.downloads import download

            download("cifar10", timeout=timeout)
            return ["data.dataset=cifar10"], "CIFAR-10 downloaded into the cache"
        except DataError as e:
            missing = f"CIFAR-10 is not here and could not be downloaded ({e})"
    try:
        load_dataset("fashion-mnist")
        return ["data.dataset=fashion-mnist"], f"Fashion-MNIST from the system folder, because {missing}"
    except DataError as e:
        return ["data.dataset=synthetic"], f"the synthetic set, because {missing} and {e}"
