"""The run directory contract (see docs/architecture.md): what a run writes and how every other
command reads it back.

    runs/<name>-<YYYYmmdd-HHMMSS>/
      config.yaml  env.json  metrics.jsonl  summary.json  checkpoints/{best,last}.pt
      plots/  report.html  features/
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import nn

from .config import Config, load_config
from .data.loader import DeviceLoader
from .data.prepare import Splits, eval_loader, prepare_data, select_device
from .errors import ConfigError, DataError
from .files import atomic_write
from .models.build import build_model

CONFIG = "config.yaml"
ENV = "env.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"


def create_run_dir(out_dir: Union[str, Path], name: str, exact: Optional[Path] = None) -> Path:
    """A new, empty run directory: `exact` if given (a study names its runs), else
    out_dir/name-timestamp, with a suffix keeping two runs started in the same second apart."""
    if exact is not None:
        if exact.exists() and any(exact.iterdir()):
            raise ConfigError(f"{exact}: run directory exists and is not empty")
        (exact / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
        return exact
    base = Path(out_dir) / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            break
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")
    (path / CHECKPOINTS).mkdir()
    return path


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically: readers never see half a file."""
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: Path, obj: Any) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def resolve_run(path: Union[str, Path]) -> Path:
    run = Path(path)
    if not (run / CONFIG).is_file():
        raise ConfigError(f"{run}: not a run directory (no {CONFIG})")
    return run


def keep_lines(path: Path, count: int) -> None:
    """Cut a JSON-lines file back to its first `count` lines (a resumed run drops what came after
    its checkpoint)."""
    lines = path.read_text().splitlines(keepends=True)[:count] if path.is_file() else []
    atomic_write(path, "".join(lines))


def read_run_config(run: Path, overrides: Optional[list[str]] = None) -> Config:
    """A run's resolved config, with `key.path=value` overrides applied on top."""
    return load_config(Path(run) / CONFIG, overrides)


def read_summary(run: Path) -> dict:
    path = Path(run) / SUMMARY
    if not path.is_file():
        raise ConfigError(f"{run}: no {SUMMARY} (the run did not finish)")
    return json.loads(path.read_text())


def git_revision() -> Union[str, None]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: str, seed: int) -> dict[str, Any]:
    import numpy
    import torch

    from . import __version__

    return {
        "cifarlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
        "seed": seed,
        "git_revision": git_revision(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """torch.save to a temporary file in the same folder, then rename: a crash never leaves half a file."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path, device: str = "cpu") -> dict[str, Any]:
    """A checkpoint's dict, loaded with weights_only=True: plain tensors and containers, no code."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a cifarlab checkpoint ({str(e).splitlines()[0]})") from None


# ---------------------------------------------------------------- reading a finished run


@dataclass
class LoadedRun:
    """A run read back: its config, data splits (with the run's own normalization) and the
    checkpoint's model in eval mode on the run's device."""

    path: Path
    config: Config
    splits: Splits
    model: nn.Module
    checkpoint: dict[str, Any]
    device: torch.device

    @property
    def classes(self) -> list[str]:
        return self.checkpoint["classes"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.checkpoint["input_shape"])

    def split(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        arrays = {"train": self.splits.train, "val": self.splits.val, "test": self.splits.test}[name]
        if len(arrays[1]) == 0:
            raise ConfigError(f"{self.path}: the {name} split is empty (data.val_size=0?)")
        return arrays

    def normalize(self, images: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """uint8 (N, C, H, W) images, or floats in [0, 1], as the model sees them: the run's
        normalization, on its device."""
        batch = torch.as_tensor(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images)
        batch = batch.to(self.device)
        loader = DeviceLoader(batch, torch.zeros(len(batch), dtype=torch.long), len(batch), self.splits.mean,
                              self.splits.std, channels_last=self.config.train.channels_last, whiten=self.splits.whiten)
        return loader.normalize(batch)

    def loader(self, name: str) -> DeviceLoader:
        return eval_loader(self.split(name), self.splits, self.config, self.device)


def load_run(run_dir: Union[str, Path], checkpoint_name: str = "best.pt") -> LoadedRun:
    """A run directory with the weights of `checkpoint_name`, ready to evaluate."""
    run_dir = resolve_run(run_dir)
    config = read_run_config(run_dir)
    device = select_device(config.train.device)
    checkpoint = load_checkpoint(run_dir / CHECKPOINTS / checkpoint_name, str(device))
    splits = prepare_data(config, checkpoint["normalization"])
    model = build_model(config.model, tuple(checkpoint["input_shape"]), len(checkpoint["classes"])).to(device)
    if config.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return LoadedRun(run_dir, config, splits, model, checkpoint, device)
