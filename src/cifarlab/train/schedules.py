"""Learning-rate schedules: the SCHEDULES registry (schedule.name -> factor of the base learning rate as a
function of the fractional epoch; a new schedule is one entry there, and the config takes its allowed
names from it) and LRSchedule, which sets the learning rate of every step."""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ..errors import ConfigError
from .monitor import Monitor

# Each factor function takes the LRSchedule (for its config, epoch count and min_factor) and the
# epochs done, fractional; the epoch-wise ones change at epoch boundaries as in torch.


def _constant(s: "LRSchedule", t: float) -> float:
    return 1.0


def _step(s: "LRSchedule", t: float) -> float:
    return s.c.gamma ** (int(t) // s.c.step_size)


def _multistep(s: "LRSchedule", t: float) -> float:
    return s.c.gamma ** sum(int(t) >= m for m in s.c.milestones)


def _exponential(s: "LRSchedule", t: float) -> float:
    return s.c.gamma ** int(t)


def _cosine(s: "LRSchedule", t: float) -> float:
    return s.min_factor + (1 - s.min_factor) * 0.5 * (1 + math.cos(math.pi * min(t / s.epochs, 1.0)))


def _one_cycle(s: "LRSchedule", t: float) -> float:
    """torch OneCycleLR shape: cosine from 1/div up to 1 over pct_start, then down to 1/(div*final_div)."""
    c, progress = s.c, t / s.epochs
    start, end = 1 / c.div_factor, 1 / (c.div_factor * c.final_div_factor)
    if progress < c.pct_start:
        a, b, p = start, 1.0, progress / c.pct_start
    else:
        a, b, p = 1.0, end, min((progress - c.pct_start) / (1 - c.pct_start), 1.0)
    return b + (a - b) * 0.5 * (1 + math.cos(math.pi * p))


# schedule.name -> factor function; the config accepts exactly these names, in this order in its errors.
SCHEDULES: dict[str, Callable[["LRSchedule", float], float]] = {
    "constant": _constant,
    "step": _step,
    "multistep": _multistep,
    "exponential": _exponential,
    "cosine": _cosine,
    "onecycle": _one_cycle,
    # Constant until its monitor stalls: the reductions are LRSchedule.scale, kept by epoch_end.
    "plateau": _constant,
}


class LRSchedule:
    """The learning rate of every step: base lr x schedule factor x plateau scale.

    Every schedule is a function of the (fractional) epoch, so it is evaluated per step (see SCHEDULES).
    `warmup_epochs` ramps any schedule up linearly from zero. `plateau` divides by 1/factor when
    its monitor has not improved for `patience` epochs (torch ReduceLROnPlateau, mode from the name).
    """

    def __init__(self, c, base_lr: float, epochs: int, steps_per_epoch: int):
        if c.name not in SCHEDULES:
            raise ConfigError(f"schedule.name={c.name}: unknown schedule (known: {', '.join(SCHEDULES)})")
        self.c = c
        self.min_factor = c.min_lr / base_lr
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.scale = 1.0
        self.monitor = Monitor(c.monitor, c.threshold)  # plateau: torch ReduceLROnPlateau's threshold, absolute
        self.wait = 0

    def factor(self, step: int) -> float:
        c = self.c
        t = step / self.steps_per_epoch  # epochs done, fractional
        f = SCHEDULES[c.name](self, t)
        if c.warmup_epochs > 0 and t < c.warmup_epochs:
            f *= (step + 1) / (c.warmup_epochs * self.steps_per_epoch)
        return f * self.scale

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        f = self.factor(step)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            frozen = group.get("frozen_after_epochs")  # a whitening layer's bias (train/optim.py parameter_groups)
            group["lr"] = 0.0 if frozen is not None and step >= frozen * self.steps_per_epoch else group["initial_lr"] * f
        return optimizer.param_groups[0]["lr"]

    def epoch_end(self, record: dict[str, Any]) -> None:
        if self.c.name != "plateau":
            return
        if self.c.monitor not in record:
            raise ConfigError(f"schedule.monitor={self.c.monitor}: not measured (add its split to train.evaluate)")
        if self.monitor.update(record.get("epoch", 0), record):
            self.wait = 0
            return
        self.wait += 1
        if self.wait > self.c.patience:
            self.scale *= self.c.factor
            self.wait = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "best": self.monitor.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.monitor.best, self.wait = state["scale"], state["best"], state["wait"]
