"""Image files (PNG, JPEG, anything Pillow reads) as uint8 arrays in a model's input shape."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import DataError


def read_image(path: Path, input_shape: tuple[int, int, int]) -> np.ndarray:
    """An image file of any size as uint8 (C, H, W) for a model taking `input_shape`: converted to gray
    or RGB as the model needs, resized (bilinear) as report 002 did with an outside photo."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = input_shape
    try:
        with Image.open(path) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({str(e).splitlines()[0]})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()
