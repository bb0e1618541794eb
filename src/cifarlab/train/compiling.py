"""train.compile: whether a run is compiled with torch.compile, where inductor keeps its cache, and a
compiled forward that falls back to eager when compiling fails."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from ..data.downloads import cache_dir
from ..errors import first_line

log = logging.getLogger(__name__)

# train.compile=auto compiles runs of at least this many steps on these devices. On our 2-core CPU
# a compiled cnn3 trains slower than eager (bf16 -17 %, float32 -4 %, benchmarks/compile_start.py),
# so auto never compiles on a CPU. On a GPU a cold compile costs tens of seconds (a few with the
# cache warm) and commonly saves a third of a step: 5000 steps repay it (an estimate; no GPU here).
COMPILE_AUTO_STEPS = {"cuda": 5000}


def compile_pays(setting, device: torch.device, steps: int) -> bool:
    """Whether train.compile=`setting` compiles a run of `steps` training steps on `device`."""
    if setting != "auto":
        return bool(setting)
    return device.type in COMPILE_AUTO_STEPS and steps >= COMPILE_AUTO_STEPS[device.type]


def compile_cache() -> Path:
    """The folder inductor keeps compiled graphs and kernels in, shared by runs (and processes): the
    TORCHINDUCTOR_CACHE_DIR a user set, else compile/ in cifarlab's cache folder."""
    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "compile")))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class CompiledOrEager:
    """torch.compile with a fallback: if compiling fails on the first call, warn and run eagerly."""

    def __init__(self, model: nn.Module):
        self.model = model
        compile_cache()
        self.compiled = torch.compile(model)
        self.checked = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.checked:
            return self.compiled(x)
        try:
            out = self.compiled(x)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            log.warning("train.compile: torch.compile failed (%s); training eagerly", first_line(e))
            self.compiled = self.model
            out = self.model(x)
        self.checked = True
        return out
