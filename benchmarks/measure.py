"""What several benchmarks measure the same way: the spread of repeated measurements (this machine
drifts by 15 % and more between runs, so rates are reported as min / median / max over repeats), a
`cifarlab train` process timed whole, and a run's training rate after its first epoch."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import cifarlab


def spread(values: list[float], digits: int = 1) -> dict:
    return {"min": round(min(values), digits), "median": round(statistics.median(values), digits),
            "max": round(max(values), digits)}


def train_process(config: Path, overrides: list[str], out: Path, env: Optional[dict] = None) -> tuple[cifarlab.Run, float]:
    """`cifarlab train -c config` as a user starts it, in its own process writing one run into the empty
    folder `out` (no report, no t-SNE); returns the run and the process' wall seconds."""
    command = [sys.executable, "-m", "cifarlab.cli", "train", "-q", "-c", str(config), f"train.out_dir={out}",
               "analysis.report=false", "analysis.tsne.layers=[]", *overrides]
    start = time.perf_counter()
    subprocess.run(command, env={**os.environ, **(env or {})}, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    return cifarlab.Run(run), wall


def later_rate(run: cifarlab.Run) -> float:
    """Median training img/s of a run's epochs after the first (which holds warm-up and compiling)."""
    return statistics.median(epoch["time"]["img_per_s"] for epoch in run.history[1:])
