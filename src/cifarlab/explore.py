"""Looking at data and networks without training: a dataset's sizes and class counts, its channel
statistics, a grid of its images, an official archive downloaded, a preview of an augmentation,
the presets and a Keras-style summary of a network. `cifarlab data ...`, `cifarlab viz augment` and
`cifarlab summary` call these; so can a notebook (`cifarlab.dataset_info("cifar10")`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np

from . import runs
from .analysis.figures import augment_preview
from .analysis.plots import sample_grid
from .config import DATASETS, Overrides, load_config
from .data.dataset import Dataset
from .data.downloads import download
from .data.sources import SHAPES, known_shape, load_dataset
from .data.splits import channel_stats
from .errors import ConfigError
from .models.build import build_model, load_preset, preset_names
from .models.own import OwnModel
from .models.summary import format_summary, summarize

PathLike = Union[str, Path]


def read_dataset(name: str, root: Optional[PathLike] = None, download: bool = False) -> Dataset:
    """A dataset by its data.dataset name, from `root` (a folder or .tar.gz) or the cache."""
    if name not in DATASETS:
        raise ConfigError(f"dataset {name!r}: use one of {' | '.join(DATASETS)}")
    return load_dataset(name, None if root is None else str(root), allow_download=download)


@dataclass
class DatasetInfo:
    """Where a dataset was found, its sizes, image shape and images per class."""

    name: str
    origin: str
    train: int
    test: int
    image_shape: tuple[int, int, int]
    classes: list[str]
    train_counts: list[int]
    test_counts: list[int]


def dataset_info(name: str, root: Optional[PathLike] = None) -> DatasetInfo:
    """Where a dataset was found (`root`, else the cache), its sizes, image shape and images per class."""
    ds = read_dataset(name, root)
    counts = [np.bincount(y, minlength=len(ds.classes)).tolist() for y in (ds.y_train, ds.y_test)]
    return DatasetInfo(ds.name, str(ds.origin), len(ds.y_train), len(ds.y_test), tuple(ds.image_shape),
                       list(ds.classes), *counts)


def dataset_stats(name: str, root: Optional[PathLike] = None) -> tuple[int, list[float], list[float]]:
    """(training images, per-channel mean, per-channel std) of a dataset's training set, in [0, 1] units."""
    ds = read_dataset(name, root)
    mean, std = channel_stats(ds.x_train)
    return len(ds.y_train), list(mean), list(std)


def dataset_samples(name: str, root: Optional[PathLike] = None, output: Optional[PathLike] = None, count: int = 32,
                    seed: int = 0) -> Path:
    """A PNG grid of `count` random training images titled with their class names (default
    NAME-samples.png)."""
    ds = read_dataset(name, root)
    pick = np.random.default_rng(seed).choice(len(ds.y_train), size=min(count, len(ds.y_train)), replace=False)
    return sample_grid(ds.x_train[pick], ds.y_train[pick], ds.classes, Path(output or f"{ds.name}-samples.png"),
                       title=f"{ds.name}: {len(pick)} training images")


def download_dataset(name: str, url: Optional[str] = None) -> Path:
    """Download an official archive (cifar10, cifar10-binary, cifar100) into the cache, md5 checked."""
    return download(name, url=url)


def augment_figure(target: PathLike, overrides: Overrides = None, root: Optional[PathLike] = None,
                   output: Optional[PathLike] = None, count: int = 4, draws: int = 6, seed: int = 0) -> Path:
    """A PNG of `count` training images, each under `draws` draws of the augmentation of a run
    (`target` a run directory; default RUN/plots/augment.png) or of a dataset by name with
    `overrides` (augment.*, data.*; default DATASET-augment-PRESET.png)."""
    settings = list(overrides or [])
    if Path(target).is_dir():
        run = runs.resolve_run(target)
        config = runs.read_run_config(run, settings)
        default = run / "plots" / "augment.png"
    else:
        config = load_config(None, [f"data.dataset={target}", *([f"data.root={root}"] if root else []), *settings])
        default = Path(f"{target}-augment-{config.augment.preset}.png")
    return augment_preview(config, Path(output) if output else default, count, draws, seed)


def presets() -> list[tuple[str, str]]:
    """(name, description) of every model preset."""
    return [(name, load_preset(name).get("description", "")) for name in preset_names()]


class SummaryTable(str):
    """A model summary's text; a notebook cell that returns one shows the table itself."""

    def __repr__(self) -> str:
        return str(self)


def model_summary(model: Union[str, OwnModel], overrides: Optional[list[str]] = None,
                  dataset: Optional[str] = None) -> SummaryTable:
    """Keras' summary (layers, output shapes, parameters trainable / non-trainable) of a preset by
    name, a config file's model, your own model (a "module:Factory" reference, an nn.Module or a
    factory), for the input shape of `dataset` (default: the config's)."""
    given = None if isinstance(model, str) else model
    if given is not None:
        config = load_config(None, overrides)
    elif model.endswith((".yaml", ".yml")) or Path(model).is_file():
        config = load_config(model, overrides)
    else:
        key = "model.module" if ":" in model else "model.preset"
        config = load_config(None, [f"{key}={model}"] + (overrides or []))
    name = dataset or config.data.dataset
    known = known_shape(config.data.model_copy(update={"dataset": name}))
    if known is None:
        raise ConfigError(f"--dataset={name}: use one of {' | '.join(SHAPES)}")
    shape, classes = known
    network = build_model(config.model, shape, classes, given)
    title = (f"{type(network).__name__ if given is not None else config.model.name()} for {name} "
             f"({'x'.join(map(str, shape))}, {classes} classes)")
    return SummaryTable(format_summary(summarize(network, shape), title))


summary = model_summary  # cifarlab.summary(...): Keras' model.summary(), by its name
