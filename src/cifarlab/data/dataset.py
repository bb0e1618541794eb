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


def integer_labels(where, values) -> np.ndarray:
    """`values` as a 1-D int64 array, checked before any arithmetic on them: integers, or floats that
    are whole numbers; else a DataError naming `where` and the first value that is not an integer (a
    NaN, a fraction, a string, a boolean)."""
    try:
        labels = np.asarray(values)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: labels are not a list of integers ({' '.join(str(e).split())})") from None
    if labels.ndim != 1:
        raise DataError(f"{where}: labels must be a list of integers, got {labels.dtype} of shape {labels.shape}")
    if np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        return labels.astype(np.int64, copy=False)
    items = list(values) if isinstance(values, (list, tuple)) else list(labels)  # a list of mixed types as given
    if np.issubdtype(labels.dtype, np.floating):
        whole = np.isfinite(labels) & (np.abs(labels) < 2**62)
        whole[whole] = labels[whole] == np.round(labels[whole])
    else:  # strings, booleans, None, complex numbers: only the integers of a mixed list pass
        whole = np.array([isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in items])
    if not whole.all():
        index = int(np.argmin(whole))
        value = items[index].item() if isinstance(items[index], np.generic) else items[index]
        raise DataError(f"{where}: label {value!r} of image {index} is not an integer "
                        f"(labels must be integers, got {labels.dtype})")
    return labels.astype(np.int64)


def checked_labels(path: Path, values, count: int, classes: int) -> np.ndarray:
    """`values` as int64 labels, one per image, each in [0, classes); else a DataError naming the file."""
    labels = integer_labels(path, values)
    if len(labels) != count:
        raise DataError(f"{path}: {count} images but {len(labels)} labels")
    bad = (labels < 0) | (labels >= classes)
    if bad.any():
        index = int(np.argmax(bad))
        raise DataError(f"{path}: label {int(labels[index])} of image {index} is outside 0-{classes - 1} "
                        f"({classes} classes)")
    return labels


def check_dataset(ds: Dataset) -> Dataset:
    """The checks every reader's result passes (readers check their own files first, naming them):
    uint8 (N, C, H, W) images, train and test of one shape, a label per image, labels in range
    (returned as int64)."""
    labeled = {}
    for split, images, labels in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        where = f"{ds.origin} ({split})"
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
            raise DataError(f"{where}: images must be uint8 (N, C, H, W), got {getattr(images, 'dtype', type(images))} "
                            f"{getattr(images, 'shape', '')}")
        if images.shape[1] not in (1, 3) or min(images.shape[2:]) < 1:
            raise DataError(f"{where}: images of shape {images.shape[1:]} (C, H, W): C must be 1 or 3")
        labeled[f"y_{split}"] = checked_labels(where, labels, len(images), len(ds.classes))
    if len(ds.y_train) == 0:
        raise DataError(f"{ds.origin}: no training images")
    if ds.x_train.shape[1:] != ds.x_test.shape[1:]:
        raise DataError(f"{ds.origin}: training images are {ds.x_train.shape[1:]} but test images {ds.x_test.shape[1:]}")
    return replace(ds, **labeled)
