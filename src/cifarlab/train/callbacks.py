"""Early stopping on a monitored metric (report 001: patience 5, keep the best model)."""

from __future__ import annotations

import math
from typing import Optional


class EarlyStopping:
    """Tracks the best value of `monitor`; `should_stop` once `patience` epochs in a row failed to
    beat it by more than `min_delta` (Keras semantics). Losses are minimized, accuracies maximized."""

    def __init__(self, monitor: str, patience: int, min_delta: float = 0.0, enabled: bool = True):
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.enabled = enabled
        self.sign = -1.0 if monitor.endswith("loss") else 1.0
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None
        self.wait = 0

    def update(self, epoch: int, metrics: dict[str, float]) -> bool:
        """Record one epoch; True when it is the new best."""
        value = metrics[self.monitor]
        improved = math.isfinite(value) and (
            self.best is None or self.sign * (value - self.best) > self.min_delta)
        if improved:
            self.best, self.best_epoch, self.wait = value, epoch, 0
        else:
            self.wait += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.enabled and self.wait >= self.patience and self.best is not None

    def reason(self) -> str:
        return (f"early stopping: {self.monitor} did not improve by more than {self.min_delta} "
                f"for {self.patience} epochs (best {self.best:.4f} at epoch {self.best_epoch})")
