"""Figures (matplotlib, Agg backend, PNG)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def sample_grid(images: np.ndarray, labels: Sequence[int], classes: Sequence[str], path: Path,
                columns: int = 8, title: str = "") -> Path:
    """A grid of uint8 (N, C, H, W) images, each titled with its class name."""
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows + (0.4 if title else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes.flat, images, labels):
        picture = image.transpose(1, 2, 0)
        if picture.shape[2] == 1:
            ax.imshow(picture[:, :, 0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(picture)
        ax.set_title(classes[int(label)], fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save(fig, path)


def save(fig, path: Path) -> Path:
    """Save atomically, so a failed plot never leaves a truncated PNG behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path


def augment_grid(originals: np.ndarray, augmented: np.ndarray, labels: Sequence[int], classes: Sequence[str],
                 path: Path, title: str = "") -> Path:
    """One row per image: the original, then each augmented draw (float images in [0, 1])."""
    rows, draws = augmented.shape[:2]
    fig, axes = plt.subplots(rows, draws + 1, figsize=(1.5 * (draws + 1), 1.6 * rows + 0.5), squeeze=False)
    for r in range(rows):
        pictures = [originals[r].astype(np.float32) / 255] + list(augmented[r])
        for col, picture in enumerate(pictures):
            ax = axes[r, col]
            _show(ax, picture)
            if r == 0:
                ax.set_title("original" if col == 0 else f"draw {col}", fontsize=9)
        axes[r, 0].set_ylabel(classes[int(labels[r])], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def _show(ax, image: np.ndarray) -> None:
    """Show a (C, H, W) float image in [0, 1]; keep the axes frame for a row label."""
    picture = np.clip(image.transpose(1, 2, 0), 0, 1)
    if picture.shape[2] == 1:
        ax.imshow(picture[:, :, 0], cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(picture)
    ax.set_xticks([])
    ax.set_yticks([])


def overlay_curves(series: list[tuple[str, list[int], list[float]]], path: Path, title: str,
                   ylabel: str = "validation accuracy (%)") -> Path:
    """One line per (label, epochs, values); runs sharing a label share a color and a legend entry."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors: dict[str, Any] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for label, epochs, values in series:
        first = label not in colors
        colors.setdefault(label, cycle[len(colors) % len(cycle)])
        ax.plot(epochs, values, color=colors[label], label=label if first else None, linewidth=1.6, alpha=0.9)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save(fig, path)
