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
        pass

    def on_step_end(self, trainer: "Trainer", batch: int, logs: Optional[dict[str, float]]) -> None:
        pass

    def on_epoch_end(self, trainer: "Trainer", record: dict[str, Any]) -> None:
        pass

    def on_train_end(self, trainer: "Trainer") -> None:
        pass

    def on_fit_end(self, trainer: "Trainer", summary: dict[str, Any]) -> None:
        pass

    def on_interrupt(self, trainer: "Trainer", position: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
