"""Device-resident batches: the uint8 images live on the device once; each epoch is a permutation
and each step a slice, augmented as a batch and normalized in one fused multiply-add."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

# uint8 batch, generator -> float batch in [0, 1]
Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


class DeviceLoader:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: list[float],
                 std: list[float], shuffle: bool = False, generator: Optional[torch.Generator] = None,
                 augment: Optional[Augment] = None, channels_last: bool = True,
                 whiten: Optional[torch.Tensor] = None):
        if shuffle and generator is None:
            raise ValueError("a shuffling loader needs a torch.Generator")
        self.images = images  # uint8 (N, C, H, W) on the device
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.augment = augment
        self.channels_last = channels_last
        self.whiten = whiten.to(images.device) if whiten is not None else None  # (D, D) ZCA matrix
        device = images.device
        # x / 255 normalized is x * scale + shift with scale = 1 / (255 std), shift = -mean / std.
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 pixels, or floats in [0, 1] from an augmentation, to normalized floats."""
        if batch.dtype == torch.uint8:
            out = torch.addcmul(self.shift, batch.float(), self.scale)
        else:
            out = torch.addcmul(self.shift, batch, self.scale * 255.0)
        if self.whiten is not None:
            out = (out.reshape(len(out), -1) @ self.whiten).view(out.shape)
        return out.contiguous(memory_format=torch.channels_last) if self.channels_last else out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator, device=self.generator.device)
            order = order.to(self.images.device)
        for start in range(0, n, self.batch_size):
            if self.shuffle:
                index = order[start:start + self.batch_size]
                images, labels = self.images[index], self.labels[index]
            else:
                images = self.images[start:start + self.batch_size]
                labels = self.labels[start:start + self.batch_size]
            if self.augment is not None:
                images = self.augment(images, self.generator)
            yield self.normalize(images), labels
