"""Class probabilities of image files with a run's best model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from .errors import DataError


def read_image(path: Path, input_shape: tuple[int, int, int]) -> np.ndarray:
    """A PNG / JPEG of any size as uint8 (C, H, W) for a model taking `input_shape`: converted to gray
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


def predict_files(run_dir: Path, paths: list[Path], top_k: int = 3, output: Optional[Path] = None) -> dict[str, Any]:
    from .analysis.plots import predictions
    from .train.trainer import load_run, predict_logits

    run = load_run(run_dir)
    shape = tuple(run.checkpoint["input_shape"])
    images = [read_image(Path(p), shape) for p in paths]
    with torch.inference_mode():
        logits = predict_logits(run.model, run.normalize(np.stack(images)), run.config.train)
        probabilities = torch.softmax(logits, dim=1).cpu().numpy()
    names = [Path(p).name for p in paths]
    figure = predictions(images, names, probabilities, run.classes, output or run.path / "plots" / "predict.png",
                         min(top_k, len(run.classes)))
    return {"names": names, "classes": run.classes, "probabilities": probabilities, "figure": figure}
