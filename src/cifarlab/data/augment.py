"""Batched augmentations on device tensors: every sample draws its own parameters from one
torch.Generator, and no Python runs per sample."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .loader import Augment


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad by `padding` and crop back to the input size at a random offset per sample
    (torchvision RandomCrop(size, padding) semantics). One gather for the whole batch."""
    n, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=generator.device).to(images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chans = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_hflip(images: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    flip = torch.rand(len(images), generator=generator, device=generator.device).to(images.device) < p
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def build_augment(augment_config) -> Optional[Augment]:
    """The training-time augmentation an AugmentConfig describes, or None when it does nothing."""
    crop, flip = augment_config.crop, augment_config.flip
    if not crop and not flip:
        return None

    def apply(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if crop:
            images = random_crop(images, crop, generator)
        if flip:
            images = random_hflip(images, generator)
        return images

    return apply
