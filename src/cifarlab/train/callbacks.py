"""The callbacks the trainer runs by default, and the callback protocol they follow (cifarlab/hooks.py).

A callback is any object with some of these hooks (the Callback base class gives no-op versions of
all of them; subclassing it is optional):

    on_fit_start(trainer)                  the run directory exists; data and model are on the device
    on_step_end(trainer, batch, logs)      after each optimizer step; `logs` (loss, acc, lr of the epoch
                                           so far) every train.log_every steps, else None (no device sync)
    on_epoch_end(trainer, record)          the epoch's record (train and validation metrics, time)
    on_train_end(trainer)                  the loop is over; the weights may still change (best weights)
    on_fit_end(trainer, summary)           the test split is scored and summary.json written
    on_interrupt(trainer, position)        SIGINT / SIGTERM: `position` says where in the epoch it stopped
    on_exception(trainer, error)           any other error ended the run (summary.json says so already)

and optionally `state_dict()` / `load_state_dict(state)`, stored in last.pt under the callback's `state_key`
(default: its class name), so a resumed run continues with the callback's exact state. A callback
asks to stop training with `trainer.stop(reason)`; the trainer stops after the epoch's callbacks.

One `Monitor` (train/monitor.py) decides "is this an improvement" for every callback that watches a metric.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, Optional

import torch

from .. import runs
from ..errors import TrainingFailed
from ..hooks import Callback, TrainerView
from .monitor import Monitor



class StoppingRule(Callback, ABC):
    """A rule that sees every epoch's record (`update`) and may give a reason to stop (`stop_reason`);
    both can be used without a trainer."""

    @abstractmethod
    def update(self, epoch: int, record: dict[str, Any]) -> Any:
        """Take one epoch's record."""

    @abstractmethod
    def stop_reason(self) -> Optional[str]:
        """Why training should stop now, or None."""

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        self.update(record["epoch"], record)
        reason = self.stop_reason()
        if reason:
            trainer.stop(reason)


