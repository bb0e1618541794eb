"""Stopping rules. Each sees every epoch's record and says whether and why training should stop;
each keeps its state in a dict so a resumed run continues exactly."""

from __future__ import annotations

import math
from typing import Any, Optional


class EarlyStopping:
    """Tracks the best value of `monitor`; stops once `patience` epochs in a row failed to beat it
    by more than `min_delta` (Keras semantics; report 001). Losses are minimized, accuracies maximized.
    With enabled=False it still tracks the best epoch (for best.pt) but never stops."""

    def __init__(self, monitor: str, patience: int, min_delta: float = 0.0, enabled: bool = True):
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.enabled = enabled
        self.sign = -1.0 if monitor.endswith("loss") else 1.0
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.wait = 0

    def update(self, epoch: int, record: dict[str, Any]) -> bool:
        """Record one epoch; True when it is the new best. A monitor the record lacks (val_acc with
        data.val_size=0 and early stopping off) never improves: the last epoch stands in for the best."""
        value = record.get(self.monitor, math.nan)
        improved = math.isfinite(value) and (self.best is None or self.sign * (value - self.best) > self.min_delta)
        if improved:
            self.best, self.best_epoch, self.wait = value, epoch, 0
        else:
            self.wait += 1
        return improved

    def stop_reason(self) -> Optional[str]:
        if self.enabled and self.best is not None and self.wait >= self.patience:
            return (f"early stopping: {self.monitor} did not improve by more than {self.min_delta} "
                    f"for {self.patience} epochs (best {self.best:.4f} at epoch {self.best_epoch})")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]


class DivergenceStop:
    """Report 000's rule: after `warmup` epochs, stop when the validation loss rose while the
    training loss fell, `epochs` epochs in a row."""

    def __init__(self, warmup: int = 5, epochs: int = 3):
        self.warmup = warmup
        self.epochs = epochs
        self.previous: Optional[tuple[float, float]] = None
        self.streak = 0
        self.epoch = 0

    def update(self, epoch: int, record: dict[str, Any]) -> None:
        current = (record["train_loss"], record["val_loss"])
        diverging = (self.previous is not None and epoch > self.warmup
                     and current[1] > self.previous[1] and current[0] < self.previous[0])
        self.streak = self.streak + 1 if diverging else 0
        self.previous, self.epoch = current, epoch

    def stop_reason(self) -> Optional[str]:
        if self.streak >= self.epochs:
            return (f"diverging losses: validation loss rose while training loss fell for {self.epochs} "
                    f"epochs in a row (epochs {self.epoch - self.epochs + 1}-{self.epoch})")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"previous": list(self.previous) if self.previous else None, "streak": self.streak, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.previous = tuple(state["previous"]) if state["previous"] else None
        self.streak, self.epoch = state["streak"], state["epoch"]


class TargetStop:
    """Stop once `metric` reaches `value` (accuracies: at or above; losses: at or below)."""

    def __init__(self, metric: str, value: float):
        self.metric = metric
        self.value = value
        self.reached: Optional[tuple[int, float]] = None

    def update(self, epoch: int, record: dict[str, Any]) -> None:
        got = record[self.metric]
        done = got <= self.value if self.metric.endswith("loss") else got >= self.value
        if done and self.reached is None:
            self.reached = (epoch, got)

    def stop_reason(self) -> Optional[str]:
        if self.reached is None:
            return None
        epoch, got = self.reached
        return f"target reached: {self.metric} {got:.4f} at epoch {epoch} (target {self.value})"

    def state_dict(self) -> dict[str, Any]:
        return {"reached": list(self.reached) if self.reached else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reached = tuple(state["reached"]) if state["reached"] else None
