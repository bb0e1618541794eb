"""The optimizer formulas torch lacks: TensorFlow's ProximalAdagrad, and the update rules of Keras 3 and
TensorFlow 1 where they differ from torch's (FrameworkOptimizer); plus each framework flavor's
optimizer defaults (FLAVOR_OPTIM_DEFAULTS). train/optim.py's OPTIMIZERS builders pick from these."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch


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


def flavor_optim_values(flavor: Optional[str], name: str) -> dict[str, Any]:
    """The OptimConfig values (eps, alpha, rho, initial_accumulator) the flavor gives optimizer `name`."""
    return {k: v for k, v in FLAVOR_OPTIM_DEFAULTS[flavor or "torch"].get(name, {}).items() if k != "rule"}