class EarlyStopping(StoppingRule):
    """Stops once `patience` epochs in a row failed to beat the best `monitor` value by more than
    `min_delta` (Keras semantics; report 001). Losses are minimized, accuracies maximized."""

    def __init__(self, monitor: str, patience: int, min_delta: float = 0.0):
        self.monitor = Monitor(monitor, min_delta)
        self.patience = patience
        self.wait = 0

    @property
    def best(self) -> Optional[float]:
        return self.monitor.best

    @property
    def best_epoch(self) -> Optional[int]:
        return self.monitor.best_epoch

    def update(self, epoch: int, record: dict[str, Any]) -> bool:
        """Record one epoch; True when it is the new best."""
        improved = self.monitor.update(epoch, record)
        self.wait = 0 if improved else self.wait + 1
        return improved

    def stop_reason(self) -> Optional[str]:
        m = self.monitor
        if m.best is not None and self.wait >= self.patience:
            return (f"early stopping: {m.metric} did not improve by more than {m.min_delta} "
                    f"for {self.patience} epochs (best {m.best:.4f} at epoch {m.best_epoch})")
        return None

    def state_dict(self) -> dict[str, Any]:
        return {**self.monitor.state_dict(), "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)
        self.wait = state["wait"]


class DivergenceStop(StoppingRule):
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


class TargetStop(StoppingRule):
    """Stop once `metric` reaches `value` (accuracies: at or above; losses: at or below)."""

    def __init__(self, metric: str, value: float):
        self.monitor = Monitor(metric)
        self.value = value
        self.reached: Optional[tuple[int, float]] = None

    def update(self, epoch: int, record: dict[str, Any]) -> None:
        got = record[self.monitor.metric]
        if self.reached is None and self.monitor.reached(got, self.value):
            self.reached = (epoch, got)

    def stop_reason(self) -> Optional[str]:
        if self.reached is None:
            return None
        epoch, got = self.reached
        return f"target reached: {self.monitor.metric} {got:.4f} at epoch {epoch} (target {self.value})"

    def state_dict(self) -> dict[str, Any]:
        return {"reached": list(self.reached) if self.reached else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reached = tuple(state["reached"]) if state["reached"] else None


class TimeLimit(Callback):
    """Stop after the epoch in which the training time (not evaluation, not the report) passes `seconds`."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        if trainer.train_time >= self.seconds:
            trainer.stop(f"time limit: {trainer.train_time:.0f} s of training >= {self.seconds:g} s")


class NaNGuard(Callback):
    """Fail the run (exit code 1, status "diverged") when an epoch's training loss is NaN or infinite,
    before any checkpoint takes the broken weights."""

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        if not math.isfinite(record["train_loss"]):
            raise TrainingFailed(f"diverged: training loss became {record['train_loss']} in epoch {record['epoch']}")


class BestCheckpoint(Callback):
    """best.pt: the weights of the epoch with the best `monitor` value (the same rule as early
    stopping, so the stopped run's best epoch is the one saved). When training ends, `restore` (the
    tested weights are the best: train.test_weights) puts those weights back for the test score;
    summary.json's best_epoch is the best epoch, tested_epoch the one whose weights were tested."""

    def __init__(self, monitor: str, min_delta: float = 0.0, restore: bool = True):
        self.monitor = Monitor(monitor, min_delta)
        self.restore = restore

    def path(self, trainer: TrainerView):
        return trainer.run_dir / runs.CHECKPOINTS / "best.pt"

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        if self.monitor.update(record["epoch"], record):
            runs.save_checkpoint(trainer.weights_state(), self.path(trainer))

    def on_train_end(self, trainer: TrainerView) -> None:
        if self.monitor.best_epoch is None:  # the monitored metric was never finite: the last epoch stands in
            runs.save_checkpoint(trainer.weights_state(), self.path(trainer))
        best = self.monitor.best_epoch or trainer.epoch
        trainer.best_epoch = best
        if self.restore and best != trainer.epoch:
            trainer.model.load_state_dict(runs.load_checkpoint(self.path(trainer), str(trainer.device))["model"])
            trainer.selected_epoch = best
        trainer.best_value = self.monitor.best

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.monitor.load_state_dict(state)


class LastCheckpoint(Callback):
    """last.pt after every epoch and on an interrupt: everything a resumed run needs, including every
    callback's state (so it runs after all other callbacks)."""

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        runs.save_checkpoint(trainer.checkpoint_state(), trainer.run_dir / runs.CHECKPOINTS / "last.pt")

    def on_interrupt(self, trainer: TrainerView, position: dict[str, Any]) -> None:
        runs.save_checkpoint(trainer.checkpoint_state(position), trainer.run_dir / runs.CHECKPOINTS / "last.pt")


class MetricsLog(Callback):
    """metrics.jsonl: a line per train.log_every steps (running loss, accuracy, LR), per epoch, and
    the test score at the end. A resumed run cuts the file back to the lines its checkpoint knew."""

    def __init__(self):
        self.lines = 0

    def write(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        runs.append_jsonl(trainer.run_dir / runs.METRICS, record)
        self.lines += 1

    def on_fit_start(self, trainer: TrainerView) -> None:
        runs.keep_lines(trainer.run_dir / runs.METRICS, self.lines)

    def on_step_end(self, trainer: TrainerView, batch: int, logs: Optional[dict[str, float]]) -> None:
        if logs is not None:
            self.write(trainer, {"kind": "step", "epoch": trainer.current_epoch, "step": trainer.step, **logs,
                                 "time": {"elapsed_s": round(trainer.elapsed(), 3)}})

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        self.write(trainer, record)

    def on_fit_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        test = trainer.test_result
        self.write(trainer, {"kind": "test", "epoch": trainer.selected_epoch, "test_loss": test.loss,
                             "test_acc": test.acc})

    def state_dict(self) -> dict[str, Any]:
        return {"lines": self.lines}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lines = state["lines"]


class Lookahead(Callback):
    """airbench's lookahead: every `every` steps an exponential average of the weights (and the batch-norm
    statistics) moves towards them, ema += (1 - d) (weights - ema) with d = decay x (step / total steps)^power,
    and the weights are set to it; at the run's last step (train.epochs x steps per epoch) the weights
    take the average. Early on d is ~0 (the average is the weights); towards the end the weights are pulled
    back to the average. So the weights each epoch ends with (the ones scored, saved in best.pt and
    last.pt, and tested) are the pulled-back ones, and the final ones are the average: train.test_weights
    chooses between best.pt and last.pt as always. The average is in last.pt, so a resumed run is exact."""

    def __init__(self, every: int, decay: float, power: float):
        self.every, self.decay, self.power = every, decay, power
        self.ema: Optional[dict[str, torch.Tensor]] = None

    def on_fit_start(self, trainer: TrainerView) -> None:
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
        self.ema = {k: v.to(trainer.device) for k, v in self.ema.items()}

    @torch.no_grad()
    def on_step_end(self, trainer: TrainerView, batch: int, logs: Optional[dict[str, float]]) -> None:
        total, step = trainer.config.train.epochs * trainer.steps_per_epoch, trainer.step
        if step % self.every and step < total:
            return
        state = trainer.model.state_dict()
        if step % self.every == 0:
            weight = 1 - self.decay * (min(step, total) / total) ** self.power
            for key, average in self.ema.items():
                average.lerp_(state[key].to(average.dtype), weight)
        for key, average in self.ema.items():
            state[key].copy_(average)

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema = dict(state["ema"])
