"""Keras-style model summary: layer, output shape, parameters, trainable / non-trainable totals.

Counts follow Keras: a BatchNorm layer's moving mean and variance are non-trainable parameters
(its step counter is not a parameter at all), so the reports' tables can be checked directly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: Optional[tuple[int, ...]]  # per example, Keras order: (H, W, C) or (units,); None: see `calls`
    trainable: int
    non_trainable: int
    calls: int = 1  # forward calls of the layer in one pass of the model

    @property
    def params(self) -> int:
        return self.trainable + self.non_trainable

    @property
    def shape(self) -> str:
        """The output shape as text: "16x16x32", "multiple" (called more than once, as Keras says) or "unused"."""
        if self.calls > 1:
            return "multiple"
        if not self.calls:
            return "unused"
        return "x".join(str(s) for s in self.output_shape) if self.output_shape else "-"  # no tensor (a tuple)


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, non_trainable) parameter counts of a module, Keras style: batch norm's moving statistics
    and weights held as buffers (the fitted, frozen filters of a whitening layer) are non-trainable."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    stats = sum(b.numel() for name, b in module.named_buffers()
                if name.split(".")[-1] in ("running_mean", "running_var", "weight"))
    return trainable, frozen + stats


def is_leaf(module: nn.Module) -> bool:
    """A module without children (conv1, features.3): a layer of its own."""
    return next(module.children(), None) is None


def device_of(model: nn.Module) -> torch.device:
    """Where a model's parameters are (the CPU for a model without any)."""
    parameter = next(iter(model.parameters()), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def layers_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The rows of a summary: a Sequential's layers; for any other module its leaf modules (every
    module without children: conv1, features.3), each by its module name."""
    if isinstance(model, nn.Sequential):
        return list(model.named_children())
    return [(name, m) for name, m in model.named_modules() if name and is_leaf(m)]


def summarize(model: nn.Module, input_shape: tuple[int, int, int]) -> list[LayerRow]:
    """One row per layer (see layers_of), in the order the forward pass first calls them (layers it
    never calls last), with output shapes from that pass. A module's own parameters (outside any
    row's module) are a row named after the module."""
    layers = layers_of(model)
    shapes: dict[str, list[tuple[int, ...]]] = {name: [] for name, _ in layers}
    order: list[str] = []

    def record(name: str, out: Any) -> None:
        if not shapes[name]:
            order.append(name)
        shapes[name].append(tuple(out.shape[1:]) if isinstance(out, torch.Tensor) else ())

    hooks = [module.register_forward_hook(lambda m, i, out, name=name: record(name, out)) for name, module in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device_of(model)))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    modules = dict(layers)
    rows = []
    for name in order + [name for name, _ in layers if name not in order]:
        seen = shapes[name]
        shape = seen[0] if seen else None
        if shape is not None and len(shape) == 3:
            shape = (shape[1], shape[2], shape[0])
        rows.append(LayerRow(name, type(modules[name]).__name__, shape, *count_params(modules[name]), calls=len(seen)))
    if not isinstance(model, nn.Sequential):  # parameters held by a module with children, outside every row
        own = [own_params(module) for _, module in model.named_modules() if not is_leaf(module)]
        trainable, non_trainable = sum(t for t, _ in own), sum(n for _, n in own)
        if trainable or non_trainable:
            rows.append(LayerRow(type(model).__name__, "own parameters", None, trainable, non_trainable))
    return rows


def own_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, non_trainable) of a module's own parameters and statistics, not its children's."""
    own = list(module.parameters(recurse=False))
    stats = sum(b.numel() for name, b in module.named_buffers(recurse=False) if name in ("running_mean", "running_var"))
    return sum(p.numel() for p in own if p.requires_grad), sum(p.numel() for p in own if not p.requires_grad) + stats


def format_summary(rows: list[LayerRow], title: str = "") -> str:
    header = ("Layer (type)", "Output shape", "Param #")
    body = [(f"{r.name} ({r.kind})", r.shape, f"{r.params:,}") for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) + 2 for i in range(3)]
    rule = "-" * sum(widths)

    def line(cells: tuple[str, str, str]) -> str:
        return cells[0].ljust(widths[0]) + cells[1].ljust(widths[1]) + cells[2].rjust(widths[2])

    trainable = sum(r.trainable for r in rows)
    non_trainable = sum(r.non_trainable for r in rows)
    out = [title] if title else []
    out += [rule, line(header), rule, *(line(b) for b in body), rule,
            f"Total params: {trainable + non_trainable:,}",
            f"Trainable params: {trainable:,}",
            f"Non-trainable params: {non_trainable:,}"]
    return "\n".join(out)
