"""Every figure of a run, in one registry that both `cifarlab viz NAME` and report.html use.

A figure is a function `(view, **options) -> list[Path]` that writes PNGs into RUN/plots/. `view`
is a RunView: the run directory with its summary and config, and (loaded on first use) the best
model and the data splits. Adding a figure is one function and one FIGURES entry.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .. import runs
from ..config import Config
from ..data.augment import augment_examples
from ..data.sources import dataset_from_config
from ..data.splits import channel_stats
from ..errors import ConfigError
from ..evaluation import Evaluation, evaluate
from . import plots
from .capture import activations_of
from .embed import embed_run
from .metrics import confusion_matrix

SPLITS = ("train", "val", "test")


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: use test, val or train")
    return split


class RunView:
    """A run directory as the figures see it. `predictions(split)` scores a split once per view;
    `known` holds a split already scored (training's final test score), so it is not scored again."""

    def __init__(self, path: Path, loaded: Optional[runs.LoadedRun] = None,
                 known: Optional[dict[str, Evaluation]] = None):
        self.path = runs.resolve_run(path)
        self.known = dict(known or {})
        self.found: dict[str, dict[str, Any]] = {}
        if loaded is not None:
            self.loaded = loaded

    @cached_property
    def loaded(self) -> runs.LoadedRun:
        return runs.load_run(self.path)

    @cached_property
    def summary(self) -> dict[str, Any]:
        return runs.read_summary(self.path)

    @cached_property
    def config(self) -> Config:
        return runs.read_run_config(self.path)

    @property
    def classes(self) -> list[str]:
        return self.summary["classes"]

    def plot(self, name: str) -> Path:
        return self.path / "plots" / name

    def predictions(self, split: str) -> dict[str, Any]:
        """{images, labels, predicted, acc} of the best weights on a split."""
        if check_split(split) not in self.found:
            images, labels = self.loaded.split(split)
            result = self.known.get(split) or evaluate(self.loaded.model, self.loaded.loader(split),
                                                       self.loaded.config.train)
            self.found[split] = {"images": images, "labels": labels, "predicted": result.predictions.cpu().numpy(),
                                 "acc": result.acc}
        return self.found[split]


def curves(view: RunView) -> list[Path]:
    """Loss and accuracy per epoch (train / val / test) and the running per-step values."""
    rows = runs.read_jsonl(view.path / runs.METRICS)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    steps = [r for r in rows if r["kind"] == "step"]
    steps_per_epoch = -(-view.summary["sizes"]["train"] // view.config.train.batch_size)
    return [plots.curves(epochs, steps, steps_per_epoch, view.plot("curves.png"),
                         title=f"{view.path.name}: {view.summary['stop_reason']}")]


def samples(view: RunView, split: str = "train", count: int = 32, seed: int = 0) -> list[Path]:
    """A grid of a split's images with their class names."""
    images, labels = view.loaded.split(check_split(split))
    pick = np.random.default_rng(seed).choice(len(labels), size=min(count, len(labels)), replace=False)
    return [plots.sample_grid(images[pick], labels[pick], view.classes, view.plot(f"samples_{split}.png"),
                              title=f"{split} split: {len(pick)} images")]


def confusion(view: RunView, split: str = "test") -> list[Path]:
    """The confusion matrix of the best weights on a split."""
    found = view.predictions(split)
    matrix = confusion_matrix(found["predicted"], found["labels"], len(view.classes))
    return [plots.confusion(matrix, view.classes, view.plot(f"confusion_{split}.png"),
                            title=f"{split} split: accuracy {100 * found['acc']:.2f}% ({len(found['labels'])} images)")]


def mistakes(view: RunView, split: str = "test", count: int = 8, seed: int = 0) -> list[Path]:
    """A row of correctly and a row of wrongly classified images with true and predicted classes."""
    found = view.predictions(split)
    rng = np.random.default_rng(seed)
    right = rng.permutation(np.flatnonzero(found["predicted"] == found["labels"]))[:count]
    wrong = rng.permutation(np.flatnonzero(found["predicted"] != found["labels"]))[:count]
    return [plots.mistakes((found["images"][right], found["labels"][right]),
                           (found["images"][wrong], found["labels"][wrong], found["predicted"][wrong]),
                           view.classes, view.plot(f"mistakes_{split}.png"))]


def featuremaps(view: RunView, layers: int = 4, image: Optional[np.ndarray] = None, index: int = 0) -> list[Path]:
    """Feature maps of the first `layers` layers (reports 002 and 004) for one uint8 (C, H, W)
    image (default: test image `index`), one PNG per layer."""
    run = view.loaded
    if image is None:
        images, labels = run.split("test")
        if not 0 <= index < len(labels):
            raise ConfigError(f"--index={index}: the test split has {len(labels)} images (0-{len(labels) - 1})")
        image, label = images[index], run.classes[int(labels[index])]
    else:
        label = "input image"
    names = [name for name, _ in run.model.named_children()][:layers]
    found = activations_of(run.model, run.normalize(image[None]), names)
    paths = [plots.sample_grid(image[None], [0], [label], view.plot("featuremaps_input.png"), columns=1)]
    for position, name in enumerate(names, start=1):
        activation = found[name]
        if activation.ndim != 3:
            break
        paths.append(plots.feature_maps(activation, view.plot(f"featuremaps_{position:02d}_{name}.png"),
                                        f"{name}: {activation.shape[0]} maps of {activation.shape[1]}x"
                                        f"{activation.shape[2]} for a {label}"))
    return paths


def filters(view: RunView, layers: int = 3) -> list[Path]:
    """Kernels of the first `layers` conv layers: the first as RGB tiles, deeper ones as gray."""
    paths = []
    convs = [(n, m) for n, m in view.loaded.model.named_children() if isinstance(m, torch.nn.Conv2d)][:layers]
    for name, conv in convs:
        weights = conv.weight.detach().float().cpu().numpy()
        kind = "RGB" if weights.shape[1] == 3 else "mean over input channels"
        paths.append(plots.filters(weights, view.plot(f"filters_{name}.png"),
                                   f"{name}: {weights.shape[0]} kernels {weights.shape[2]}x{weights.shape[3]} ({kind})"))
    return paths


def tsne_figure_name(layer: str, epoch: int) -> str:
    return f"tsne_{layer}_epoch{epoch:03d}.png"


def tsne(view: RunView, recompute: bool = False) -> list[Path]:
    """t-SNE of every captured (layer, epoch), titled with its k-NN accuracy and silhouette (scores in
    features/tsne.json): one scatter each, and per layer a beginning / middle / end panel (tsne_LAYER.png)."""
    rows = embed_run(view.path, seed=view.config.seed, recompute=recompute)
    paths, panels = [], {}
    for row in rows:
        title = (f"{row['layer']}, epoch {row['epoch']}: k-NN acc {100 * row['knn_acc']:.1f}%, "
                 f"silhouette {row['silhouette']:.3f}")
        item = (row["embedding"], row["labels"], title)
        paths.append(plots.embedding_panel([item], view.classes, view.plot(tsne_figure_name(row["layer"], row["epoch"])),
                                           f"t-SNE of {row['layer']} ({row['points']} points)"))
        panels.setdefault(row["layer"], []).append(item)
    for layer, items in panels.items():
        chosen = items if len(items) <= 3 else [items[0], items[len(items) // 2], items[-1]]
        paths.append(plots.embedding_panel(chosen, view.classes, view.plot(f"tsne_{layer}.png"),
                                           f"t-SNE of {layer}: beginning, middle and end of training"))
    return paths


def augment_preview(config: Config, path: Path, count: int = 4, draws: int = 6, seed: int = 0) -> Path:
    """`count` training images of the config's dataset, each under `draws` independent draws of its
    augmentation (one row per image). Needs no run: it shows what a config would train on."""
    ds = dataset_from_config(config.data, config.seed)
    pick = np.random.default_rng(seed).choice(len(ds.y_train), size=min(count, len(ds.y_train)), replace=False)
    images = ds.x_train[pick]
    mean = config.data.mean or channel_stats(ds.x_train)[0]  # erased boxes take the mean color, as in training
    augmented = augment_examples(images, config.augment, draws, seed, mean)
    a = config.augment
    affine = a.rotation or a.shear or a.zoom or a.width_shift or a.height_shift
    described = ", ".join(f"{k}={v}" for k, v in a.model_dump().items()
                          if k != "preset" and v not in (0, 0.0, False) and not (k == "crop_fill" and not a.crop)
                          and not (k == "fill_mode" and not affine))
    return plots.augment_grid(images, augmented, ds.y_train[pick], ds.classes, path,
                              title=f"{ds.name}, augment.preset={a.preset}: {described or 'no augmentation'}")


@dataclass
class Figure:
    draw: Callable[..., list[Path]]
    title: str  # the caption in report.html
    report: bool = True  # drawn in report.html (with the run's analysis settings)


FIGURES: dict[str, Figure] = {
    "curves": Figure(curves, "Loss and accuracy"),
    "confusion": Figure(confusion, "Confusion matrix (test split, best weights)"),
    "mistakes": Figure(mistakes, "Correct (top) and misclassified (bottom) test images"),
    "featuremaps": Figure(featuremaps, "Feature maps"),
    "filters": Figure(filters, "Filters"),
    "tsne": Figure(tsne, "Latent space (t-SNE)"),
    "samples": Figure(samples, "Training images", report=False),
}


def draw(name: str, run: Any, **options: Any) -> list[Path]:
    """Draw the registered figure `name` of a run (a path or a RunView) into its plots/ folder."""
    if name not in FIGURES:
        raise ConfigError(f"figure {name!r}: unknown (known: {', '.join(FIGURES)})")
    view = run if isinstance(run, RunView) else RunView(run)
    return FIGURES[name].draw(view, **options)
