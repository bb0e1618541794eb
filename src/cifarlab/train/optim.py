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


class FrameworkOptimizer(torch.optim.Optimizer):
    """The update rules of Keras 3 (keras.optimizers) and TensorFlow 1 (tf.compat.v1.train), where they
    differ from torch's; `rule` picks one:

    - rmsprop:  v = rho v + (1 - rho) g^2;  step = lr g / sqrt(v + eps) (eps inside the root);
                momentum: m = mu m + step, w -= m (lr inside the buffer); v starts at initial_accumulator
                (Keras 0, TF 1 1.0)
    - adagrad:  a += g^2 (a starts at initial_accumulator);  w -= lr g / sqrt(a + eps) (TF 1: eps 0)
    - adam:     m, v as torch;  w -= lr sqrt(1 - b2^t) / (1 - b1^t) m / (sqrt(v) + eps) (the "epsilon hat"
                of Kingma & Ba's section 2, Keras and TF 1)
    - sgd:      m = mu m - lr g;  w += m, or with nesterov w += mu m - lr g (Keras; lr inside the buffer)
    - adadelta: torch's formula (which is Keras' and TF 1's), here for Keras' decoupled weight decay

    weight_decay: with `decoupled` (Keras' own weight_decay, and adamw) w -= lr wd w before the step;
    otherwise torch's semantics, g += wd w.
    """

    RULES = ("rmsprop", "adagrad", "adam", "sgd", "adadelta")

    def __init__(self, params, rule: str, lr: float = 0.001, rho: float = 0.9, eps: float = 1e-7,
                 momentum: float = 0.0, nesterov: bool = False, betas: tuple[float, float] = (0.9, 0.999),
                 initial_accumulator: float = 0.0, weight_decay: float = 0.0, decoupled: bool = False):
        if rule not in self.RULES:
            raise ValueError(f"rule {rule!r}: one of {', '.join(self.RULES)}")
        super().__init__(params, {"lr": lr, "rho": rho, "eps": eps, "momentum": momentum, "nesterov": nesterov,
                                  "betas": tuple(betas), "initial_accumulator": initial_accumulator,
                                  "weight_decay": weight_decay, "decoupled": decoupled})
        self.rule = rule

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if wd:
                    if group["decoupled"]:
                        p.mul_(1 - lr * wd)
                    else:
                        g = g.add(p, alpha=wd)
                getattr(self, f"_{self.rule}")(p, g, group, self.state[p])
        return loss

    def _rmsprop(self, p, g, group, state) -> None:
        if not state:
            state["square_avg"] = torch.full_like(p, group["initial_accumulator"])
            if group["momentum"] > 0:
                state["momentum_buffer"] = torch.zeros_like(p)
        v = state["square_avg"]
        rho = group["rho"]
        v.mul_(rho).addcmul_(g, g, value=1 - rho)
        step = g * group["lr"] / (v + group["eps"]).sqrt()
        if group["momentum"] > 0:
            buf = state["momentum_buffer"]
            buf.mul_(group["momentum"]).add_(step)
            p.sub_(buf)
        else:
            p.sub_(step)

    def _adagrad(self, p, g, group, state) -> None:
        if not state:
            state["sum"] = torch.full_like(p, group["initial_accumulator"])
        a = state["sum"]
        a.addcmul_(g, g)
        p.sub_(g * group["lr"] / (a + group["eps"]).sqrt())

    def _adam(self, p, g, group, state) -> None:
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float64)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        state["step"] += 1
        t = float(state["step"])
        b1, b2 = group["betas"]
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        alpha = group["lr"] * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        p.sub_(m * alpha / (v.sqrt() + group["eps"]))

    def _adadelta(self, p, g, group, state) -> None:
        if not state:
            state["square_avg"] = torch.zeros_like(p)
            state["acc_delta"] = torch.zeros_like(p)
        a, d = state["square_avg"], state["acc_delta"]
        rho, eps = group["rho"], group["eps"]
        a.mul_(rho).addcmul_(g, g, value=1 - rho)
        delta = (d + eps).sqrt() / (a + eps).sqrt() * g
        d.mul_(rho).addcmul_(delta, delta, value=1 - rho)
        p.sub_(delta * group["lr"])

    def _sgd(self, p, g, group, state) -> None:
        mu, lr = group["momentum"], group["lr"]
        if mu == 0:
            p.sub_(g * lr)
            return
        if not state:
            state["momentum_buffer"] = torch.zeros_like(p)
        m = state["momentum_buffer"]
        m.mul_(mu).sub_(g * lr)
        if group["nesterov"]:
            p.add_(m * mu - g * lr)
        else:
            p.add_(m)


