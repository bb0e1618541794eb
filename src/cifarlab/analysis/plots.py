"""Figures as PNG files. Figures are made outside pyplot (matplotlib.figure.Figure), so drawing
them changes no global state: a notebook's backend and open figures stay as they were."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..errors import WriteError
from ..files import atomic_write


def subplots(nrows: int = 1, ncols: int = 1, figsize=None, **kwargs):
    """(figure, axes) like pyplot.subplots, without pyplot."""
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, **kwargs)


def sample_grid(images: np.ndarray, labels: Sequence[int], classes: Sequence[str], path: Path,
                columns: int = 8, title: str = "") -> Path:
    """A grid of uint8 (N, C, H, W) images, each titled with its class name."""
    n = len(images)
    rows = max(1, -(-n // columns))
    fig, axes = subplots(rows, columns, figsize=(1.6 * columns, 1.8 * rows + (0.4 if title else 0)),
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


def save(fig, path: Path, pdf: bool = False) -> Path:
    """Save atomically, so a failed plot never leaves a truncated PNG behind; `pdf`: also a vector
    PDF beside the PNG (same name, .pdf), for a write-up."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WriteError(f"{path.parent}: cannot make the folder ({e.strerror or e})") from None
    if pdf:
        atomic_write(path.with_suffix(".pdf"), lambda tmp: fig.savefig(tmp, format="pdf", bbox_inches="tight"))
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight" if pdf else None))


def augment_grid(originals: np.ndarray, augmented: np.ndarray, labels: Sequence[int], classes: Sequence[str],
                 path: Path, title: str = "") -> Path:
    """One row per image: the original, then each augmented draw (float images in [0, 1])."""
    rows, draws = augmented.shape[:2]
    fig, axes = subplots(rows, draws + 1, figsize=(1.5 * (draws + 1), 1.6 * rows + 0.5), squeeze=False)
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
    fig, ax = subplots(figsize=(7, 4.2))
    colors: dict[str, Any] = {}
    labels = list(dict.fromkeys(label for label, _, _ in series))
    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"] if len(labels) <= 10 else \
        [matplotlib.colormaps["tab20"](i) for i in range(20)]
    for label, epochs, values in series:
        first = label not in colors
        colors.setdefault(label, cycle[len(colors) % len(cycle)])
        ax.plot(epochs, values, color=colors[label], label=label if first else None, linewidth=1.6, alpha=0.9)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return save(fig, path)


