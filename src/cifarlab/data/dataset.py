"""What every reader returns and the checks every reader's result passes: uint8 (N, C, H, W)
images, int64 labels in range, one per image, and class names."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # uint8 (N, C, H, W)
    y_train: np.ndarray  # int64 (N,)
    x_test: np.ndarray
    y_test: np.ndarray
    classes: list[str]
    origin: str  # where it was read from, for logs and env.json

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def head(self, train: Optional[int] = None, test: Optional[int] = None) -> "Dataset":
        """The same dataset keeping only the first `train` / `test` images."""
        return replace(self, x_train=self.x_train[:train], y_train=self.y_train[:train],
                       x_test=self.x_test[:test], y_test=self.y_test[:test])


def checked_labels(path: Path, values, count: int, classes: int) -> np.ndarray:
    """`values` as int64 labels, one per image, each in [0, classes); else a DataError naming the file."""
    try:
        labels = np.asarray(values)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: labels are not a list of integers ({e})") from None
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
        raise DataError(f"{path}: labels must be a list of integers, got {labels.dtype} of shape {labels.shape}")
    if len(labels) != count:
        raise DataError(f"{path}: {count} images but {len(labels)} labels")
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        index = int(np.argmax(bad))
        raise DataError(f"{path}: label {int(labels[index])} of image {index} is outside 0-{classes - 1} "
                        f"({classes} classes)")
    return labels.astype(np.int64)


def check_dataset(ds: Dataset) -> Dataset:
    """The checks every reader's result passes (readers check their own files first, naming them):
    uint8 (N, C, H, W) images, train and test of one shape, a label per image, labels in range."""
    for split, images, labels in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        where = f"{ds.origin} ({split})"
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{where}: images must be uint8 (N, C, H, W), got {getattr(images, 'dtype', type(images))} "
                            f"{getattr(images, 'shape', '')}")
        if images.shape[1] not in (1, 3) or min(images.shape[2:]) < 1:
            raise DataError(f"{where}: images of shape {images.shape[1:]} (C, H, W): C must be 1 or 3")
        checked_labels(where, labels, len(images), len(ds.classes))
    if len(ds.y_train) == 0:
        raise DataError(f"{ds.origin}: no training images")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise DataError(f"{ds.origin}: training images are {ds.x_train.shape[1:]} but test images {ds.x_test.shape[1:]}")
    return ds
