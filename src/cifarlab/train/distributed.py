"""Data-parallel training inside one rank (`train.devices=N`): joining and leaving the process group,
the collectives the data-parallel strategy (train/strategy.py) uses, and sharded evaluation.
train/launch.py starts the ranks.

`train.batch_size` is the global batch: every rank takes a contiguous 1/N slice of each global
batch, the gradients are averaged by DistributedDataParallel, and the loss is scaled so that the
update equals the single-process one with that batch (see docs/architecture.md, "Data-parallel
training"). A rank joins from env:// (as torchrun starts it), or from the file:// store named by
CIFARLAB_DIST_INIT (as train/launch.py starts it).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import processes
from ..data.loader import DeviceLoader, shard
from ..errors import CifarlabError, ConfigError, first_line
from ..evaluation import Evaluation, evaluate

INIT_METHOD_ENV = "CIFARLAB_DIST_INIT"  # the launcher's file:// rendezvous, for its ranks


class RankLost(CifarlabError):
    """A collective failed because another rank ended; that rank's own output says why (exit code 1)."""

    exit_code = 1


def is_rank_process() -> bool:
    """Whether this process was started as one rank of several (WORLD_SIZE is set)."""
    return "WORLD_SIZE" in os.environ


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


def evaluate_sharded(model: nn.Module, loader: DeviceLoader, total: int, classes: int, precision: str = "float32",
                     tta: str = "none") -> Evaluation:
    """Score a split whose `total` images are cut into one contiguous part per rank (`shard`;
    `loader` holds this rank's part): every image is scored once, and every rank gets the whole
    split's logits, loss and accuracy."""
    world = world_size()
    lengths = [stop - start for start, stop in (shard(total, r, world) for r in range(world))]
    local = evaluate(model, loader, precision, tta)
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
        raise RankLost(f"rank {rank()}: another rank ended, see its output ({first_line(e)})") from None


