"""Scoring a model: precision (autocast), test-time augmentation, logits and accuracy of a split.

Training (per-epoch validation, the final test score), `eval`, `predict` and the report all go
through `predict_logits`, so every number a run reports was computed the same way.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .data.loader import DeviceLoader
from .models.penalty import reported_penalty


def autocast_dtype(device: torch.device, precision: str) -> Optional[torch.dtype]:
    """The autocast dtype `precision` asks for on `device` (None: float32). "auto" is bf16 on GPUs
    that compute it natively, fp16 on older GPUs (T4, V100: emulated bf16 is slow), and float32 on
    CPUs: bf16 pays only on CPUs with bf16 instructions (AVX512-BF16, AMX), so the CPU recipes ask
    for it themselves (a cnn3 training step with channels_last: 2.4x float32 on our AVX512-BF16 CPU)."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto" and device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    return None


def autocast(device: torch.device, precision: str):
    """Autocast to the dtype of `autocast_dtype` (a no-op for float32)."""
    dtype = autocast_dtype(device, precision)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode inside the block, back in the mode it had afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


TTA_SHIFT = 2  # pixels the "flip-shift" views are translated by


def tta_views(images: torch.Tensor, tta: str) -> list[torch.Tensor]:
    """The views of a normalized NCHW batch whose logits test-time augmentation `tta` averages: the
    batch ("none"); and its mirror ("flip"); and both of those translated by TTA_SHIFT pixels
    down-right and up-left, edges reflected ("flip-shift": 6 views, as the fastest CIFAR-10 training
    scores its test set)."""
    views = [images]
    if tta in ("flip", "flip-shift"):
        views.append(images.flip(3))
    if tta == "flip-shift":
        s, (h, w) = TTA_SHIFT, images.shape[2:]
        padded = [F.pad(view, (s, s, s, s), mode="reflect") for view in views]
        views += [p[:, :, :h, :w] for p in padded] + [p[:, :, 2 * s:2 * s + h, 2 * s:2 * s + w] for p in padded]
    return views


def tta_logits(model: nn.Module, images: torch.Tensor, tta: str) -> torch.Tensor:
    """float32 mean of the model's logits over `tta_views`."""
    views = tta_views(images, tta)
    return sum(model(view).float() for view in views) / len(views)


def predict_logits(model: nn.Module, images: torch.Tensor, precision: str = "float32", tta: str = "none") -> torch.Tensor:
    """float32 logits of a normalized batch, with a run's precision (train.precision) and test-time
    augmentation (train.tta, `tta_views`)."""
    with autocast(images.device, precision):
        return tta_logits(model, images, tta)


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
def evaluate(model: nn.Module, loader: DeviceLoader, precision: str = "float32", tta: str = "none") -> Evaluation:
    """Mean cross-entropy, accuracy, logits and predicted classes of one split (eval mode), with
    a run's precision and test-time augmentation (default: float32, none)."""
    device = loader.images.device
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    outputs = []
    with eval_mode(model):
        for images, labels in loader:
            logits = predict_logits(model, images, precision, tta)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
            outputs.append(logits)
    logits = torch.cat(outputs) if outputs else torch.empty(0, 0, device=device)
    predicted = logits.argmax(1) if len(logits) else torch.empty(0, dtype=torch.long, device=device)
    n = max(len(predicted), 1)
    correct = (predicted == loader.labels).sum().item()
    return Evaluation(loss_sum.item() / n, correct / n, logits, predicted)


def with_penalty(result: Evaluation, model: nn.Module, optim) -> Evaluation:
    """`result` with the regularization its framework flavor adds to reported losses (models/penalty.py:
    keras / tf1 add optim.l2's kernel penalty, as Keras' val_loss and evaluate() do; torch nothing)."""
    penalty = reported_penalty(model, optim)
    return dataclasses.replace(result, loss=result.loss + penalty) if penalty else result
