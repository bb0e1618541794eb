"""Scoring a model: precision (autocast), test-time augmentation, logits and accuracy of a split.

Training (per-epoch validation, the final test score), `eval`, `predict` and the report all go
through `predict_logits`, so every number a run reports was computed the same way.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import TrainConfig
from .data.loader import DeviceLoader


def autocast(device: torch.device, precision: str):
    """bf16 autocast when `precision` asks for it ("auto": on CUDA only; bf16 is slow on CPUs without AMX)."""
    enabled = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block, back in the mode it had afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def predict_logits(model: nn.Module, images: torch.Tensor, settings: Optional[TrainConfig] = None) -> torch.Tensor:
    """float32 logits of a normalized batch, with the run's precision and test-time augmentation
    (tta "flip": the mean of the batch's and the mirrored batch's logits)."""
    settings = settings or TrainConfig()
    with autocast(images.device, settings.precision):
        logits = model(images).float()
        if settings.tta == "flip":
            logits = (logits + model(images.flip(3)).float()) / 2
    return logits


@dataclass
class Evaluation:
    """The score of one split. `logits` and `predictions` stay on the model's device."""

    loss: float
    acc: float
    logits: torch.Tensor
    predictions: torch.Tensor

    def __getitem__(self, key: str):
        """result["acc"] reads like result.acc, as in the dict this used to be."""
        return getattr(self, key)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: DeviceLoader, settings: Optional[TrainConfig] = None) -> Evaluation:
    """Mean cross-entropy, accuracy, logits and predicted classes of one split (eval mode), with
    the precision and test-time augmentation of `settings` (default: float32, none)."""
    device = loader.images.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    outputs = []
    with eval_mode(model):
        for images, labels in loader:
            logits = predict_logits(model, images, settings)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            outputs.append(logits)
    logits = torch.cat(outputs) if outputs else torch.empty(0, 0, device=device)
    predicted = logits.argmax(1) if len(logits) else torch.empty(0, dtype=torch.long, device=device)
    n = max(len(predicted), 1)
    correct = (predicted == loader.labels).sum().item()
    return Evaluation(loss_sum.item() / n, correct / n, logits, predicted)
