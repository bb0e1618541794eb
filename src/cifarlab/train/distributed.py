"""Data-parallel training (`train.devices=N`): a launcher that starts N ranks on this machine, and
the helpers the trainer uses inside a rank (process group, collectives, sharded evaluation).

`train.batch_size` is the global batch: every rank takes a contiguous 1/N slice of each global
batch, the gradients are averaged by DistributedDataParallel, and the loss is scaled so that the
update equals the single-process one with that batch (see docs/architecture.md, "Data-parallel
training").

The launcher (`launch`) runs `python -m cifarlab.cli train ...` N times with RANK, LOCAL_RANK and
WORLD_SIZE set; the ranks meet through a FileStore in a temporary folder (no TCP store), and gloo's
sockets bind the loopback interface (GLOO_SOCKET_IFNAME=lo unless set), so nothing listens beyond
127.0.0.1. A process that already is a rank (WORLD_SIZE set, as torchrun sets it) joins the group
from env:// instead, or from the file:// store named by CIFARLAB_DIST_INIT.
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
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from .. import processes, runs
from ..config import Config, Overrides, TrainConfig, write_config
from ..data.loader import DeviceLoader, shard
from ..data.prepare import select_device
from ..errors import CifarlabError, ConfigError, Interrupted, TrainingFailed
from ..evaluation import Evaluation, evaluate

INIT_METHOD_ENV = "CIFARLAB_DIST_INIT"  # the launcher's file:// rendezvous, for its ranks
GRACE_S = 5.0  # after a rank fails, the others get this long to end by themselves before they are killed


class RankLost(CifarlabError):
    """A collective failed because another rank ended; that rank's own output says why (exit code 1)."""

    exit_code = 1


# ---------------------------------------------------------------- inside a rank


def is_rank_process() -> bool:
    """Whether this process was started as one rank of several (WORLD_SIZE is set)."""
    return "WORLD_SIZE" in os.environ


def launches(config: Config) -> bool:
    """Whether running `config` here means starting its ranks (train.devices > 1, not a rank yet)."""
    return config.train.devices > 1 and not is_rank_process()


def main_process() -> bool:
    """Whether this process is rank 0 (or not a rank at all); usable before and after the process group."""
    return os.environ.get("RANK", "0") == "0"


def join(devices: int, device: torch.device) -> torch.device:
    """Join the process group of `devices` ranks (nccl on CUDA, else gloo) and return this rank's
    device (cuda:LOCAL_RANK on GPUs). WORLD_SIZE must be `devices`."""
    if not is_rank_process():
        raise ConfigError(f"train.devices={devices}: start the run with `cifarlab train` or cifarlab.fit (they "
                          "start the ranks), or with torchrun")
    world = int(os.environ["WORLD_SIZE"])
    if world != devices:
        raise ConfigError(f"train.devices={devices}, but {world} processes were started (WORLD_SIZE={world}); "
                          f"set train.devices={world}")
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method=os.environ.get(INIT_METHOD_ENV, "env://"), rank=rank, world_size=world)
    return device


def leave(together: bool = False) -> None:
    """Destroy the process group (if this process joined one). `together`: first wait until every
    rank got here (a rank that tears its connections down while another still uses them can abort it)."""
    if not dist.is_initialized():
        return
    if together:
        with contextlib.suppress(RuntimeError):  # a rank that ended: nothing left to wait for
            dist.barrier()
    dist.destroy_process_group()


def rank() -> int:
    """This process' rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this is rank 0, the one that writes the run directory."""
    return rank() == 0


def default_threads() -> int:
    """CPU threads of one process: the cores shared by the ranks on this machine."""
    return processes.cores_per(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def rank_seed(seed: int, rank: int) -> int:
    """A seed for rank `rank`'s own random draws (augmentation, dropout), mixed from the run seed."""
    return int(np.random.SeedSequence([seed % 2**63, rank]).generate_state(1, np.uint64)[0] % 2**63)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """`values` summed over the ranks, in place (unchanged in a single process)."""
    if world_size() > 1:
        dist.all_reduce(values)
    return values


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order."""
    if world_size() == 1:
        return [obj]
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any) -> Any:
    """Rank 0's `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def broadcast_module(module: nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's parameters and buffers (or only buffers, e.g. batch-norm statistics) on every rank."""
    if world_size() == 1:
        return
    tensors = list(module.buffers()) if buffers_only else [*module.parameters(), *module.buffers()]
    for tensor in tensors:
        dist.broadcast(tensor.data, src=0)


def gather_rows(local: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
    """The rows of every rank concatenated in rank order; rank r holds lengths[r] rows. The parts are
    padded to the longest for the collective and trimmed after it."""
    if world_size() == 1:
        return local
    padded = local.new_zeros((max(lengths), *local.shape[1:]))
    padded[:len(local)] = local
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, lengths)])


def evaluate_sharded(model: nn.Module, loader: DeviceLoader, total: int, classes: int,
                     settings: Optional[TrainConfig] = None) -> Evaluation:
    """Score a split whose `total` images are cut into one contiguous part per rank (`shard`;
    `loader` holds this rank's part): every image is scored once, and every rank gets the whole
    split's logits, loss and accuracy."""
    world = world_size()
    lengths = [stop - start for start, stop in (shard(total, r, world) for r in range(world))]
    local = evaluate(model, loader, settings)
    logits = gather_rows(local.logits.reshape(len(loader.labels), classes), lengths)
    labels = gather_rows(loader.labels, lengths)
    predicted = logits.argmax(1)
    n = max(total, 1)
    loss = F.cross_entropy(logits, labels, reduction="sum").double().item() / n
    return Evaluation(loss, (predicted == labels).sum().item() / n, logits, predicted)


def lost_rank(error: BaseException) -> bool:
    """Whether `error` is a collective that failed because another rank's process ended."""
    text = str(error)
    return (dist.is_initialized() and isinstance(error, RuntimeError)
            and ("closed by peer" in text or "reset by peer" in text or isinstance(error, dist.DistError)))


@contextlib.contextmanager
def peer_errors() -> Iterator[None]:
    """Turn a collective that failed because another rank ended into RankLost (one line, exit 1)."""
    try:
        yield
    except RuntimeError as e:
        if not lost_rank(e):
            raise
        lines = str(e).strip().splitlines()
        raise RankLost(f"rank {rank()}: another rank ended, see its output ({lines[0] if lines else e})") from None


# ---------------------------------------------------------------- the launcher


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
    CifarlabError with the ranks' exit code); returns the run directory."""
    code, run_dir = launch(config, **options)
    if code == 0:
        return run_dir
    devices = config.train.devices
    if code - 128 in (signal.SIGINT, signal.SIGTERM):
        raise Interrupted(f"train.devices={devices}: interrupted by {signal.Signals(code - 128).name}",
                          code - 128, run_dir)
    summary = run_dir / runs.SUMMARY
    status = runs.read_summary(run_dir) if summary.is_file() else {}
    why = f": {status['status']}, {status['stop_reason']}" if status.get("status") in ("failed", "diverged") else ""
    if status.get("status") == "diverged":
        raise TrainingFailed(f"train.devices={devices}{why}")
    error = CifarlabError(f"train.devices={devices}: a rank exited with code {code}{why} (its output says more)")
    error.exit_code = code
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
