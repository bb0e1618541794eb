"""Keras-style model summary: layer, output shape, parameters, trainable / non-trainable totals.

Counts follow Keras: a BatchNorm layer's moving mean and variance are non-trainable parameters
(its step counter is not a parameter at all), so the reports' tables can be checked directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]  # per example, Keras order: (H, W, C) or (units,)
    trainable: int
    non_trainable: int

    @property
    def params(self) -> int:
        return self.trainable + self.non_trainable


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, non_trainable) parameter counts of a module, Keras style."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    stats = sum(b.numel() for name, b in module.named_buffers() if name.split(".")[-1] in ("running_mean", "running_var"))
    return trainable, frozen + stats


def summarize(model: nn.Sequential, input_shape: tuple[int, int, int]) -> list[LayerRow]:
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = [
        module.register_forward_hook(lambda m, i, out, name=name: shapes.__setitem__(name, tuple(out.shape[1:])))
        for name, module in model.named_children()
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    rows = []
    for name, module in model.named_children():
        shape = shapes[name]
        keras_shape = (shape[1], shape[2], shape[0]) if len(shape) == 3 else shape
        rows.append(LayerRow(name, type(module).__name__, keras_shape, *count_params(module)))
    return rows


def format_summary(rows: list[LayerRow], title: str = "") -> str:
    header = ("Layer (type)", "Output shape", "Param #")
    body = [(f"{r.name} ({r.kind})", "x".join(str(s) for s in r.output_shape), f"{r.params:,}") for r in rows]
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
