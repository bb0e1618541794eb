"""Models from presets or YAML layer lists: a ModelConfig -> a torch.nn.Sequential (Layers) with stable layer names.

The layer items and their kinds are models/layers.py (the LAYER_KINDS registry).

Presets are YAML files in presets/ of the same form plus `params` (their defaults). In a preset,
`$name` (or `$name.i`, item i of a list) is replaced by a parameter, `$classes` and `$channels` come from the
dataset, and an item with `if: name` (or `if: not name`) is kept only when that parameter is truthy.

A framework flavor (`model.defaults`, from the config's top-level `defaults`) fills the layer arguments
a spec leaves out with that framework's defaults (FLAVOR_LAYER_DEFAULTS): Glorot-uniform kernels and
zero biases, and Keras' BatchNorm momentum / epsilon / moving variance. Arguments a spec gives win.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import yaml
from torch import nn
from torch.nn.modules import module as torch_module

from ..errors import ConfigError
from .layers import LAYER_KINDS, build_items, parse_layer
from .own import OwnModel, absolute_reference, build_own

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


def check_model_config(preset: Optional[str], layers: Optional[list], params: dict[str, Any],
                       module: Optional[str] = None, args: Optional[dict] = None,
                       given: Optional[str] = None) -> Optional[str]:
    """Fail on an unknown preset, an unknown or ill-typed preset parameter, a bad layer item or a
    malformed model.module; returns model.module with a .py file's path made absolute."""
    if module is not None or given is not None:
        if layers is not None:
            raise ValueError("give one of model.preset, model.layers or model.module")
        if params:
            raise ValueError(f"model.{next(iter(params))}: unknown key for your own model "
                             "(its factory's arguments go in model.args)")
        return absolute_reference(module) if module is not None else None
    if args:
        raise ValueError("model.args: the arguments of model.module's factory; give model.module too")
    if layers is not None:
        if params:
            raise ValueError(f"model.{next(iter(params))}: preset parameters need model.preset, "
                             "and model.layers replaces the preset")
        for index, item in enumerate(layers):
            parse_layer(item, f"model.layers[{index}]")
        return None
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
    return None


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




def resolve_layers(preset: Optional[str], layers: Optional[list], params: dict[str, Any],
                   channels: int, classes: int) -> list:
    if layers is not None:
        return expand_layers(layers, {"classes": classes, "channels": channels})
    spec = load_preset(preset)
    values = {**spec["params"], **params, "classes": classes, "channels": channels}
    return expand_layers(spec["layers"], values)


def build_model(model_config, input_shape: tuple[int, int, int], classes: int,
                given: Optional[OwnModel] = None) -> nn.Module:
    """The network a ModelConfig describes, for inputs of `input_shape` (C, H, W), with the layer
    defaults of its framework flavor (`model_config.defaults`; None: torch). Your own model
    (model.module, or `given`: an nn.Module or a factory passed in Python) is built by models/own.py."""
    if given is not None or model_config.module or model_config.given:
        return build_own(model_config, input_shape, classes, given)
    layers = resolve_layers(model_config.preset, model_config.layers, model_config.params(),
                            input_shape[0], classes)
    flavor = getattr(model_config, "defaults", None) or "torch"
    return build_layers(apply_flavor(layers, flavor), input_shape)


# What each framework flavor gives the layer arguments a spec leaves out (torch: LAYER_KINDS' own defaults).
# BatchNorm momentum is in torch's convention (the weight of the new batch): Keras' momentum 0.99 is 0.01 here.
# Keras 3's BatchNormalization moves its variance with the biased batch variance; TensorFlow 1's
# tf.layers.batch_normalization with its fused kernel's unbiased one on conv outputs (as torch does) and the
# biased one after a dense layer, where the fused kernel cannot run (layers.py variance "fused").
# tests/test_keras_parity.py checks these against Keras' signatures and TF 1.15's documented ones.
FLAVOR_LAYER_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "torch": {},
    "keras": {"conv": {"init": "glorot"}, "dense": {"init": "glorot"},
              "batchnorm": {"momentum": 0.01, "eps": 1e-3, "variance": "biased"}},
    "tf1": {"conv": {"init": "glorot"}, "dense": {"init": "glorot"},
            "batchnorm": {"momentum": 0.01, "eps": 1e-3, "variance": "fused"}},
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


def check_layer_names(model: nn.Module, names: Sequence[str], key: str = "analysis.tsne.layers") -> None:
    """Every one of `names` is a layer of `model` (a module name: `conv1`, or a dotted path inside it:
    `features.3`); else a ConfigError naming `key` (the setting that names them; "" for none) and the
    first name that is not there."""
    known = dict(model.named_modules())
    missing = [name for name in names if name not in known or not name]
    if missing:
        shown = [name for name, _ in model.named_children()]
        raise ConfigError(f"{key + ': ' if key else ''}layer {missing[0]!r} is not in the model "
                          f"(layers: {', '.join(shown)}{', or a dotted path inside one' if len(known) > len(shown) + 1 else ''})")


class Layers(nn.Sequential):
    """nn.Sequential, but a ReLU followed by a max-pool runs as the pool, then the ReLU: the same values and
    gradients (max commutes with ReLU, ties and -inf padding included) on the pooled map, a quarter of the
    elements for a 2x2 pool. cnn3's and cnn3-fast's train steps are 1.05-1.22x faster on our CPU
    (benchmarks/relu_pool.py), and a run trains to the same weights. Where either layer has a hook (feature
    capture, a summary), both run in their written order, so the hook sees what the layer list says."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self._modules.values())
        swap = not global_hooks()
        i = 0
        while i < len(layers):
            if swap and i + 1 < len(layers) and swappable(layers[i], layers[i + 1]):
                x = layers[i](layers[i + 1](x))
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x


def swappable(relu: nn.Module, pool: nn.Module) -> bool:
    return (type(relu) is nn.ReLU and type(pool) is nn.MaxPool2d and not pool.return_indices
            and not hooked(relu) and not hooked(pool))


def hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def global_hooks() -> bool:
    """Hooks registered for every module (torch.nn.modules.module.register_module_forward_hook and kin)."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks
                or torch_module._global_backward_hooks or torch_module._global_backward_pre_hooks)


def build_layers(items: list, input_shape: tuple[int, int, int]) -> nn.Sequential:
    return Layers(build_items(items, tuple(input_shape), "layer")[0])
