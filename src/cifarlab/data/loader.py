"""Device-resident batches: the uint8 images live on the device once; each epoch is a permutation
and each step a slice, augmented as a batch and normalized in one fused multiply-add.

Data-parallel ranks share the permutation (the same generator state on every rank) and each takes
its contiguous part of every global batch (`shard`); a trailing global batch smaller than the
number of ranks is dropped, so that every rank has at least one image in every step."""

from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch

# uint8 batch, generator, the images' indices in the split, the epoch (1-based) -> float batch in [0, 1]
Augment = Callable[[torch.Tensor, torch.Generator, torch.Tensor, int], torch.Tensor]


def shard(length: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of part `rank` of `length` items cut into `world` contiguous parts, as
    np.array_split cuts them (the first length % world parts are one longer)."""
    size, extra = divmod(length, world)
    start = rank * size + min(rank, extra)
    return start, start + size + (rank < extra)


def samplewise_standardize(images: torch.Tensor, scale: bool) -> torch.Tensor:
    """Keras' samplewise_center (and with `scale` samplewise_std_normalization) on float images in [0, 1]:
    each image minus its own mean over all channels and pixels, then divided by its std (ddof 0) + 1e-6."""
    dims = tuple(range(1, images.dim()))
    centered = images - images.mean(dim=dims, keepdim=True)
    if scale:
        centered = centered / (centered.std(dim=dims, keepdim=True, correction=0) + 1e-6)
    return centered


class DeviceLoader:
    """Batches of a split on its device. `batch_size` is the global batch; with `world` > 1 this
    loader yields part `rank` of each global batch (`shard`). The permutation is drawn from
    `generator`, the augmentation from `augment_generator` (default: the same generator)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, mean: list[float],
                 std: list[float], shuffle: bool = False, generator: Optional[torch.Generator] = None,
                 augment: Optional[Augment] = None, channels_last: bool = True,
                 whiten: Optional[torch.Tensor] = None, augment_generator: Optional[torch.Generator] = None,
                 rank: int = 0, world: int = 1, samplewise: str = "none"):
        if shuffle and generator is None:
            raise ValueError("a shuffling loader needs a torch.Generator")
        self.images = images  # uint8 (N, C, H, W) on the device
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = generator
        self.augment_generator = augment_generator or generator
        self.augment = augment
        self.rank, self.world = rank, world
        self.channels_last = channels_last
        self.whiten = whiten.to(images.device) if whiten is not None else None  # (D, D) ZCA matrix
        self.samplewise = samplewise  # none, center or std: per image, before the per-channel normalization
        self.epoch = 1  # the epoch the augmentation is told (the trainer sets it before each epoch)
        device = images.device
        # x / 255 normalized is x * scale + shift with scale = 1 / (255 std), shift = -mean / std.
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -mean_t / std_t

    def __len__(self) -> int:
        """Steps per epoch: global batches, less a trailing one smaller than the number of ranks."""
        n = len(self.labels)
        steps = -(-n // self.batch_size)
        return steps - 1 if self.world > 1 and 0 < n % self.batch_size < self.world else steps

    def global_size(self, step: int) -> int:
        """Images in global batch `step` (0-based), over all ranks."""
        return min(self.batch_size, len(self.labels) - step * self.batch_size)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 pixels, or floats in [0, 1] from an augmentation, to normalized floats: Keras'
        ImageDataGenerator.standardize order (per-image centering and scaling, then per channel, then ZCA)."""
        if self.samplewise != "none":
            batch = samplewise_standardize(batch.float() / 255 if batch.dtype == torch.uint8 else batch,
                                           self.samplewise == "std")
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
        for step in range(len(self)):
            start = step * self.batch_size
            stop = start + self.global_size(step)
            if self.world > 1:
                first, last = shard(stop - start, self.rank, self.world)
                start, stop = start + first, start + last
            if self.shuffle:
                index = order[start:stop]
                images, labels = self.images[index], self.labels[index]
            else:
                index = torch.arange(start, stop, device=self.images.device)
                images = self.images[start:stop]
                labels = self.labels[start:stop]
            if self.augment is not None:
                images = self.augment(images, self.augment_generator, index, self.epoch)
            yield self.normalize(images), labels
