"""The run directory contract (see DESIGN.md): what a run writes and how other commands read it.

    runs/<name>-<YYYYmmdd-HHMMSS>/
      config.yaml  env.json  metrics.jsonl  summary.json  checkpoints/{best,last}.pt
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Optional, Union

from .config import Config, apply_override, config_from_dict, parse_override, read_yaml
from .errors import ConfigError

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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


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


def read_run_config(run: Path, overrides: Optional[list[str]] = None) -> Config:
    """A run's resolved config, with `key.path=value` overrides applied on top."""
    tree = read_yaml(run / CONFIG)
    for text in overrides or []:
        apply_override(tree, *parse_override(text))
    return config_from_dict(tree, source=str(run / CONFIG))


def read_summary(run: Path) -> dict:
    path = run / SUMMARY
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
