"""The Keras-style L2 kernel penalty (`optim.l2`: Keras' kernel_regularizer on every conv and dense
kernel), and what each framework flavor adds of it to the losses it reports.

Training always minimizes loss + penalty, and the reported training loss includes it. Keras (and
TensorFlow 1's tf.keras) also adds the regularization losses to `val_loss` and to `evaluate()`, so
under the keras and tf1 flavors the validation and test losses include the penalty too. The torch
flavor reports the data loss for validation and test, as a PyTorch loop that adds the penalty to
its training loss and scores other splits with its criterion alone does.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import ConfigError


def kernels(model: nn.Module, layers: Optional[list[str]] = None) -> list[torch.Tensor]:
    """The weights Keras' kernel_regularizer applies to: conv and dense kernels (not biases or BN),
    of all such layers or of the named ones."""
    found = {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if layers is None:
        return [m.weight for m in found.values()]
    missing = [name for name in layers if name not in found]
    if missing:
        raise ConfigError(f"optim.l2_layers: no conv or dense layer {missing[0]!r} (have: {', '.join(found)})")
    return [found[name].weight for name in layers]


def l2_penalty(weights: list[torch.Tensor], l2: float) -> torch.Tensor:
    return l2 * sum((w * w).sum() for w in weights)


def reported_penalty(model: nn.Module, optim) -> float:
    """The penalty a flavor adds to validation and test losses (`optim`: an OptimConfig): the L2 kernel
    penalty at the model's current weights under keras / tf1, 0 under torch or without optim.l2."""
    if not optim.l2 or (optim.defaults or "torch") == "torch":
        return 0.0
    with torch.no_grad():
        return float(l2_penalty(kernels(model, optim.l2_layers), optim.l2))
