"""How a run is spread over processes: one process (`SingleProcess`), or one rank of a data-parallel
run (`DataParallel`, train.devices=N). The trainer's loop is the same for both and asks its strategy
wherever they differ: joining, wrapping the model, the loss of a step, evaluating a split, summing an
epoch's totals, agreeing to stop, and sharing what rank 0 decided. Lightning's Strategy classes play
this part there.

With several ranks the model is wrapped in DistributedDataParallel for the training forward and
backward only, each rank trains on its slice of every global batch and scores its part of each split,
and only rank 0 runs the callbacks and writes the run directory.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import processes
from ..data.loader import shard
from ..evaluation import Evaluation, evaluate
from . import distributed


class SingleProcess:
    """Training in this process alone."""

    world, rank, is_main = 1, 0, True
    stops_mid_epoch = True  # a signal stops the run after the current step

    def setup(self, devices: int, device: torch.device, threads: Optional[int]) -> torch.device:
        """Set the CPU threads and return the device to train on."""
        torch.set_num_threads(threads or processes.cores())
        return device

    def augment_generator(self, generator: torch.Generator, seed: int) -> torch.Generator:
        """The generator of augmentation draws (mixup, crops, ...): the permutation's own one here."""
        return generator

    def wrap(self, model: nn.Module) -> nn.Module:
        """What the training forward calls."""
        return model

    def part(self, arrays: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """The part of a split this process scores: all of it."""
        return arrays

    def score(self, model: nn.Module, loader, total: int, classes: int, precision: str, tta: str) -> Evaluation:
        return evaluate(model, loader, precision, tta)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, smoothing: float, penalty: Optional[torch.Tensor],
             global_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to back-propagate, the batch's summed loss as a detached float64): mean cross-entropy
        of the batch plus the L2 penalty."""
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing)
        if penalty is not None:
            loss = loss + penalty
        return loss, loss.detach().double() * len(logits)

    def totals(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, int, int]:
        """(summed loss, correct, images) of the epoch so far."""
        return loss_sum.item(), correct.item(), seen

    def share_buffers(self, model: nn.Module) -> None:
        """Before a split is scored: nothing to share in one process."""

    def share_weights(self, model: nn.Module) -> None:
        """After the callbacks may have changed the weights: nothing to share in one process."""

    def share(self, value: Any) -> Any:
        """Rank 0's `value` (a run directory's path, ...)."""
        return value

    def gather_rng(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Every rank's RNG states, for last.pt: none beyond the process' own in one process."""
        return []

    def agree(self, stop_reasons: list[str], signum: Optional[int]) -> tuple[list[str], Optional[int]]:
        """The stop reasons and signal every rank acts on: this process' own."""
        return stop_reasons, signum

    def errors(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def leave(self, completed: bool) -> None:
        """After the run: nothing to leave."""


class DataParallel(SingleProcess):
    """One rank of train.devices ranks (started by train/launch.py or torchrun)."""

    stops_mid_epoch = False  # ranks stop together, at an epoch's end

    def setup(self, devices: int, device: torch.device, threads: Optional[int]) -> torch.device:
        torch.set_num_threads(threads or distributed.default_threads())
        device = distributed.join(devices, device)
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = self.rank == 0
        self.device = device
        return device

    def augment_generator(self, generator: torch.Generator, seed: int) -> torch.Generator:
        """The rank's own generator; dropout draws differ per rank too (DDP syncs the built weights)."""
        own = distributed.rank_seed(seed, self.rank)
        torch.manual_seed(own)
        return torch.Generator(device=generator.device).manual_seed(own)

    def wrap(self, model: nn.Module) -> nn.Module:
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def part(self, arrays: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """This rank's contiguous part of a split."""
        images, labels = arrays
        start, stop = shard(len(labels), self.rank, self.world)
        return images[start:stop], labels[start:stop]

    def score(self, model: nn.Module, loader, total: int, classes: int, precision: str, tta: str) -> Evaluation:
        """Each rank scores its part; every rank gets the result of the whole split."""
        return distributed.evaluate_sharded(model, loader, total, classes, precision, tta)

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, smoothing: float, penalty: Optional[torch.Tensor],
             global_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank's summed per-image losses x ranks / global_size (plus the whole L2 penalty), so DDP's
        average of the ranks' gradients is the single-process gradient of the global batch; the summed
        loss is this rank's part of the batch's (its per-image losses plus the penalty each)."""
        summed = F.cross_entropy(logits.float(), targets, label_smoothing=smoothing, reduction="sum")
        loss = summed * (self.world / global_size)
        if penalty is not None:
            loss, summed = loss + penalty, summed + penalty * len(logits)
        return loss, summed.detach().double()

    def totals(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, int, int]:
        """(summed loss, correct, images) of the epoch so far, over all ranks."""
        values = torch.stack([loss_sum, correct.double(), torch.tensor(seen, dtype=torch.float64, device=self.device)])
        loss, hits, images = distributed.all_reduce_sum(values).tolist()
        return loss, round(hits), round(images)

    def share_buffers(self, model: nn.Module) -> None:
        """Batch-norm statistics differ per rank: every rank scores (and rank 0 saves) rank 0's."""
        distributed.broadcast_module(model, buffers_only=True)

    def share_weights(self, model: nn.Module) -> None:
        """Rank 0's callbacks may have put the best epoch's weights back."""
        distributed.broadcast_module(model)

    def share(self, value: Any) -> Any:
        with distributed.peer_errors():
            return distributed.broadcast_object(value)

    def gather_rng(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        return distributed.all_gather_object(state)

    def agree(self, stop_reasons: list[str], signum: Optional[int]) -> tuple[list[str], Optional[int]]:
        """Rank 0's stop reasons and the first signal any rank received, so that all ranks stop after
        the same epoch."""
        decisions = distributed.all_gather_object((stop_reasons, signum))
        return list(decisions[0][0]), next((got for _, got in decisions if got is not None), None)

    def errors(self) -> ContextManager[None]:
        """A collective that failed because another rank ended becomes RankLost (one line)."""
        return distributed.peer_errors()

    def leave(self, completed: bool) -> None:
        distributed.leave(together=completed)


def strategy_for(devices: int) -> SingleProcess:
    """The strategy of a run with train.devices=`devices`."""
    return DataParallel() if devices > 1 else SingleProcess()

