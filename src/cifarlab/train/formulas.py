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
# out and the update rule. None / torch: torch's defaults and torch.optim. The keras and tf1 values come from
# the frameworks' own constructor signatures below (each in the framework's argument names), mapped onto
# OptimConfig's keys by `signature_values`; "rule" names the FrameworkOptimizer rule (None: the torch
# optimizer, whose formula is the framework's too).

REQUIRED = "required"  # an argument the framework's constructor has no default for

# Keras 3 (keras.optimizers.<class>): tests/test_keras_parity.py compares every value with
# inspect.signature of the installed Keras.
KERAS_OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("SGD", {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False, "weight_decay": None}),
    "adam": ("Adam", {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7, "weight_decay": None}),
    "adamw": ("AdamW", {"learning_rate": 0.001, "weight_decay": 0.004, "beta_1": 0.9, "beta_2": 0.999,
                        "epsilon": 1e-7}),
    "adagrad": ("Adagrad", {"learning_rate": 0.001, "initial_accumulator_value": 0.1, "epsilon": 1e-7,
                            "weight_decay": None}),
    "rmsprop": ("RMSprop", {"learning_rate": 0.001, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7,
                            "weight_decay": None}),
    "adadelta": ("Adadelta", {"learning_rate": 0.001, "rho": 0.95, "epsilon": 1e-7, "weight_decay": None}),
}

# TensorFlow 1.15 (tf.compat.v1.train.<class>, and tf.contrib.opt.AdamWOptimizer for adamw), written from
# its documented signatures: the r1.15 API reference (tensorflow.org/versions/r1.15/api_docs/python/tf/train)
# and tensorflow/python/training/{gradient_descent,momentum,adam,adagrad,rmsprop,adadelta,proximal_adagrad}.py
# and tensorflow/contrib/opt/python/training/weight_decay_optimizers.py at v1.15.0. TensorFlow 1 does not
# install on this Python, so the table is the reference. momentum > 0 makes sgd MomentumOptimizer (its
# momentum is given then); GradientDescentOptimizer has no other argument.
TF1_OPTIMIZERS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("GradientDescentOptimizer", {"learning_rate": REQUIRED, "use_nesterov": False}),
    "adam": ("AdamOptimizer", {"learning_rate": 0.001, "beta1": 0.9, "beta2": 0.999, "epsilon": 1e-8}),
    "adamw": ("contrib.opt.AdamWOptimizer", {"weight_decay": REQUIRED, "learning_rate": 0.001, "beta1": 0.9,
                                             "beta2": 0.999, "epsilon": 1e-8}),
    "adagrad": ("AdagradOptimizer", {"learning_rate": REQUIRED, "initial_accumulator_value": 0.1}),
    "rmsprop": ("RMSPropOptimizer", {"learning_rate": REQUIRED, "decay": 0.9, "momentum": 0.0, "epsilon": 1e-10}),
    "adadelta": ("AdadeltaOptimizer", {"learning_rate": 0.001, "rho": 0.95, "epsilon": 1e-8}),
    "proximal-adagrad": ("ProximalAdagradOptimizer", {"learning_rate": REQUIRED, "initial_accumulator_value": 0.1,
                                                      "l1_regularization_strength": 0.0,
                                                      "l2_regularization_strength": 0.0}),
}

# a framework argument -> the OptimConfig key (rho / decay: alpha for rmsprop, rho for adadelta; betas below)
ARGUMENT_KEYS = {"learning_rate": "lr", "momentum": "momentum", "nesterov": "nesterov", "use_nesterov": "nesterov",
                 "epsilon": "eps", "initial_accumulator_value": "initial_accumulator", "weight_decay": "weight_decay",
                 "l1_regularization_strength": "prox_l1", "l2_regularization_strength": "prox_l2"}


def signature_values(name: str, arguments: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """(OptimConfig values, keys without a default) of optimizer `name` from a framework signature table."""
    values: dict[str, Any] = {}
    required: list[str] = []
    betas = [arguments.get("beta_1", arguments.get("beta1")), arguments.get("beta_2", arguments.get("beta2"))]
    for argument, value in arguments.items():
        if argument in ("beta_1", "beta1", "beta_2", "beta2"):
            continue
        key = ("alpha" if name == "rmsprop" else "rho") if argument in ("rho", "decay") else ARGUMENT_KEYS[argument]
        if value == REQUIRED:
            required.append(key)
        else:
            values[key] = 0.0 if value is None else value  # Keras' weight_decay=None: none
    if betas[0] is not None:
        values["betas"] = tuple(betas)
    return values, required


def _flavor(table: dict[str, tuple[str, dict[str, Any]]], extra: dict[str, dict[str, Any]]) -> dict[str, dict]:
    return {name: {**signature_values(name, arguments)[0], **extra.get(name, {})}
            for name, (_, arguments) in table.items()}


FLAVOR_OPTIM_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "torch": {
        "sgd": {}, "adam": {}, "adamw": {}, "adadelta": {"rho": 0.9},
        "adagrad": {"initial_accumulator": 0.0}, "rmsprop": {"alpha": 0.99, "initial_accumulator": 0.0},
        "proximal-adagrad": {"initial_accumulator": 0.1},
    },
    # Keras has no proximal Adagrad: TensorFlow's, with cifarlab's lr when none is given
    "keras": {**_flavor(KERAS_OPTIMIZERS, {
        "sgd": {"rule": "sgd"}, "adam": {"rule": "adam"}, "adamw": {"rule": "adam"}, "adagrad": {"rule": "adagrad"},
        "rmsprop": {"initial_accumulator": 0.0, "rule": "rmsprop"}, "adadelta": {"rule": "adadelta"}}),
        "proximal-adagrad": {"initial_accumulator": 0.1}},
    # beyond the signatures: TF 1's Adagrad has no epsilon, its RMSProp starts its average at 1; its
    # MomentumOptimizer (accum = mu accum + g; w -= lr accum) and Adadelta are torch's formulas
    "tf1": _flavor(TF1_OPTIMIZERS, {
        "adam": {"rule": "adam"}, "adamw": {"rule": "adam"}, "adagrad": {"eps": 0.0, "rule": "adagrad"},
        "rmsprop": {"initial_accumulator": 1.0, "rule": "rmsprop"}}),
}

SIGNATURES = {"keras": ("Keras 3", KERAS_OPTIMIZERS), "tf1": ("TensorFlow 1", TF1_OPTIMIZERS)}


def flavor_optim_values(flavor: Optional[str], name: str) -> dict[str, Any]:
    """The OptimConfig values the flavor gives optimizer `name` (every key its framework has a default for)."""
    return {k: v for k, v in FLAVOR_OPTIM_DEFAULTS[flavor or "torch"].get(name, {}).items() if k != "rule"}


def missing_required(flavor: Optional[str], name: str, given: set[str]) -> Optional[str]:
    """Why a config under `flavor` must give a key it left out (the framework's constructor has no default
    for it), or None."""
    framework, table = SIGNATURES.get(flavor or "torch", ("", {}))
    if name not in table:
        return None
    cls, arguments = table[name]
    for argument, value in arguments.items():
        key = ARGUMENT_KEYS.get(argument)
        if value == REQUIRED and key not in given:
            return (f"optim.{key}: {framework}'s {cls} has no default {argument} (defaults: {flavor}); "
                    f"set optim.{key}")
    return None
