"""Layer kinds: the LAYER_KINDS registry at the end of this file (a new kind is one entry there: its
arguments, defaults, name prefix, the input it needs and a builder), the modules and builders behind
it, and how layer items become named modules.

A layer item is a kind alone (`relu`, `flatten`, `batchnorm`) or a one-key mapping from the kind to
its arguments (`conv: {filters: 32, kernel: 3}`, `dense: 512`, `dropout: 0.5`). Shapes are
inferred from the input, so an item never states in_channels or in_features. Building the item list
lives here too, beside the kinds, because a `residual` item holds a list of items of its own.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..validation import LAYER_ARGUMENTS, LAYER_NAMES, suggestion
from .whitening import build_whitening, check_whitening

# ---------------------------------------------------------------- layer items


def parse_layer(item: Any, where: str) -> tuple[str, dict[str, Any]]:
    """One spec item -> (kind, complete arguments), or a ConfigError naming the item."""
    if isinstance(item, str):
        kind, given = item, None
    elif isinstance(item, dict) and len(item) == 1:
        kind, given = next(iter(item.items()))
    else:
        raise ConfigError(f"{where}: expected a layer kind or a one-key mapping, got {item!r}")
    if kind not in LAYER_KINDS:
        hint = suggestion(str(kind), LAYER_KINDS, LAYER_NAMES, quote=True)
        raise ConfigError(f"{where}: unknown layer kind {kind!r}{hint} (known: {', '.join(LAYER_KINDS)})")
    entry = LAYER_KINDS[kind]
    if given is None:
        given = {}
    elif not isinstance(given, dict):
        if entry.bare is None:
            raise ConfigError(f"{where}: {kind} takes no value, got {given!r}")
        given = {entry.bare: given}
    unknown = set(given) - set(entry.args)
    if unknown:
        first = sorted(unknown)[0]
        hint = suggestion(str(first), entry.args, {k: v for k, v in LAYER_ARGUMENTS.items() if v in entry.args})
        raise ConfigError(f"{where}: {kind} has no argument {first!r}{hint} "
                          f"(allowed: {', '.join(entry.args) or 'none'})")
    args = {**entry.defaults, **given}
    missing = [a for a in entry.args if a not in args]
    if missing:
        raise ConfigError(f"{where}: {kind} needs {missing[0]}")
    if entry.check is not None:
        entry.check(args, where)
    return kind, args


def build_items(items: list, shape: tuple, where: str) -> tuple["OrderedDict[str, nn.Module]", tuple]:
    """(named modules, output shape) of a layer list; names count per kind (conv1, conv2, bn1, ...)."""
    modules: "OrderedDict[str, nn.Module]" = OrderedDict()
    counts: dict[str, int] = {}
    for index, item in enumerate(items):
        kind, args = parse_layer(item, f"{where} {index}")
        module, shape = _make_layer(kind, args, shape, f"{where} {index} ({kind})")
        prefix = LAYER_KINDS[kind].prefix or kind
        counts[prefix] = counts.get(prefix, 0) + 1
        name = prefix if prefix == "flatten" and counts[prefix] == 1 else f"{prefix}{counts[prefix]}"
        modules[name] = module
    return modules, shape


def _make_layer(kind: str, args: dict[str, Any], shape: tuple, where: str) -> tuple[nn.Module, tuple]:
    entry = LAYER_KINDS[kind]
    if entry.needs == "image" and len(shape) != 3:
        raise ConfigError(f"{where}: needs an image input (C, H, W), got a flat vector of {shape[0]}")
    if entry.needs == "flat" and len(shape) == 3:
        raise ConfigError(f"{where}: needs a flat input; add `flatten` before it")
    return entry.build(args, shape, where)


# ---------------------------------------------------------------- layer kinds

# (complete arguments, input shape, where for errors) -> (module, output shape)
Builder = Callable[[dict[str, Any], tuple, str], tuple[nn.Module, tuple]]


@dataclass(frozen=True)
class LayerKind:
    """One kind of layer item: the arguments a spec may give it and how it becomes a module."""

    build: Builder
    args: tuple[str, ...] = ()  # the argument names it accepts
    bare: Optional[str] = None  # the argument a bare value sets (`dense: 512`); None: it takes no value
    defaults: dict[str, Any] = field(default_factory=dict)
    prefix: Optional[str] = None  # module names are prefix1, prefix2, ...; None: the kind's own name
    needs: Literal["any", "image", "flat"] = "any"  # the input shape it accepts: (C, H, W) or (features,)
    check: Optional[Callable[[dict[str, Any], str], None]] = None  # raises ConfigError on bad argument values


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding of one spatial axis for TensorFlow / Keras 'same': the output has
    ceil(size / stride) positions, and an odd total puts the extra pixel after (right / bottom)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class PaddedConv2d(nn.Conv2d):
    """A Conv2d after an asymmetric zero padding (left, right, top, bottom): Keras 'same' where the
    padding cannot be split evenly (an even kernel, or stride 2 on an even input). Its parameters are
    the Conv2d's (`weight`, `bias`), so checkpoints and the L2 kernel list see an ordinary conv."""

    def __init__(self, *args, pad: tuple[int, int, int, int], **kwargs):
        super().__init__(*args, padding=0, **kwargs)
        self.pad = tuple(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, pad={self.pad}"


def _init_glorot(module: nn.Module) -> None:
    """Keras' default initialization: Glorot (Xavier) uniform kernel, zero bias."""
    nn.init.xavier_uniform_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def _conv(a: dict[str, Any], shape: tuple, where: str) -> tuple[nn.Module, tuple]:
    kernel, stride = a["kernel"], a["stride"]
    if a["padding"] == "same":
        (top, bottom), (left, right) = (same_padding(s, kernel, stride) for s in shape[1:])
        if top == bottom and left == right:  # odd kernels at stride 1: the plain conv, as always
            module = nn.Conv2d(shape[0], a["filters"], kernel, stride, (top, left), bias=a["bias"])
        else:
            module = PaddedConv2d(shape[0], a["filters"], kernel, stride, bias=a["bias"], pad=(left, right, top, bottom))
        pads = (top + bottom, left + right)
    else:
        pad = 0 if a["padding"] == "valid" else int(a["padding"])
        module = nn.Conv2d(shape[0], a["filters"], kernel, stride, pad, bias=a["bias"])
        pads = (2 * pad, 2 * pad)
    h, w = ((s + p - kernel) // stride + 1 for s, p in zip(shape[1:], pads))
    if h < 1 or w < 1:
        raise ConfigError(f"{where}: kernel {kernel} does not fit a {shape[1]}x{shape[2]} input")
    if a["init"] == "glorot":
        _init_glorot(module)
    elif a["init"] == "dirac":
        _init_dirac(module)
    return module, (a["filters"], h, w)


def _init_dirac(module: nn.Module) -> None:
    """airbench's conv initialization: torch's default, then the first min(in, out) filters the identity
    (a Dirac delta at the kernel's center on their own input channel), zero bias."""
    weight = module.weight.data
    nn.init.dirac_(weight[:weight.shape[1]])
    if module.bias is not None:
        nn.init.zeros_(module.bias)


INITS = ("torch", "glorot")
CONV_INITS = (*INITS, "dirac")


def _check_init(a: dict[str, Any], where: str, allowed: tuple[str, ...] = INITS) -> None:
    if a["init"] not in allowed:
        raise ConfigError(f"{where}: init={a['init']!r} must be {', '.join(allowed[:-1])} or {allowed[-1]}")


def _check_conv(a: dict[str, Any], where: str) -> None:
    if not (a["padding"] in ("same", "valid") or isinstance(a["padding"], int)):
        raise ConfigError(f"{where}: conv padding={a['padding']!r} must be same, valid or a number")
    if isinstance(a["stride"], bool) or not isinstance(a["stride"], int) or a["stride"] < 1:
        raise ConfigError(f"{where}: conv stride={a['stride']!r} must be a whole number >= 1")
    _check_init(a, where, CONV_INITS)


POOL_TYPES = {"max": nn.MaxPool2d, "avg": nn.AvgPool2d}


def _pool_with(pool: type[nn.Module]) -> Builder:
    """The builder of a fixed pooling module (stride defaults to the size)."""

    def build(a: dict[str, Any], shape: tuple, where: str) -> tuple[nn.Module, tuple]:
        size, stride = a["size"], a.get("stride") or a["size"]
        h, w = ((s - size) // stride + 1 for s in shape[1:])
        if h < 1 or w < 1:
            raise ConfigError(f"{where}: pool size {size} does not fit a {shape[1]}x{shape[2]} input")
        return pool(size, stride), (shape[0], h, w)

    return build


def _pool_of_type(a: dict[str, Any], shape: tuple, where: str) -> tuple[nn.Module, tuple]:
    return _pool_with(POOL_TYPES[a["type"]])(a, shape, where)


def _check_pool(a: dict[str, Any], where: str) -> None:
    if a["type"] not in POOL_TYPES:
        raise ConfigError(f"{where}: pool type={a['type']!r} must be max or avg")


def _global_pool_with(pool: type[nn.Module]) -> Builder:
    return lambda a, shape, where: (nn.Sequential(pool(1), nn.Flatten()), (shape[0],))


def _dense(a: dict[str, Any], shape: tuple, where: str) -> tuple[nn.Module, tuple]:
    module = nn.Linear(shape[0], a["units"], bias=a["bias"])
    if a["init"] == "glorot":
        _init_glorot(module)
    return module, (a["units"],)


class _BiasedVariance:
    """BatchNorm whose moving variance follows the biased batch variance (Keras 3's
    BatchNormalization) instead of torch's unbiased one; outputs, parameters and buffers are torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        # the batch's mean and unbiased variance from the batch norm kernel's own pass (momentum 1 copies
        # them into zeroed buffers), then the biased variance, var * (n - 1) / n, into the moving one: a
        # separate var_mean over a float copy took 6x the batch norm's forward on channels-last bf16 inputs (cnn3)
        mean = torch.zeros_like(self.running_mean)
        var = torch.zeros_like(self.running_var)
        out = F.batch_norm(x, mean, var, self.weight, self.bias, True, 1.0, self.eps)
        with torch.no_grad():
            n = x.numel() // x.shape[1]
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * ((n - 1) / n), self.momentum)
            self.num_batches_tracked.add_(1)
        return out


class BiasedBatchNorm1d(_BiasedVariance, nn.BatchNorm1d):
    pass


class BiasedBatchNorm2d(_BiasedVariance, nn.BatchNorm2d):
    pass


# How a batchnorm's moving variance moves: torch's unbiased batch variance, Keras 3's biased one, or
# TensorFlow 1's tf.layers rule (fused): its fused kernel, unbiased, on image (4-D) inputs, where it can run,
# and nn.moments' biased variance on flat (2-D) inputs.
VARIANCES = ("unbiased", "biased", "fused")


def _batchnorm(a: dict[str, Any], shape: tuple, where: str) -> tuple[nn.Module, tuple]:
    if a["variance"] == "biased" or (a["variance"] == "fused" and len(shape) != 3):
        norm = BiasedBatchNorm2d if len(shape) == 3 else BiasedBatchNorm1d
    else:
        norm = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
    module = norm(shape[0], eps=a["eps"], momentum=a["momentum"])
    # Keras' scale / center: without them there is no weight (gamma: the scale stays 1) or bias (beta: 0)
    if not a["scale"]:
        module.weight = None
    if not a["center"]:
        module.bias = None
    return module, shape


def _check_batchnorm(a: dict[str, Any], where: str) -> None:
    if a["variance"] not in VARIANCES:
        raise ConfigError(f"{where}: batchnorm variance={a['variance']!r} must be unbiased, biased or fused")
    for key in ("scale", "center"):
        if not isinstance(a[key], bool):
            raise ConfigError(f"{where}: batchnorm {key}={a[key]!r} must be true or false")
    if not 0 < float(a["momentum"]) <= 1 or float(a["eps"]) <= 0:
        raise ConfigError(f"{where}: batchnorm needs 0 < momentum <= 1 and eps > 0 "
                          f"(got momentum={a['momentum']}, eps={a['eps']}; momentum in torch's convention: "
                          "Keras' 0.99 is 0.01)")


def _flatten(a: dict[str, Any], shape: tuple, where: str) -> tuple[nn.Module, tuple]:
    return nn.Flatten(), (int(torch.tensor(shape).prod()),)


class Residual(nn.Sequential):
    """x + layers(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def _residual(a: dict[str, Any], shape: tuple, where: str) -> tuple[nn.Module, tuple]:
    body, out = build_items(a["layers"], shape, f"{where} layer")
    if out != shape:
        raise ConfigError(f"{where}: its layers turn shape {shape} into {out}; a residual must keep the shape")
    return Residual(body), shape


def _check_residual(a: dict[str, Any], where: str) -> None:
    if not (isinstance(a["layers"], list) and a["layers"]):
        raise ConfigError(f"{where}: residual takes a non-empty list of layers, got {a['layers']!r}")


def _check_factor(a: dict[str, Any], where: str) -> None:
    if isinstance(a["factor"], bool) or not isinstance(a["factor"], (int, float)):
        raise ConfigError(f"{where}: scale factor={a['factor']!r} must be a number")


def _same_shape(make: Callable[[dict[str, Any]], nn.Module]) -> Builder:
    """The builder of a module that keeps its input's shape, made from the arguments alone."""
    return lambda a, shape, where: (make(a), shape)


def _check_rate(kind: str) -> Callable[[dict[str, Any], str], None]:
    """The check of a dropout kind's p."""

    def check(a: dict[str, Any], where: str) -> None:
        if not 0 <= float(a["p"]) < 1:
            raise ConfigError(f"{where}: {kind} p={a['p']} must be in [0, 1)")

    return check


# The order is the order `unknown layer kind` errors list them in.
LAYER_KINDS: dict[str, LayerKind] = {
    "conv": LayerKind(_conv, ("filters", "kernel", "stride", "padding", "bias", "init"), "filters",
                      {"kernel": 3, "stride": 1, "padding": "same", "bias": True, "init": "torch"}, needs="image",
                      check=_check_conv),
    "dense": LayerKind(_dense, ("units", "bias", "init"), "units", {"bias": True, "init": "torch"}, prefix="fc",
                       needs="flat", check=_check_init),
    # momentum in torch's convention (the new batch's weight); variance: how the moving variance moves
    # scale / center: Keras' names (false: no weight / no bias)
    "batchnorm": LayerKind(_batchnorm, ("momentum", "eps", "variance", "scale", "center"), None,
                           {"momentum": 0.1, "eps": 1e-5, "variance": "unbiased", "scale": True, "center": True},
                           prefix="bn", check=_check_batchnorm),
    # a frozen patch-whitening conv fitted on the training split (models/whitening.py), bias frozen later
    "whiten": LayerKind(build_whitening, ("kernel", "eps", "samples", "bias_epochs"), "kernel",
                        {"kernel": 2, "eps": 5e-4, "samples": 5000, "bias_epochs": 3}, needs="image",
                        check=check_whitening),
    "relu": LayerKind(_same_shape(lambda a: nn.ReLU())),
    "gelu": LayerKind(_same_shape(lambda a: nn.GELU())),
    "elu": LayerKind(_same_shape(lambda a: nn.ELU())),
    "tanh": LayerKind(_same_shape(lambda a: nn.Tanh())),
    "sigmoid": LayerKind(_same_shape(lambda a: nn.Sigmoid())),
    "leaky_relu": LayerKind(_same_shape(lambda a: nn.LeakyReLU(a["slope"])), ("slope",), "slope", {"slope": 0.01}),
    "maxpool": LayerKind(_pool_with(nn.MaxPool2d), ("size", "stride"), "size", {"size": 2, "stride": None},
                         prefix="pool", needs="image"),
    "avgpool": LayerKind(_pool_with(nn.AvgPool2d), ("size", "stride"), "size", {"size": 2, "stride": None},
                         prefix="pool", needs="image"),
    "pool": LayerKind(_pool_of_type, ("type", "size", "stride"), "type", {"type": "max", "size": 2, "stride": None},
                      needs="image", check=_check_pool),
    "global_avgpool": LayerKind(_global_pool_with(nn.AdaptiveAvgPool2d), prefix="gap", needs="image"),
    "global_maxpool": LayerKind(_global_pool_with(nn.AdaptiveMaxPool2d), prefix="gmp", needs="image"),
    # x + layers(x); the layers must keep the shape
    "residual": LayerKind(_residual, ("layers",), "layers", prefix="res", check=_check_residual),
    # multiply by a constant (e.g. logits x 0.125, as in ResNet-9)
    "scale": LayerKind(_same_shape(lambda a: Scale(float(a["factor"]))), ("factor",), "factor", check=_check_factor),
    "dropout": LayerKind(_same_shape(lambda a: nn.Dropout(a["p"])), ("p",), "p", {"p": 0.5}, prefix="drop",
                         check=_check_rate("dropout")),
    "dropout2d": LayerKind(_same_shape(lambda a: nn.Dropout2d(a["p"])), ("p",), "p", {"p": 0.5}, prefix="drop",
                           needs="image", check=_check_rate("dropout2d")),
    "flatten": LayerKind(_flatten),
}
