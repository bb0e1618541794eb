"""Activations of named layers, captured with forward hooks."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError


def check_layers(model: nn.Module, layers: list[str]) -> None:
    names = [name for name, _ in model.named_children()]
    missing = [layer for layer in layers if layer not in names]
    if missing:
        raise ConfigError(f"layer {missing[0]!r} is not in the model (layers: {', '.join(names)})")


@contextmanager
def recording(model: nn.Module, layers: list[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, every forward pass appends each named layer's output to the dict."""
    check_layers(model, layers)
    found: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    modules = dict(model.named_children())
    hooks = [modules[layer].register_forward_hook(lambda m, i, out, layer=layer: found[layer].append(out.detach()))
             for layer in layers]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


@torch.inference_mode()
def capture(model: nn.Module, loader, layers: list[str]) -> dict[str, np.ndarray]:
    """{layer: (N, D) float16 features} of every example of an (unshuffled) loader, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with recording(model, layers) as found:
            for images, _ in loader:
                model(images)
    finally:
        model.train(was_training)
    return {layer: torch.cat([t.flatten(1).float() for t in outs]).cpu().numpy().astype(np.float16)
            for layer, outs in found.items()}


@torch.inference_mode()
def activations_of(model: nn.Module, image: torch.Tensor, layers: list[str]) -> dict[str, np.ndarray]:
    """{layer: (C, H, W) or (D,) float32} for one normalized image (1, C, H, W)."""
    was_training = model.training
    model.eval()
    try:
        with recording(model, layers) as found:
            model(image)
    finally:
        model.train(was_training)
    return {layer: outs[0][0].float().cpu().numpy() for layer, outs in found.items()}
