"""The reference pipeline the benchmarks compare against, written the way the seed reports train:
a torch DataLoader over a Dataset that pads, crops and flips one image at a time in numpy and
returns float NCHW tensors; Adam; the model is evaluated through a DataLoader too."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class PerSampleDataset(torch.utils.data.Dataset):
    """One image at a time: numpy pad-4 random crop and flip (when `augment`), then normalized float CHW."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, mean: list[float], std: list[float],
                 augment: bool = True, seed: int = 0):
        self.images, self.labels, self.augment = images, labels, augment
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.augment:
            image = np.pad(image, ((0, 0), (4, 4), (4, 4)))
            dy, dx = self.rng.integers(0, 9, size=2)
            image = image[:, dy:dy + 32, dx:dx + 32]
            if self.rng.random() < 0.5:
                image = image[:, :, ::-1]
        x = (image.astype(np.float32) / 255 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x)), int(self.labels[index])


def train_loader(splits, batch_size: int) -> torch.utils.data.DataLoader:
    images, labels = splits.train
    return torch.utils.data.DataLoader(PerSampleDataset(images, labels, splits.mean, splits.std),
                                       batch_size=batch_size, shuffle=True)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, loader) -> int:
    """One epoch of plain training; returns the number of images seen."""
    model.train()
    seen = 0
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
    return seen


@torch.no_grad()
def accuracy(model: nn.Module, arrays: tuple[np.ndarray, np.ndarray], mean, std, batch_size: int = 256) -> float:
    images, labels = arrays
    loader = torch.utils.data.DataLoader(PerSampleDataset(images, labels, mean, std, augment=False),
                                         batch_size=batch_size)
    model.eval()
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in loader)
    return correct / len(labels)
