"""The Callback base class: every hook of the protocol (see train/callbacks.py) as a no-op. It imports
nothing from cifarlab, so any module can subclass it without an import cycle (config.py imports
train/loggers.py to check logger names)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from .trainer import Trainer


class Callback:
    """Base class of callbacks: every hook does nothing. Override the ones you need."""

    state_key: Optional[str] = None  # the key of this callback's state in last.pt; None: the class name

    def on_fit_start(self, trainer: "Trainer") -> None:
        """The run directory exists and data and model are on the device (also when resuming)."""

    def on_step_end(self, trainer: "Trainer", batch: int, logs: Optional[dict[str, float]]) -> None:
        """After optimizer step `batch` of the epoch; `logs` (running loss, acc, lr) every train.log_every steps."""

    def on_epoch_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        """After the epoch's evaluation; `record` is its metrics.jsonl line. `trainer.stop(reason)` ends training."""

    def on_train_end(self, trainer: "Trainer") -> None:
        """The loop is over; the weights may still change (the best checkpoint restores its weights here)."""

    def on_fit_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        """The test split is scored (`trainer.test_result`) and summary.json written."""

    def on_interrupt(self, trainer: "Trainer", position: Optional[dict[str, Any]]) -> None:
        """SIGINT / SIGTERM: `position` says where in the epoch it stopped (None: at the end of an epoch)."""

    def state_dict(self) -> dict[str, Any]:
        """This callback's state, saved in last.pt (plain numbers, strings, lists, dicts and tensors)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back the state of `state_dict` when a run resumes."""
