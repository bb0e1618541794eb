"""Optimizers, learning-rate schedules and the Keras-style L2 kernel penalty."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import nn

from ..errors import ConfigError


class ProximalAdagrad(torch.optim.Optimizer):
    """Adagrad with a proximal step for l1 / l2 regularization, with TensorFlow's semantics
    (tf.compat.v1.train.ProximalAdagradOptimizer, ApplyProximalAdagrad):

        accum += g**2;  lr_t = lr / sqrt(accum);  v = w - lr_t * g
        w = sign(v) * max(|v| - lr_t * l1, 0) / (1 + lr_t * l2)
    """

    def __init__(self, params, lr: float = 0.001, l1: float = 0.0, l2: float = 0.0,
                 initial_accumulator_value: float = 0.1):
        if initial_accumulator_value <= 0:
            raise ValueError("initial_accumulator_value must be > 0")
        super().__init__(params, {"lr": lr, "l1": l1, "l2": l2, "initial_accumulator_value": initial_accumulator_value})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["accum"] = torch.full_like(p, group["initial_accumulator_value"])
                accum = state["accum"]
                accum.addcmul_(p.grad, p.grad)
                rate = group["lr"] / accum.sqrt()
                v = p - rate * p.grad
                if group["l1"] > 0:
                    v = v.sign() * (v.abs() - rate * group["l1"]).clamp_min(0)
                p.copy_(v / (1 + rate * group["l2"]))
        return loss


def make_optimizer(c, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer an OptimConfig names; unset eps / alpha / rho keep torch's defaults. SGD, Adam(W)
    and Adagrad use torch's fused kernels (one call for all parameters: on a 2-core CPU an Adam
    step of cnn3-avg takes a fraction of the per-parameter loop's time), the others the foreach ones."""
    params = [p for p in model.parameters() if p.requires_grad]
    extra: dict[str, Any] = {"eps": c.eps} if c.eps is not None else {}
    fused = {"fused": True}
    if c.name == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay,
                               **fused)
    if c.name == "adam":
        return torch.optim.Adam(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, **extra, **fused)
    if c.name == "adamw":
        return torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, **extra, **fused)
    if c.name == "adagrad":
        return torch.optim.Adagrad(params, lr=c.lr, weight_decay=c.weight_decay,
                                   initial_accumulator_value=c.initial_accumulator or 0.0, **extra, **fused)
    if c.name == "rmsprop":
        return torch.optim.RMSprop(params, lr=c.lr, alpha=c.alpha, momentum=c.momentum,
                                   weight_decay=c.weight_decay, foreach=True, **extra)
    if c.name == "adadelta":
        return torch.optim.Adadelta(params, lr=c.lr, rho=c.rho, weight_decay=c.weight_decay, foreach=True, **extra)
    return ProximalAdagrad(params, lr=c.lr, l1=c.prox_l1, l2=c.prox_l2,
                           initial_accumulator_value=c.initial_accumulator or 0.1)


class LRSchedule:
    """The learning rate of every step: base lr x schedule factor x plateau scale.

    Every schedule is a function of the (fractional) epoch, so it is evaluated per step; the
    epoch-wise ones (step, multistep, exponential) change at epoch boundaries as in torch.
    `warmup_epochs` ramps any schedule up linearly from zero. `plateau` divides by 1/factor when
    its monitor has not improved for `patience` epochs (torch ReduceLROnPlateau, mode from the name).
    """

    def __init__(self, c, base_lr: float, epochs: int, steps_per_epoch: int):
        self.c = c
        self.min_factor = c.min_lr / base_lr
        self.epochs = epochs
        self.steps_per_epoch = steps_per_epoch
        self.scale = 1.0
        self.best: Optional[float] = None
        self.wait = 0

    def factor(self, step: int) -> float:
        c = self.c
        t = step / self.steps_per_epoch  # epochs done, fractional
        epoch = int(t)
        if c.name == "step":
            f = c.gamma ** (epoch // c.step_size)
        elif c.name == "multistep":
            f = c.gamma ** sum(epoch >= m for m in c.milestones)
        elif c.name == "exponential":
            f = c.gamma ** epoch
        elif c.name == "cosine":
            f = self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * min(t / self.epochs, 1.0)))
        elif c.name == "onecycle":
            f = self._one_cycle(t / self.epochs)
        else:
            f = 1.0
        if c.warmup_epochs > 0 and t < c.warmup_epochs:
            f *= (step + 1) / (c.warmup_epochs * self.steps_per_epoch)
        return f * self.scale

    def _one_cycle(self, progress: float) -> float:
        """torch OneCycleLR shape: cosine from 1/div up to 1 over pct_start, then down to 1/(div*final_div)."""
        c = self.c
        start, end = 1 / c.div_factor, 1 / (c.div_factor * c.final_div_factor)
        if progress < c.pct_start:
            a, b, p = start, 1.0, progress / c.pct_start
        else:
            a, b, p = 1.0, end, min((progress - c.pct_start) / (1 - c.pct_start), 1.0)
        return b + (a - b) * 0.5 * (1 + math.cos(math.pi * p))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        f = self.factor(step)
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
            group["lr"] = group["initial_lr"] * f
        return optimizer.param_groups[0]["lr"]

    def epoch_end(self, record: dict[str, Any]) -> None:
        if self.c.name != "plateau":
            return
        monitor = self.c.monitor
        if monitor not in record:
            raise ConfigError(f"schedule.monitor={monitor}: not measured (add its split to train.evaluate)")
        value = record[monitor]
        sign = -1.0 if monitor.endswith("loss") else 1.0
        if self.best is None or sign * (value - self.best) > self.c.threshold:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait > self.c.patience:
            self.scale *= self.c.factor
            self.wait = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "best": self.best, "wait": self.wait}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.best, self.wait = state["scale"], state["best"], state["wait"]


def kernels(model: nn.Module, layers: Optional[list[str]] = None) -> list[torch.Tensor]:
    """The weights Keras' kernel_regularizer applies to: conv and dense kernels (not biases or BN),
    of all such layers or of the named ones."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if layers is None:
        return [m.weight for m in found.values()]
    missing = [name for name in layers if name not in found]
    if missing:
        raise ConfigError(f"optim.l2_layers: no conv or dense layer {missing[0]!r} (have: {', '.join(found)})")
    return [found[name].weight for name in layers]


def l2_penalty(weights: list[torch.Tensor], l2: float) -> torch.Tensor:
    return l2 * sum((w * w).sum() for w in weights)
