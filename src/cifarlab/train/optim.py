"""Optimizers, learning-rate schedules and the Keras-style L2 kernel penalty.

The optimizers and schedules are the OPTIMIZERS and SCHEDULES registries: a new one is one entry there
(the config takes its allowed names from them)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .monitor import Monitor


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


# ---------------------------------------------------------------- optimizers
# Each builder takes an OptimConfig and the trainable parameters. Unset eps / alpha / rho keep torch's
# defaults. SGD, Adam(W) and Adagrad use torch's fused kernels (one call for all parameters: on a 2-core
# CPU an Adam step of cnn3-avg takes a fraction of the per-parameter loop's time), the others the foreach ones.


def _eps(c) -> dict[str, Any]:
    """The eps keyword when the config sets one, so that torch's default stays otherwise."""
    return {"eps": c.eps} if c.eps is not None else {}


def _sgd(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay,
                           fused=True)


def _adam(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, **_eps(c), fused=True)


def _adamw(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, **_eps(c), fused=True)


def _adagrad(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adagrad(params, lr=c.lr, weight_decay=c.weight_decay,
                               initial_accumulator_value=c.initial_accumulator or 0.0, **_eps(c), fused=True)


def _rmsprop(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.RMSprop(params, lr=c.lr, alpha=c.alpha, momentum=c.momentum, weight_decay=c.weight_decay,
                               foreach=True, **_eps(c))


def _adadelta(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adadelta(params, lr=c.lr, rho=c.rho, weight_decay=c.weight_decay, foreach=True, **_eps(c))


def _proximal_adagrad(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return ProximalAdagrad(params, lr=c.lr, l1=c.prox_l1, l2=c.prox_l2,
                           initial_accumulator_value=c.initial_accumulator or 0.1)


# optim.name -> builder; the config accepts exactly these names, in this order in its errors.
OPTIMIZERS: dict[str, Callable[[Any, list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
    "adadelta": _adadelta,
    "proximal-adagrad": _proximal_adagrad,
}


def make_optimizer(c, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer an OptimConfig names, over the model's trainable parameters."""
    if c.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={c.name}: unknown optimizer (known: {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[c.name](c, [p for p in model.parameters() if p.requires_grad])


# ---------------------------------------------------------------- learning-rate schedules
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
            group["lr"] = group["initial_lr"] * f
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
