"""Layer spec (a list of YAML items) -> torch.nn.Sequential with stable layer names.

A layer item is a kind alone (`relu`, `flatten`, `batchnorm`) or a one-key mapping from the kind to
its arguments (`conv: {filters: 32, kernel: 3}`, `dense: 512`, `dropout: 0.5`). Shapes are
inferred from the input, so a spec never states in_channels or in_features.

Presets are YAML files in presets/ of the same form plus `params` (their defaults). In a preset,
`$name` (or `$name.i`, item i of a list) is replaced by a parameter, `$classes` and `$channels` come from the
dataset, and an item with `if: name` (or `if: not name`) is kept only when that parameter is truthy.

The layer kinds are the LAYER_KINDS registry at the end of this file: a new kind is one entry there
(its arguments, defaults, name prefix, the input it needs and a builder).

A framework flavor (`model.defaults`, from the config's top-level `defaults`) fills the layer arguments
a spec leaves out with that framework's defaults (FLAVOR_LAYER_DEFAULTS): Glorot-uniform kernels and
zero biases, and Keras' BatchNorm momentum / epsilon / moving variance. Arguments a spec gives win.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ..errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"

BUILTIN_PARAMS = ("classes", "channels")


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


@lru_cache(maxsize=None)
def _read_preset(name: str) -> dict[str, Any]:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"model.preset={name!r}: no such preset (available: {', '.join(preset_names())})")
    spec = yaml.safe_load(path.read_text()) or {}
    if "base" in spec:
        base = _read_preset(spec["base"])
        spec = {**base, **spec, "params": {**base.get("params", {}), **spec.get("params", {})},
                "layers": spec.get("layers", base["layers"])}
    return spec


def load_preset(name: str) -> dict[str, Any]:
    """{description, source, params, layers} of a named preset (base presets merged in)."""
    spec = _read_preset(name)
    return {**spec, "params": dict(spec.get("params", {})), "layers": list(spec["layers"])}


def check_model_config(preset: Optional[str], layers: Optional[list], params: dict[str, Any]) -> None:
    """Fail on an unknown preset, an unknown or ill-typed preset parameter, or a bad layer item."""
    if layers is not None:
        if params:
            raise ValueError(f"model.{next(iter(params))}: preset parameters need model.preset, "
                             "and model.layers replaces the preset")
        for index, item in enumerate(layers):
            parse_layer(item, f"model.layers[{index}]")
        return
    if preset is None:
        raise ValueError("give model.preset or model.layers")
    spec = load_preset(preset)
    defaults = spec["params"]
    for key, value in params.items():
        if key not in defaults:
            allowed = ", ".join(["preset", "layers", *defaults]) or "preset, layers"
            raise ValueError(f"model.{key}: unknown key for preset {preset} (allowed: {allowed})")
        if not _same_type(defaults[key], value):
            raise ValueError(f"model.{key}={value!r}: expected {type(defaults[key]).__name__} "
                             f"like the default {defaults[key]!r}")
    for index, item in enumerate(expand_layers(spec["layers"], {**defaults, **params, "classes": 10,
                                                                 "channels": 3})):
        parse_layer(item, f"preset {preset} layer {index}")


def _same_type(default: Any, value: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool) or default is None
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float))
    if isinstance(default, list):
        return isinstance(value, list) and len(value) == len(default)
    return default is None or isinstance(value, type(default))


def expand_layers(items: list, params: dict[str, Any]) -> list:
    """Apply `if:` conditions and `$name` substitutions of a preset."""
    kept = []
    for item in items:
        if isinstance(item, dict) and "if" in item:
            condition = str(item["if"]).split()
            negate = condition[0] == "not"
            key = condition[-1]
            if key not in params:
                raise ConfigError(f"preset condition 'if: {item['if']}' names no parameter")
            if bool(params[key]) == negate:
                continue
            item = {k: v for k, v in item.items() if k != "if"}
        kept.append(_substitute(item, params))
    return kept


def _substitute(value: Any, params: dict[str, Any]) -> Any:
    if isinstance(value, str) and value.startswith("$"):
        name, _, index = value[1:].partition(".")
        if name not in params:
            raise ConfigError(f"preset reference {value} names no parameter")
        found = params[name]
        return found[int(index)] if index else found
    if isinstance(value, dict):
        return {k: _substitute(v, params) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, params) for v in value]
    return value


def parse_layer(item: Any, where: str) -> tuple[str, dict[str, Any]]:
    """One spec item -> (kind, complete arguments), or a ConfigError naming the item."""
    if isinstance(item, str):
        kind, given = item, None
    elif isinstance(item, dict) and len(item) == 1:
        kind, given = next(iter(item.items()))
    else:
        raise ConfigError(f"{where}: expected a layer kind or a one-key mapping, got {item!r}")
    if kind not in LAYER_KINDS:
        raise ConfigError(f"{where}: unknown layer kind {kind!r} (known: {', '.join(LAYER_KINDS)})")
    entry = LAYER_KINDS[kind]
    if given is None:
        given = {}
    elif not isinstance(given, dict):
        if entry.bare is None:
            raise ConfigError(f"{where}: {kind} takes no value, got {given!r}")
        given = {entry.bare: given}
    unknown = set(given) - set(entry.args)
    if unknown:
        raise ConfigError(f"{where}: {kind} has no argument {sorted(unknown)[0]!r} "
                          f"(allowed: {', '.join(entry.args) or 'none'})")
    args = {**entry.defaults, **given}
    missing = [a for a in entry.args if a not in args]
    if missing:
        raise ConfigError(f"{where}: {kind} needs {missing[0]}")
    if entry.check is not None:
        entry.check(args, where)
    return kind, args


def resolve_layers(preset: Optional[str], layers: Optional[list], params: dict[str, Any],
                   channels: int, classes: int) -> list:
    if layers is not None:
        return expand_layers(layers, {"classes": classes, "channels": channels})
    spec = load_preset(preset)
    values = {**spec["params"], **params, "classes": classes, "channels": channels}
    return expand_layers(spec["layers"], values)


def build_model(model_config, input_shape: tuple[int, int, int], classes: int) -> nn.Sequential:
    """The network a ModelConfig describes, for inputs of `input_shape` (C, H, W), with the layer
    defaults of its framework flavor (`model_config.defaults`; None: torch)."""
    layers = resolve_layers(model_config.preset, model_config.layers, model_config.params(),
                            input_shape[0], classes)
    flavor = getattr(model_config, "defaults", None) or "torch"
    return build_layers(apply_flavor(layers, flavor), input_shape)


# What each framework flavor gives the layer arguments a spec leaves out (torch: LAYER_KINDS' own defaults).
# BatchNorm momentum is in torch's convention (the weight of the new batch): Keras' momentum 0.99 is 0.01 here.
# Keras 3's BatchNormalization moves its variance with the biased batch variance; TensorFlow 1's fused
# batch norm (tf.layers.batch_normalization on conv outputs) with the unbiased one, as torch does.
FLAVOR_LAYER_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "torch": {},
    "keras": {"conv": {"init": "glorot"}, "dense": {"init": "glorot"},
              "batchnorm": {"momentum": 0.01, "eps": 1e-3, "variance": "biased"}},
    "tf1": {"conv": {"init": "glorot"}, "dense": {"init": "glorot"},
            "batchnorm": {"momentum": 0.01, "eps": 1e-3, "variance": "unbiased"}},
}


def apply_flavor(items: list, flavor: str) -> list:
    """The layer items with the flavor's defaults filled into the arguments they leave out (inside
    residual blocks too). Items that do not parse are left alone for parse_layer to report."""
    extra = FLAVOR_LAYER_DEFAULTS[flavor]
    if not extra:
        return items
    out = []
    for item in items:
        if isinstance(item, str):
            kind, given = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            kind, given = next(iter(item.items()))
        else:
            kind, given = None, None
        entry = LAYER_KINDS.get(kind) if isinstance(kind, str) else None
        if entry is None:
            out.append(item)
            continue
        if given is None:
            given = {}
        elif not isinstance(given, dict):
            if entry.bare is None:
                out.append(item)
                continue
            given = {entry.bare: given}
        if kind == "residual" and isinstance(given.get("layers"), list):
            given = {**given, "layers": apply_flavor(given["layers"], flavor)}
        out.append({kind: {**extra.get(kind, {}), **given}})
    return out


def build_layers(items: list, input_shape: tuple[int, int, int]) -> nn.Sequential:
    return nn.Sequential(_build(items, tuple(input_shape), "layer")[0])


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


def _build(items: list, shape: tuple, where: str) -> tuple["OrderedDict[str, nn.Module]", tuple]:
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
    return module, (a["filters"], h, w)


INITS = ("torch", "glorot")


def _check_init(a: dict[str, Any], where: str) -> None:
    if a["init"] not in INITS:
        raise ConfigError(f"{where}: init={a['init']!r} must be torch or glorot")


def _check_conv(a: dict[str, Any], where: str) -> None:
    if not (a["padding"] in ("same", "valid") or isinstance(a["padding"], int)):
        raise ConfigError(f"{where}: conv padding={a['padding']!r} must be same, valid or a number")
    if isinstance(a["stride"], bool) or not isinstance(a["stride"], int) or a["stride"] < 1:
        raise ConfigError(f"{where}: conv stride={a['stride']!r} must be a whole number >= 1")
    _check_init(a, where)


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
        dims = [d for d in range(x.dim()) if d != 1]
        with torch.no_grad():
            stats = x.float()
            var, mean = torch.var_mean(stats, dim=dims, correction=0)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
            self.num_batches_tracked.add_(1)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)


class BiasedBatchNorm1d(_BiasedVariance, nn.BatchNorm1d):
    pass


class BiasedBatchNorm2d(_BiasedVariance, nn.BatchNorm2d):
    pass


def _batchnorm(a: dict[str, Any], shape: tuple, where: str) -> tuple[nn.Module, tuple]:
    if a["variance"] == "biased":
        norm = BiasedBatchNorm2d if len(shape) == 3 else BiasedBatchNorm1d
    else:
        norm = nn.BatchNorm2d if len(shape) == 3 else nn.BatchNorm1d
    return norm(shape[0], eps=a["eps"], momentum=a["momentum"]), shape


def _check_batchnorm(a: dict[str, Any], where: str) -> None:
    if a["variance"] not in ("unbiased", "biased"):
        raise ConfigError(f"{where}: batchnorm variance={a['variance']!r} must be unbiased or biased")
    if not 0 < float(a["momentum"]) <= 1 or float(a["eps"]) <= 0:
        raise ConfigError(f"{where}: batchnorm needs 0 < momentum <= 1 and eps > 0 "
                          f"(got momentum={a['momentum']}, eps={a['eps']}; momentum in torch's convention: "
                          "Keras' 0.99 is 0.01)")


def _flatten(a: dict[str, Any], shape: tuple, where: str) -> tuple[nn.Module, tuple]:
    return nn.Flatten(), (int(torch.tensor(shape).prod()),)


def _residual(a: dict[str, Any], shape: tuple, where: str) -> tuple[nn.Module, tuple]:
    body, out = _build(a["layers"], shape, f"{where} layer")
    if out != shape:
        raise ConfigError(f"{where}: its layers turn shape {shape} into {out}; a residual must keep the shape")
    return Residual(body), shape


def _check_residual(a: dict[str, Any], where: str) -> None:
    if not (isinstance(a["layers"], list) and a["layers"]):
        raise ConfigError(f"{where}: residual takes a non-empty list of layers, got {a['layers']!r}")


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
    "batchnorm": LayerKind(_batchnorm, ("momentum", "eps", "variance"), None,
                           {"momentum": 0.1, "eps": 1e-5, "variance": "unbiased"}, prefix="bn", check=_check_batchnorm),
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
    "scale": LayerKind(_same_shape(lambda a: Scale(float(a["factor"]))), ("factor",), "factor"),
    "dropout": LayerKind(_same_shape(lambda a: nn.Dropout(a["p"])), ("p",), "p", {"p": 0.5}, prefix="drop",
                         check=_check_rate("dropout")),
    "dropout2d": LayerKind(_same_shape(lambda a: nn.Dropout2d(a["p"])), ("p",), "p", {"p": 0.5}, prefix="drop",
                           needs="image", check=_check_rate("dropout2d")),
    "flatten": LayerKind(_flatten),
}
