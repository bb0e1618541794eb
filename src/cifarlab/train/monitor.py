"""The one place that decides "is this an improvement" for every rule that watches a metric: early
stopping, the best checkpoint, the target rule and the plateau LR schedule (Keras' MonitorCallback
is the model). No imports from cifarlab, so the optimizer module can use it too."""

from __future__ import annotations

import math
from typing import Any, Optional


class Monitor:
    """The best value of one metric so far. Losses are minimized and everything else maximized
    (mode "auto"), or as `mode` says; an improvement must beat the best by more than `min_delta`
    (Keras' MonitorCallback). NaN and infinite values never improve."""

    def __init__(self, metric: str, min_delta: float = 0.0, mode: str = "auto"):
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode={mode!r}: use auto, min or max")
        self.metric = metric
        self.min_delta = min_delta
        self.minimize = mode == "min" or (mode == "auto" and metric.endswith("loss"))
        self.best: Optional[float] = None
        self.best_epoch: Optional[int] = None

    def value(self, record: dict[str, Any]) -> float:
        return record.get(self.metric, math.nan)

    def is_better(self, value: float, reference: Optional[float]) -> bool:
        """Finite, and better than `reference` by more than min_delta (any finite value beats None)."""
        if not math.isfinite(value):
            return False
        if reference is None:
            return True
        gain = reference - value if self.minimize else value - reference
        return gain > self.min_delta

    def reached(self, value: float, target: float) -> bool:
        """At or past `target` in the monitor's direction."""
        return value <= target if self.minimize else value >= target

    def update(self, epoch: int, record: dict[str, Any]) -> bool:
        """Take one epoch's record; True when it holds a new best."""
        value = self.value(record)
        if not self.is_better(value, self.best):
            return False
        self.best, self.best_epoch = value, epoch
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch = state["best"], state["best_epoch"]
