"""Optimizers, learning-rate schedules and the Keras-style L2 kernel penalty."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def make_optimizer(optim_config, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    c = optim_config
    if c.name == "sgd":
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, nesterov=c.nesterov,
                               weight_decay=c.weight_decay)
    return torch.optim.Adam(params, lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay)


def make_scheduler(schedule_config, optimizer: torch.optim.Optimizer,
                   epochs: int) -> Optional[torch.optim.lr_scheduler.LRScheduler]:
    """A per-epoch schedule, or None for a constant learning rate."""
    c = schedule_config
    if c.name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=c.step_size, gamma=c.gamma)
    if c.name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=c.min_lr)
    return None


def kernels(model: nn.Module) -> list[torch.Tensor]:
    """The weight tensors Keras' kernel_regularizer applies to: conv and dense kernels, not biases or BN."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def l2_penalty(model: nn.Module, l2: float) -> torch.Tensor:
    return l2 * sum((w * w).sum() for w in kernels(model))