def curves(epochs: list[dict], steps: list[dict], steps_per_epoch: int, path: Path, title: str = "") -> Path:
    """Loss and accuracy per epoch (train / val / test when logged), with the running per-step
    training values as thin lines (x = fractional epoch)."""
    fig, axes = subplots(1, 2, figsize=(11, 4))
    for ax, metric, label in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy (%)")):
        scale = 100 if metric == "acc" else 1
        if steps:
            ax.plot([s["step"] / steps_per_epoch for s in steps], [scale * s[metric] for s in steps],
                    color="#9ecae1", linewidth=0.9, label="train (running, per step)")
        for split, color in (("train", "#1f77b4"), ("val", "#ff7f0e"), ("test", "#2ca02c")):
            key = f"{split}_{metric}"
            points = [(e["epoch"], scale * e[key]) for e in epochs if key in e]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, color=color, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str = "") -> Path:
    """Counts with rows (true class) shaded by their share."""
    n = len(classes)
    size = max(5.0, 0.55 * n + 2)
    fig, ax = subplots(figsize=(size, size * 0.9))
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if shares[i, j] > 0.5 else "black")
        ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def mistakes(correct: tuple[np.ndarray, np.ndarray], wrong: tuple[np.ndarray, np.ndarray, np.ndarray],
             classes: Sequence[str], path: Path) -> Path:
    """Top row: correctly classified images with their class; bottom row: misclassified ones with
    the true and the predicted class (report 004)."""
    columns = max(len(correct[0]), len(wrong[0]), 1)
    fig, axes = subplots(2, columns, figsize=(1.7 * columns, 4.2), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, label in zip(axes[0], *correct):
        _show(ax, image.astype(np.float32) / 255)
        ax.set_title(classes[int(label)], fontsize=8, color="#1a7f37")
    for ax, image, label, guess in zip(axes[1], *wrong):
        _show(ax, image.astype(np.float32) / 255)
        ax.set_title(f"true: {classes[int(label)]}\npred: {classes[int(guess)]}", fontsize=8, color="#b42318")
    axes[0, 0].text(-0.1, 0.5, "correct", transform=axes[0, 0].transAxes, rotation=90, ha="right", va="center")
    axes[1, 0].text(-0.1, 0.5, "wrong", transform=axes[1, 0].transAxes, rotation=90, ha="right", va="center")
    fig.tight_layout()
    return save(fig, path)


def mosaic(tiles: np.ndarray, columns: int = 8, gap: int = 1) -> np.ndarray:
    """(N, h, w) or (N, h, w, 3) tiles in [0, 1] as one image of `columns` per row, NaN between them (drawn
    as the background). One image instead of one axes per tile: a 64-map figure draws in a tenth of the time."""
    count, h, w = tiles.shape[:3]
    columns = min(columns, count)
    rows = -(-count // columns)
    shape = (rows * (h + gap) - gap, columns * (w + gap) - gap, *tiles.shape[3:])
    canvas = np.full(shape, np.nan, dtype=np.float32)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        canvas[r * (h + gap):r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    return canvas


def scaled(tile: np.ndarray) -> np.ndarray:
    """A tile stretched to [0, 1] on its own range (a constant tile is 0)."""
    low, high = float(np.min(tile)), float(np.max(tile))
    return (tile - low) / (high - low) if high > low else np.zeros_like(tile)


def tile_figure(tiles: np.ndarray, labels: Sequence[str], path: Path, title: str, inches: float,
                columns: int = 8, cmap: str = "viridis") -> Path:
    """Tiles (each scaled on its own range) in a grid, each labelled in its top-left corner."""
    repeat = max(1, -(-24 // tiles.shape[1]))  # small kernels (3x3) enlarged, so a 1-pixel gap stays thin
    tiles = np.stack([scaled(t) for t in tiles]).astype(np.float32).repeat(repeat, axis=1).repeat(repeat, axis=2)
    picture = mosaic(tiles, columns)
    count, h, w = tiles.shape[:3]
    columns = min(columns, count)
    rows = -(-count // columns)
    fig, ax = subplots(figsize=(inches * columns, inches * rows + 0.5))
    if picture.ndim == 3:  # RGB: the gaps white
        ax.imshow(np.nan_to_num(picture, nan=1.0), interpolation="nearest")
    else:
        colors = matplotlib.colormaps[cmap].with_extremes(bad="white")
        ax.imshow(np.ma.masked_invalid(picture), cmap=colors, vmin=0, vmax=1, interpolation="nearest")
    for index, label in enumerate(labels):
        r, c = divmod(index, columns)
        ax.text(c * (w + 1) + 0.5, r * (h + 1) + 0.5, label, fontsize=6, color="white", va="top", ha="left",
                bbox={"boxstyle": "square,pad=0.1", "facecolor": "black", "alpha": 0.5, "linewidth": 0})
    ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def feature_maps(activation: np.ndarray, path: Path, title: str, limit: int = 64) -> Path:
    """One tile per channel of a (C, H, W) activation (at most `limit`), each with its own color scale,
    labelled with its channel index."""
    channels = min(len(activation), limit)
    return tile_figure(activation[:channels], [str(i) for i in range(channels)], path, title, 1.3)


def filters(weights: np.ndarray, path: Path, title: str, indices: Sequence[int] = (), limit: int = 64) -> Path:
    """Convolution kernels (O, I, k, k), the ones at `indices` (default: the first `limit`): RGB tiles when
    I == 3 (first layer), else the mean over input channels as gray tiles; each tile scaled to its own
    range and labelled with the kernel's index."""
    chosen = list(indices) or list(range(min(len(weights), limit)))
    tiles = np.stack([weights[i].transpose(1, 2, 0) if weights.shape[1] == 3 else weights[i].mean(axis=0)
                      for i in chosen])
    return tile_figure(tiles, [str(i) for i in chosen], path, title, 1.1, cmap="gray")


def input_image(given: Optional[np.ndarray], seen: np.ndarray, path: Path, label: str,
                size: Optional[tuple[int, int]] = None) -> Path:
    """A photo as given (uint8 (C, H, W); `size`: its own width and height) beside the image the network
    sees (resized), as report 002 shows its photo; a test image of the split alone when `given` is None."""
    pictures = [("as given", given, size), ("as the network sees it", seen, None)] if given is not None \
        else [(label, seen, None)]
    fig, axes = subplots(1, len(pictures), figsize=(2.6 * len(pictures), 2.9), squeeze=False)
    for ax, (caption, image, shown_size) in zip(axes[0], pictures):
        _show(ax, image.astype(np.float32) / 255)
        width, height = shown_size or (image.shape[2], image.shape[1])
        ax.set_title(f"{caption}\n{width}x{height}", fontsize=8)
    if given is not None:
        fig.suptitle(label, fontsize=9)
    fig.tight_layout()
    return save(fig, path)


def embedding_scatter(ax, embedding: np.ndarray, labels: np.ndarray, classes: Sequence[str], title: str,
                      legend: bool = True) -> None:
    cmap = matplotlib.colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for index, name in enumerate(classes):
        chosen = labels == index
        if chosen.any():
            ax.scatter(embedding[chosen, 0], embedding[chosen, 1], s=3, color=cmap(index % cmap.N), label=name,
                       alpha=0.7, linewidths=0)
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend and len(classes) <= 20:
        ax.legend(fontsize=7, markerscale=3, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def embedding_panel(items: list[tuple[np.ndarray, np.ndarray, str]], classes: Sequence[str], path: Path,
                    title: str) -> Path:
    """Side-by-side embeddings (e.g. the first, middle and last epoch of one layer)."""
    fig, axes = subplots(1, len(items), figsize=(4.2 * len(items) + 1.4, 4.4), squeeze=False)
    for index, (ax, (embedding, labels, subtitle)) in enumerate(zip(axes[0], items)):
        embedding_scatter(ax, embedding, labels, classes, subtitle, legend=index == len(items) - 1)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def predictions(images: list[np.ndarray], names: list[str], probabilities: np.ndarray, classes: Sequence[str],
                path: Path, top_k: int = 3) -> Path:
    """Each input image next to a bar chart of its top-k class probabilities."""
    n = len(images)
    fig, axes = subplots(n, 2, figsize=(7, 2.1 * n), squeeze=False, gridspec_kw={"width_ratios": [1, 2]})
    for row, (image, name, probs) in enumerate(zip(images, names, probabilities)):
        _show(axes[row, 0], image.astype(np.float32) / 255)
        axes[row, 0].set_title(name, fontsize=8)
        top = np.argsort(-probs)[:top_k]
        ax = axes[row, 1]
        ax.barh(range(len(top))[::-1], 100 * probs[top], color="#4c78a8")
        ax.set_yticks(range(len(top))[::-1], [classes[i] for i in top], fontsize=8)
        ax.set_xlim(0, 100)
        ax.set_xlabel("probability (%)", fontsize=8)
        for y, p in zip(range(len(top))[::-1], probs[top]):
            ax.text(min(100 * p + 1, 88), y, f"{100 * p:.1f}%", va="center", fontsize=8)
    fig.tight_layout()
    return save(fig, path)


LINE_STYLES = ("-", "--", ":", "-.")


def line_styles(colour_keys: Sequence[str], dash_keys: Sequence[Any]) -> list[tuple[Any, str]]:
    """(colour, line style) per series: a colour per colour key from tab10 (ten colours no one
    confuses; tab20's light / dark pairs are too close), the next line style for every ten keys
    beyond, and a line style per dash key when series also differ in a second setting (an axis
    crossed with variants)."""
    colours = list(dict.fromkeys(colour_keys))
    dashes = list(dict.fromkeys(dash_keys))
    palette = [matplotlib.colormaps["tab10"](i) for i in range(10)]
    chosen = []
    for colour, dash in zip(colour_keys, dash_keys):
        index = colours.index(colour)
        shift = dashes.index(dash) if len(dashes) > 1 else 0
        chosen.append((palette[index % 10], LINE_STYLES[(shift + index // 10) % len(LINE_STYLES)]))
    return chosen


def study_curves(series: list[tuple[str, str, Any, list[dict]]], path: Path, title: str) -> Path:
    """Accuracy and loss per epoch, training and validation, of every run: series are (legend label,
    colour key, dash key, epoch records); runs with the same label (repeats) share a style and one
    legend entry. The legend sits outside the panels. Written as PNG and PDF."""
    fig, axes = subplots(2, 2, figsize=(11, 7.5), sharex=True)
    panels = ((axes[0, 0], "train_acc", "training accuracy (%)", 100), (axes[0, 1], "val_acc", "validation accuracy (%)", 100),
              (axes[1, 0], "train_loss", "training loss", 1), (axes[1, 1], "val_loss", "validation loss", 1))
    styles = line_styles([s[1] for s in series], [s[2] for s in series])
    seen: set[str] = set()
    for (label, _, _, records), (colour, dash) in zip(series, styles):
        first = label not in seen
        seen.add(label)
        for ax, metric, _, scale in panels:
            points = [(r["epoch"], scale * r[metric]) for r in records if r.get(metric) is not None]
            if points:
                ax.plot(*zip(*points), color=colour, linestyle=dash, linewidth=1.5, alpha=0.9,
                        label=label if first and metric == "train_acc" else None)
    for ax, metric, ylabel, _ in panels:
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if not ax.lines:
            ax.text(0.5, 0.5, "not measured (no validation split)" if metric.startswith("val") else "no data",
                    ha="center", va="center", transform=ax.transAxes, color="0.4")
    for ax in axes[1]:
        ax.set_xlabel("epoch")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.78, 0.96))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(0.78, 0.5), fontsize=8,
               frameon=False)
    return save(fig, path, pdf=True)


def bar_chart(labels: Sequence[str], means: Sequence[float], stds: Sequence[Any], references: Sequence[Any],
              path: Path, title: str, ylabel: str) -> Path:
    """One bar per row with its standard deviation as an error bar (when repeated) and the report's
    own value as a black mark (when the study gives one). Written as PNG and PDF."""
    fig, ax = subplots(figsize=(max(5.0, 0.6 * len(labels) + 2), 4.5))
    x = np.arange(len(labels))
    errors = [0 if s is None else s for s in stds]
    bottom, top, decimals = value_axis(means, errors, references)
    ax.bar(x, means, yerr=errors if any(errors) else None, capsize=3, color="#4c72b0", alpha=0.85, label="measured")
    marked = [(i, r) for i, r in enumerate(references) if r is not None]
    if marked:
        ax.scatter([i for i, _ in marked], [r for _, r in marked], marker="_", s=400, color="black", zorder=3,
                   label="report")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    for i, (m, e) in enumerate(zip(means, errors)):
        ax.text(i, m + e + 0.01 * (top - bottom), f"{m:.{decimals}f}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
    if bottom > 0:
        ax.set_ylim(bottom, top)
        ylabel += " (axis from %g)" % bottom
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save(fig, path, pdf=True)


def value_axis(means: Sequence[float], errors: Sequence[float], references: Sequence[Any]) -> tuple[float, float, int]:
    """The value axis of a bar chart: from 0 (bottom 0.0), unless the bars differ by less than a quarter of their
    height (an ablation's 94.2 against 93.7 %), where it starts below the lowest bar so the differences show;
    and the decimals their labels need to tell the bars apart."""
    lows = [m - e for m, e in zip(means, errors)]
    highs = [m + e for m, e in zip(means, errors)] + [r for r in references if r is not None]
    lo, hi = min(lows), max(highs)
    decimals = 2 if hi - lo < 2 else 1
    if lo <= 0 or hi - lo >= 0.25 * hi:
        return 0.0, hi, decimals
    span = max(hi - lo, 0.01 * hi)
    return float(np.floor(lo - span / 2)), hi + span / 4, decimals