# ---------------------------------------------------------------- framework flavors
# optim.defaults (from the config's top-level `defaults`) picks the defaults of the keys a config leaves
# out and the update rule. None / torch: torch's defaults and torch.optim. The values are those of
# keras.optimizers (Keras 3) and tf.compat.v1.train (TensorFlow 1); "rule" names the FrameworkOptimizer
# rule (None: the torch optimizer, whose formula is the framework's too).
FLAVOR_OPTIM_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "torch": {
        "sgd": {}, "adam": {}, "adamw": {}, "adadelta": {"rho": 0.9},
        "adagrad": {"initial_accumulator": 0.0}, "rmsprop": {"alpha": 0.99, "initial_accumulator": 0.0},
        "proximal-adagrad": {"initial_accumulator": 0.1},
    },
    "keras": {
        "sgd": {"rule": "sgd"},
        "adam": {"eps": 1e-7, "rule": "adam"},
        "adamw": {"eps": 1e-7, "rule": "adam"},
        "adagrad": {"eps": 1e-7, "initial_accumulator": 0.1, "rule": "adagrad"},
        "rmsprop": {"alpha": 0.9, "eps": 1e-7, "initial_accumulator": 0.0, "rule": "rmsprop"},
        "adadelta": {"rho": 0.95, "eps": 1e-7, "rule": "adadelta"},
        "proximal-adagrad": {"initial_accumulator": 0.1},  # Keras has none: TensorFlow's
    },
    "tf1": {
        "sgd": {},  # tf1 MomentumOptimizer: accum = mu accum + g; w -= lr accum (torch's form)
        "adam": {"eps": 1e-8, "rule": "adam"},
        "adamw": {"eps": 1e-8, "rule": "adam"},
        "adagrad": {"eps": 0.0, "initial_accumulator": 0.1, "rule": "adagrad"},  # no epsilon in TF 1's Adagrad
        "rmsprop": {"alpha": 0.9, "eps": 1e-10, "initial_accumulator": 1.0, "rule": "rmsprop"},  # ms starts at 1
        "adadelta": {"rho": 0.95, "eps": 1e-8},
        "proximal-adagrad": {"initial_accumulator": 0.1},
    },
}

FLAVORS = tuple(FLAVOR_OPTIM_DEFAULTS)


def flavor_optim_values(flavor: Optional[str], name: str) -> dict[str, Any]:
    """The OptimConfig values (eps, alpha, rho, initial_accumulator) the flavor gives optimizer `name`."""
    return {k: v for k, v in FLAVOR_OPTIM_DEFAULTS[flavor or "torch"].get(name, {}).items() if k != "rule"}


def _rule(c) -> Optional[str]:
    return FLAVOR_OPTIM_DEFAULTS[getattr(c, "defaults", None) or "torch"].get(c.name, {}).get("rule")


def _value(c, key: str) -> Any:
    """A config value, or the flavor's when the config leaves it unset (None)."""
    value = getattr(c, key)
    return value if value is not None else flavor_optim_values(getattr(c, "defaults", None), c.name).get(key)


def _framework(c, params: list[nn.Parameter], rule: str, **kwargs) -> torch.optim.Optimizer:
    decoupled = c.name == "adamw" or getattr(c, "defaults", None) == "keras"
    return FrameworkOptimizer(params, rule, lr=c.lr, weight_decay=c.weight_decay, decoupled=decoupled, **kwargs)


# ---------------------------------------------------------------- optimizers
# Each builder takes an OptimConfig and the trainable parameters. Unset eps / alpha / rho keep torch's
# defaults. SGD, Adam(W) and Adagrad use torch's fused kernels (one call for all parameters: on a 2-core
# CPU an Adam step of cnn3-avg takes a fraction of the per-parameter loop's time), the others the foreach ones.
# Under the keras / tf1 flavors the rules that differ from torch's run as a FrameworkOptimizer.


def _eps(c) -> dict[str, Any]:
    """The eps keyword when the config sets one, so that torch's default stays otherwise."""
    return {"eps": c.eps} if c.eps is not None else {}


def _sgd(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if _rule(c) == "sgd":
        return _framework(c, params, "sgd", momentum=c.momentum, nesterov=c.nesterov)
    return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay,
                           fused=True)


def _adam(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if _rule(c) == "adam":
        return _framework(c, params, "adam", betas=tuple(c.betas), eps=_value(c, "eps"))
    return torch.optim.Adam(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, **_eps(c), fused=True)


def _adamw(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if _rule(c) == "adam":
        return _framework(c, params, "adam", betas=tuple(c.betas), eps=_value(c, "eps"))
    return torch.optim.AdamW(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay, **_eps(c), fused=True)


def _adagrad(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    initial = _value(c, "initial_accumulator") or 0.0
    if _rule(c) == "adagrad":
        return _framework(c, params, "adagrad", eps=_value(c, "eps"), initial_accumulator=initial)
    return torch.optim.Adagrad(params, lr=c.lr, weight_decay=c.weight_decay,
                               initial_accumulator_value=initial, **_eps(c), fused=True)


def _rmsprop(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    initial = _value(c, "initial_accumulator") or 0.0
    alpha = _value(c, "alpha")
    if _rule(c) == "rmsprop":
        return _framework(c, params, "rmsprop", rho=alpha, eps=_value(c, "eps"), momentum=c.momentum,
                          initial_accumulator=initial)
    if initial:
        raise ConfigError(f"optim.initial_accumulator={initial}: torch's RMSprop starts its average at 0; "
                          "set defaults: tf1 (or keras) for a framework that starts elsewhere")
    return torch.optim.RMSprop(params, lr=c.lr, alpha=alpha, momentum=c.momentum, weight_decay=c.weight_decay,
                               foreach=True, **_eps(c))


def _adadelta(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    eps = _value(c, "eps")
    if _rule(c) == "adadelta":
        return _framework(c, params, "adadelta", rho=_value(c, "rho"), eps=eps)
    return torch.optim.Adadelta(params, lr=c.lr, rho=_value(c, "rho"), weight_decay=c.weight_decay, foreach=True,
                                **({"eps": eps} if eps is not None else {}))


def _proximal_adagrad(c, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    initial = _value(c, "initial_accumulator")
    if initial is not None and initial <= 0:
        raise ConfigError(f"optim.initial_accumulator={initial}: proximal-adagrad needs a value > 0 "
                          "(TensorFlow refuses 0; its default is 0.1)")
    return ProximalAdagrad(params, lr=c.lr, l1=c.prox_l1, l2=c.prox_l2,
                           initial_accumulator_value=0.1 if initial is None else initial)


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
