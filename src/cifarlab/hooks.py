"""The callback protocol: the Callback base class (every hook a no-op) and TrainerView, the part of
the Trainer that callbacks may use. Callbacks, loggers, progress displays and analysis callbacks
type against TrainerView, so no type import points up to the trainer. This module imports nothing
from cifarlab, so any module can subclass Callback without an import cycle.

Hook order for one run: on_fit_start, then per epoch on_step_end (each step) and on_epoch_end, then
on_train_end and on_fit_end. On SIGINT / SIGTERM on_interrupt replaces the rest; on any other error
on_exception does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class TrainerView(Protocol):
    """What a callback may read from the trainer (and the one thing it may do: `stop`)."""

    config: Any  # the run's cifarlab Config
    run_dir: Optional[Path]
    model: nn.Module
    device: torch.device
    classes: list[str]
    input_shape: tuple[int, int, int]
    splits: Any  # data.prepare.Splits: train / val / test arrays and the normalization
    epoch: int  # the last finished epoch
    current_epoch: int  # the epoch in progress (for step hooks)
    step: int  # optimizer steps so far
    train_time: float
    history: list[dict[str, Any]]
    resuming: bool
    selected_epoch: Optional[int]  # the epoch whose weights are tested (a callback may choose)
    best_epoch: Optional[int]  # the epoch best.pt holds
    best_value: Optional[float]
    test_result: Any  # evaluation.Evaluation of the test split, after on_train_end

    @property
    def steps_per_epoch(self) -> int: ...

    def stop(self, reason: str) -> None: ...

    def elapsed(self) -> float: ...

    def loader(self, split: str, arrays: Any = None) -> Any: ...

    def weights_state(self) -> dict[str, Any]: ...

    def checkpoint_state(self, position: Optional[dict[str, Any]] = None) -> dict[str, Any]: ...


class Callback:
    """Base class of callbacks: every hook does nothing. Override the ones you need."""

    state_key: Optional[str] = None  # the key of this callback's state in last.pt; None: the class name

    def on_fit_start(self, trainer: TrainerView) -> None:
        """The run directory exists and data and model are on the device (also when resuming)."""

    def on_step_end(self, trainer: TrainerView, batch: int, logs: Optional[dict[str, float]]) -> None:
        """After optimizer step `batch` of the epoch; `logs` (running loss, acc, lr) every train.log_every steps."""

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        """After the epoch's evaluation; `record` is its metrics.jsonl line. `trainer.stop(reason)` ends training."""

    def on_train_end(self, trainer: TrainerView) -> None:
        """The loop is over; the weights may still change (the best checkpoint restores its weights here)."""

    def on_fit_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        """The test split is scored (`trainer.test_result`) and summary.json written."""

    def on_interrupt(self, trainer: TrainerView, position: Optional[dict[str, Any]]) -> None:
        """SIGINT / SIGTERM: `position` says where in the epoch it stopped (None: at the end of an epoch)."""

    def on_exception(self, trainer: TrainerView, error: BaseException) -> None:
        """The run failed with `error` (a NaN loss, a failing hook, a full disk, ...) after on_fit_start;
        summary.json already says so. The error is raised again after every callback's on_exception."""

    def state_dict(self) -> dict[str, Any]:
        """This callback's state, saved in last.pt (plain numbers, strings, lists, dicts and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back the state of `state_dict` when a run resumes."""


HOOKS = ("on_fit_start", "on_step_end", "on_epoch_end", "on_train_end", "on_fit_end", "on_interrupt",
         "on_exception")
