"""From a config to data on the device: read, split, fit the normalization (and ZCA) on the
training split, and wrap a split in a DeviceLoader that normalizes exactly as training did."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..config import Config
from ..errors import ConfigError
from .loader import DeviceLoader
from .sources import Dataset, dataset_from_config
from .splits import channel_stats, split_indices, zca_matrix

SPLITS = ("train", "val", "test")


@dataclass
class Splits:
    """The data of one run, split, with the normalization learned from the training split."""

    dataset: Dataset
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]
    mean: list[float]
    std: list[float]
    whiten: Optional[torch.Tensor] = None  # ZCA matrix fitted on the training split
    samplewise: str = "none"  # data.samplewise: per image, before mean / std (loader.samplewise_standardize)

    def normalization(self) -> dict[str, Any]:
        """What a checkpoint stores so that evaluation and prediction normalize as training did."""
        return {"mean": self.mean, "std": self.std, "zca": self.whiten, "samplewise": self.samplewise}


def select_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda: no CUDA device is available (use auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def prepare_data(config: Config, stored: Optional[dict[str, Any]] = None) -> Splits:
    """Read and split the data; normalization (and ZCA) is fitted on the training split, or taken
    from `stored` (a checkpoint's "normalization") so evaluation uses exactly the training statistics."""
    ds = dataset_from_config(config.data, config.seed)
    train_idx, val_idx = split_indices(ds.y_train, config.data.val_size, config.seed, config.data.stratify)
    x_train = ds.x_train[train_idx]
    arrays = ((x_train, ds.y_train[train_idx]), (ds.x_train[val_idx], ds.y_train[val_idx]), (ds.x_test, ds.y_test))
    if stored is not None:
        return Splits(ds, *arrays, stored["mean"], stored["std"], stored.get("zca"), stored.get("samplewise", "none"))
    channels = ds.image_shape[0]
    if config.data.mean is not None:
        if len(config.data.mean) != channels or len(config.data.std) != channels:
            raise ConfigError(f"data.mean/data.std: {ds.name} has {channels} channel(s), "
                              f"got {len(config.data.mean)} and {len(config.data.std)} values")
        mean, std = list(config.data.mean), list(config.data.std)
    elif config.data.normalize == "center":  # Keras featurewise_center alone: the training mean, no std
        mean, std = channel_stats(x_train)[0], [1.0] * channels
    elif config.data.normalize:
        mean, std = channel_stats(x_train)
    else:
        mean, std = [0.0] * channels, [1.0] * channels
    whiten = torch.from_numpy(zca_matrix(x_train, mean, std, config.data.zca_epsilon)) if config.data.zca else None
    return Splits(ds, *arrays, mean, std, whiten, config.data.samplewise)


def to_device(arrays: tuple[np.ndarray, np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = arrays
    return torch.from_numpy(np.ascontiguousarray(images)).to(device), torch.from_numpy(labels).to(device)


def eval_loader(arrays: tuple[np.ndarray, np.ndarray], splits: Splits, config: Config,
                device: torch.device) -> DeviceLoader:
    """An unshuffled, unaugmented loader of `arrays` with the run's normalization."""
    images, labels = to_device(arrays, device)
    return DeviceLoader(images, labels, config.train.eval_batch_size, splits.mean, splits.std,
                        channels_last=config.train.channels_last, whiten=splits.whiten, samplewise=splits.samplewise)
