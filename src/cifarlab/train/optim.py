"""Optimizers (the Keras-style L2 kernel penalty is models/penalty.py).

The optimizers are the OPTIMIZERS registry: a new one is one entry there (the config takes its allowed
names from it). The formulas torch lacks are in formulas.py, the learning-rate schedules in schedules.py."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..errors import ConfigError
from .formulas import FLAVOR_OPTIM_DEFAULTS, FrameworkOptimizer, ProximalAdagrad, flavor_optim_values
from .muon import Muon


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


def _muon(c, params: list) -> torch.optim.Optimizer:
    """Muon on the 4-D conv filters at optim.muon_lr, SGD (optim.lr, momentum, nesterov, weight_decay)
    on the rest; both with optim.momentum."""
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    split = []
    for group in groups:
        filters = [p for p in group["params"] if p.dim() == 4]
        others = [p for p in group["params"] if p.dim() != 4]
        if others:
            split.append({**group, "params": others})
        if filters:
            split.append({**group, "params": filters, "muon": True, "lr": c.muon_lr, "weight_decay": 0.0})
    return Muon(split, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov, weight_decay=c.weight_decay)


# optim.name -> builder; the config accepts exactly these names, in this order in its errors.
OPTIMIZERS: dict[str, Callable[[Any, list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd": _sgd,
    "adam": _adam,
    "adamw": _adamw,
    "adagrad": _adagrad,
    "rmsprop": _rmsprop,
    "adadelta": _adadelta,
    "proximal-adagrad": _proximal_adagrad,
    "muon": _muon,
}


def make_optimizer(c, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer an OptimConfig names, over the model's trainable parameters."""
    if c.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={c.name}: unknown optimizer (known: {', '.join(OPTIMIZERS)})")
    return OPTIMIZERS[c.name](c, parameter_groups(c, model))


def parameter_groups(c, model: nn.Module) -> list:
    """The trainable parameters, as one list, or as groups when some take another rule: biases at
    optim.bias_lr_scale x the learning rate (and weight_decay / that scale, so that the decay per step
    stays the weights'), and the bias of a layer with `bias_epochs` (a whitening layer) in a group of its
    own that the LR schedule sets to zero after that many epochs (`frozen_after_epochs`)."""
    scale = getattr(c, "bias_lr_scale", 1.0)
    frozen = {id(m.bias): m.bias_epochs for m in model.modules()
              if getattr(m, "bias_epochs", None) is not None and getattr(m, "bias", None) is not None}
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if scale == 1.0 and not frozen:
        return [p for _, p in named]
    is_bias = lambda name: name.rsplit(".", 1)[-1] == "bias"  # noqa: E731
    bias_settings = {"lr": c.lr * scale, "weight_decay": c.weight_decay / scale} if scale != 1.0 else {}
    groups = [{"params": [p for name, p in named if not is_bias(name) and id(p) not in frozen]},
              {"params": [p for name, p in named if is_bias(name) and id(p) not in frozen], **bias_settings}]
    for epochs in sorted(set(frozen.values())):
        params = [p for _, p in named if frozen.get(id(p)) == epochs]
        groups.append({"params": params, "frozen_after_epochs": epochs, **bias_settings})
    return [group for group in groups if group["params"]]
