"""Starting the ranks of a data-parallel run (`train.devices=N`) on this machine, and supervising them.

`launch` runs `python -m cifarlab.cli train ...` N times with RANK, LOCAL_RANK and WORLD_SIZE set;
the ranks meet through a FileStore in a temporary folder (no TCP store), and gloo's sockets bind the
loopback interface (GLOO_SOCKET_IFNAME=lo unless set), so nothing listens beyond 127.0.0.1. A
process that already is a rank (WORLD_SIZE set, as torchrun sets it) does not launch: it trains as
its rank (train/distributed.py). This is the one place that decides whether running a config means
starting ranks (`launches`); the API and the CLI both ask it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml

from .. import processes, runs
from ..config import Config, Overrides, write_config
from ..data.prepare import select_device
from ..errors import CifarlabError, ConfigError, Interrupted, TrainingFailed
from .distributed import INIT_METHOD_ENV, is_rank_process

GRACE_S = 5.0  # after a rank fails, the others get this long to end by themselves before they are killed


def launches(config: Config) -> bool:
    """Whether running `config` here means starting its ranks (train.devices > 1, not a rank yet)."""
    return config.train.devices > 1 and not is_rank_process()


def override_strings(overrides: Overrides) -> list[str]:
    """Overrides as `key.path=value` strings for a command line (a dict's values written as YAML)."""
    if not isinstance(overrides, dict):
        return list(overrides or [])
    texts = []
    for key, value in overrides.items():
        text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
        texts.append(f"{key}={text.removesuffix('...').strip()}")
    return texts


def launch(config: Config, *, run_dir: Optional[Path] = None, resume: Optional[Path] = None,
           overrides: Overrides = None, quiet: bool = False) -> tuple[int, Path]:
    """Run `config` as train.devices ranks on this machine: `python -m cifarlab.cli train` per rank,
    started from `config` written to a file (or `--resume RUN` with `overrides`), all writing
    `run_dir` (default: a new train.out_dir/NAME-TIMESTAMP). Returns the worst exit code of the
    ranks and the run directory. See `supervise` for signals and failures."""
    devices = config.train.devices
    device = select_device(config.train.device)
    if device.type == "cuda" and torch.cuda.device_count() < devices:
        raise ConfigError(f"train.devices={devices}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    reserved = False
    if resume is not None:
        run_dir = runs.resolve_run(resume)
    elif run_dir is None:  # the ranks must agree on the folder: make it here, empty, and hand it to them
        run_dir = runs.create_run_dir(config.train.out_dir, config.run_name())
        (run_dir / runs.CHECKPOINTS).rmdir()
        reserved = True
    with tempfile.TemporaryDirectory(prefix="cifarlab-ranks-") as folder:
        if resume is not None:
            args = ["--resume", str(run_dir), *override_strings(overrides)]
        else:
            write_config(config, Path(folder) / "config.yaml")
            args = ["-c", str(Path(folder) / "config.yaml"), "--run-dir", str(run_dir)]
        env = {**os.environ, "WORLD_SIZE": str(devices), "LOCAL_WORLD_SIZE": str(devices),
               INIT_METHOD_ENV: f"file://{folder}/store"}
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's sockets on 127.0.0.1 only
        command = [sys.executable, "-m", "cifarlab.cli", "train", *args, *(["-q"] if quiet else [])]
        procs: list[subprocess.Popen] = []
        try:
            for r in range(devices):  # each in its own process group, killed if this process dies
                procs.append(processes.start(command, {**env, "RANK": str(r), "LOCAL_RANK": str(r)}))
        except BaseException:
            for proc in procs:
                _kill_group(proc)
                proc.wait()
            raise
        code = supervise(procs)
    if reserved and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()  # nothing was written (the ranks failed before starting the run)
    return code, run_dir


def launch_checked(config: Config, **options: Any) -> Path:
    """`launch`, raising the error the exit code stands for (Interrupted, TrainingFailed, or a
    CifarlabError with the ranks' exit code); returns the run directory. The error is marked
    `reported`: the ranks printed their own errors."""
    code, run_dir = launch(config, **options)
    if code == 0:
        return run_dir
    devices = config.train.devices
    summary = run_dir / runs.SUMMARY
    status = runs.read_summary(run_dir) if summary.is_file() else {}
    why = f": {status['status']}, {status['stop_reason']}" if status.get("status") in ("failed", "diverged") else ""
    if code - 128 in (signal.SIGINT, signal.SIGTERM):
        error: CifarlabError = Interrupted(f"train.devices={devices}: interrupted by "
                                           f"{signal.Signals(code - 128).name}", code - 128, run_dir)
    elif status.get("status") == "diverged":
        error = TrainingFailed(f"train.devices={devices}{why}")
    else:
        error = CifarlabError(f"train.devices={devices}: a rank exited with code {code}{why} (its output says more)")
        error.exit_code = code
    error.reported = True
    raise error


def supervise(procs: Sequence[subprocess.Popen], grace_s: float = GRACE_S) -> int:
    """Wait for the ranks. The first SIGINT / SIGTERM is passed on to them (they stop together at the
    end of the epoch and save last.pt); a second one kills them. When a rank fails, the others get
    `grace_s` seconds to end (a gloo rank notices a dead peer at once), then they are killed. Returns
    the worst exit code of the ranks that ended by themselves (128 + N for signal N)."""
    received: list[int] = []
    killed: set[int] = set()

    def kill_all() -> None:
        for proc in procs:
            if proc.returncode is None and proc.pid not in killed and not _exited(proc):
                killed.add(proc.pid)
                _kill_group(proc)

    def on_signal(signum, frame) -> None:
        received.append(signum)
        if len(received) > 1:
            kill_all()
            return
        for proc in procs:
            if proc.returncode is None:
                _kill_group(proc, signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, on_signal)
    failed_at: Optional[float] = None
    try:
        while any(proc.returncode is None for proc in procs):
            for proc in procs:
                if proc.returncode is None and _exited(proc):
                    _kill_group(proc)  # anything the rank started; its pid stays ours until it is reaped
                    if proc.wait() != 0 and failed_at is None:
                        failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > grace_s:
                kill_all()
            time.sleep(0.05)
    finally:
        kill_all()
        for proc in procs:
            proc.wait()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    codes = [128 - proc.returncode if proc.returncode < 0 else proc.returncode
             for proc in procs if proc.pid not in killed]
    if codes:
        return max(codes)
    return 128 + received[-1] if received else 1


def _exited(proc: subprocess.Popen) -> bool:
    """Whether `proc` has ended, without reaping it (so its process group id cannot be reused yet)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc: subprocess.Popen, signum: int = signal.SIGKILL) -> None:
    """Send `signum` to a rank's process group (the rank and anything it started)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signum)
