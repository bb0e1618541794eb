"""Which layers the feature-map and filter figures show, and their outputs for one image, read the way
the framework flavor reads a network. Under `keras` (and `tf1`, whose tf.layers do the same) an
activation right after a convolution or a dense layer is that layer's `activation=`: the layer's map is
shown after it, and the activation is not a layer of its own when layers are counted. Under `torch`
every module is a layer and its map is its own output. Layers are named as `model.named_modules()`
names them (`conv1`, or a dotted path inside a module: `features.3`), so any nn.Module works."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..evaluation import eval_mode
from ..models.build import check_layer_names
from ..models.summary import is_leaf

# one call of a module in a forward pass: name, module, id of its input, its output, the output's values then
Call = tuple[str, nn.Module, int, torch.Tensor, np.ndarray]

ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
               nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.PReLU, nn.Softmax)
FOLDS_INTO = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # Keras' Conv2D / Dense take an `activation=`
FOLDING_FLAVORS = ("keras", "tf1")


@dataclass
class LayerOutput:
    """One call of a layer in the forward pass: its name, what it is, and its output for the image
    (after the folded activation, if any: `activation` names it)."""

    name: str
    kind: str
    output: np.ndarray
    activation: str = ""

    @property
    def title(self) -> str:
        return f"{self.name} + {self.activation}" if self.activation else self.name


@torch.inference_mode()
def forward_calls(model: nn.Module, image: torch.Tensor, names: list[str]) -> list[Call]:
    """(name, module, id of its input, output) of every call of a leaf module and of the named modules,
    in the order the forward pass finishes them, for one normalized image (1, C, H, W)."""
    modules = dict(model.named_modules())
    watched = {name for name, module in modules.items() if name and is_leaf(module)} | set(names)
    calls: list[Call] = []

    def hook(name):
        def record(module, inputs, output):
            if isinstance(output, torch.Tensor):
                # the output object itself: kept alive, so no later tensor takes its id, and the next call's
                # input is this very object when it applies to this output (how an activation is folded)
                # and its values now: an in-place activation called next would change the object's
                calls.append((name, module, id(inputs[0]) if inputs else 0, output, output[0].float().cpu().numpy().copy()))
        return record

    handles = [modules[name].register_forward_hook(hook(name)) for name in modules if name in watched]
    try:
        with eval_mode(model):
            model(image)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def fold_activations(calls: list[Call], flavor: str) -> list[LayerOutput]:
    """The layers as the flavor counts them: under keras / tf1 an activation whose input is the output
    of the conv / dense call just before it is folded into that call (its output becomes the layer's)."""
    layers: list[LayerOutput] = []
    previous: Union[Call, None] = None
    for call in calls:
        name, module, input_id, _, values = call
        folds = (flavor in FOLDING_FLAVORS and isinstance(module, ACTIVATIONS) and previous is not None
                 and isinstance(previous[1], FOLDS_INTO) and input_id == id(previous[3]) and not layers[-1].activation)
        if folds:
            layers[-1].output, layers[-1].activation = values, name
        else:
            layers.append(LayerOutput(name, type(module).__name__, values))
        previous = call
    return layers


def parse_layers(layers: Union[int, str]) -> Union[int, list[str]]:
    """`--layers`: a count ("4") or names ("conv1,pool1", dotted paths allowed)."""
    text = str(layers).strip()
    if text.isdigit():
        if int(text) < 1:
            raise ConfigError(f"--layers={text}: give a count of at least 1, or layer names (conv1,pool1)")
        return int(text)
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError(f"--layers={layers!r}: give a count (4) or layer names (conv1,pool1)")
    return names


def feature_map_layers(model: nn.Module, image: torch.Tensor, layers: Union[int, str],
                       flavor: str) -> list[LayerOutput]:
    """The layers a feature-map figure shows for one normalized image: the first N layers (as the flavor
    counts them) while their outputs are maps (C, H, W), or the named ones (each must give maps)."""
    chosen = parse_layers(layers)
    names = chosen if isinstance(chosen, list) else []
    check_layer_names(model, names, "--layers")
    calls = forward_calls(model, image, names)
    if isinstance(chosen, int):
        leaves = [call for call in calls if is_leaf(call[1])]
        found = []
        for layer in fold_activations(leaves, flavor)[:chosen]:
            if layer.output.ndim != 3:
                break
            found.append(layer)
        return found
    found = []
    for name in names:
        at = next((index for index, call in enumerate(calls) if call[0] == name), None)  # its first call
        if at is None:
            raise ConfigError(f"--layers: {name!r} is not called in the forward pass, or gives no tensor")
        # the named layer and, for a folding flavor, the activation the next call applies to its output
        layer = fold_activations([calls[at], *calls[at + 1:at + 2]], flavor)[0]
        if layer.output.ndim != 3:
            shape = "x".join(map(str, layer.output.shape))
            raise ConfigError(f"--layers: {name!r} gives {shape} values, not feature maps (channels x height x "
                              f"width); a layer before the flatten gives maps")
        found.append(layer)
    return found


def conv_layers(model: nn.Module, layers: Union[int, str]) -> list[tuple[str, nn.Conv2d]]:
    """The convolutions a filter figure shows: the first N (in module order) or the named ones."""
    chosen = parse_layers(layers)
    convs = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Conv2d)]
    if isinstance(chosen, int):
        return convs[:chosen]
    check_layer_names(model, chosen, "--layers")
    modules = dict(model.named_modules())
    for name in chosen:
        if not isinstance(modules[name], nn.Conv2d):
            raise ConfigError(f"--layers: {name!r} is a {type(modules[name]).__name__}, not a convolution "
                              f"(convolutions: {', '.join(n for n, _ in convs) or 'none'})")
    return [(name, modules[name]) for name in chosen]


def kernel_range(count: int, first: int = 0, last: int = 0) -> range:
    """Which of a layer's `count` kernels to show: the first N, the last N, or (neither) all of them."""
    if first and last:
        raise ConfigError(f"--first={first} and --last={last}: give one of them")
    if first:
        return range(min(first, count))
    if last:
        return range(max(0, count - last), count)
    return range(count)
