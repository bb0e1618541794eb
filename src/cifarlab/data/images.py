"""Image files (PNG, JPEG, anything Pillow reads) as uint8 arrays in a model's input shape."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import DataError, first_line

# Larger images are refused before decoding (a PNG of a few KB can declare 30000 x 30000 pixels:
# a decompression bomb). Photos of up to 40 megapixels pass.
MAX_PIXELS = 40_000_000


def read_image(path: Path, input_shape: tuple[int, int, int]) -> np.ndarray:
    """An image file of any size as uint8 (C, H, W) for a model taking `input_shape`: converted to gray
    or RGB as the model needs, resized (bilinear) as report 002 did with an outside photo."""
    channels, height, width = input_shape
    return decode_image(path, (height, width), channels)


def decode_image(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """An image file as uint8 (channels, H, W), converted to gray (1) or RGB (3) and resized
    (bilinear) to `size` (H, W); too large, truncated or unreadable files are a DataError naming it."""
    from PIL import Image, UnidentifiedImageError

    height, width = size
    try:
        with warnings.catch_warnings():  # Pillow warns of large images; MAX_PIXELS refuses them below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            if image.width * image.height > MAX_PIXELS:
                raise DataError(f"{path}: image of {image.width} x {image.height} pixels is too large "
                                f"(at most {MAX_PIXELS:,} pixels)")
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (width, height):
                image = image.resize((width, height), Image.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: image is too large ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({first_line(e)})") from None
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1).copy()
