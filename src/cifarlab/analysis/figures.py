"""Every figure of a run, in one registry that both `cifarlab viz NAME` and report.html use.

A figure is a function `(run, **options) -> list[Path]` that writes PNGs into RUN/plots/. `run` is
a runs.LoadedRun: the run directory with its summary and config, and (read on first use) the best
model, the data splits and each split's predictions. Adding a figure is one function and one
FIGURES entry; `cifarlab viz NAME` and report.html both come from the table.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

from ..errors import ConfigError

if TYPE_CHECKING:  # the table below is read by `cifarlab --help`: the drawing imports (torch, matplotlib) wait
    import numpy as np

    from ..config import Config
    from ..runs import LoadedRun

def curves(view: LoadedRun) -> list[Path]:
    """Loss and accuracy per epoch (train / val / test) and the running per-step values."""
    from .. import runs
    from . import plots

    rows = runs.read_jsonl(view.path / runs.METRICS)
    epochs = runs.epoch_records(view.path)
    steps = [r for r in rows if r["kind"] == "step"]
    steps_per_epoch = -(-view.summary["sizes"]["train"] // view.config.train.batch_size)
    return [plots.curves(epochs, steps, steps_per_epoch, view.plot("curves.png"),
                         title=f"{view.path.name}: {view.summary['stop_reason']}")]


def samples(view: LoadedRun, split: str = "train", count: int = 32, seed: int = 0) -> list[Path]:
    """A grid of a split's images with their class names."""
    import numpy as np

    from ..runs import check_split
    from . import plots

    images, labels = view.split(check_split(split))
    pick = np.random.default_rng(seed).choice(len(labels), size=min(count, len(labels)), replace=False)
    return [plots.sample_grid(images[pick], labels[pick], view.summary["classes"], view.plot(f"samples_{split}.png"),
                              title=f"{split} split: {len(pick)} images")]


def confusion(view: LoadedRun, split: str = "test") -> list[Path]:
    """The confusion matrix of the best weights on a split."""
    from . import plots
    from .metrics import confusion_matrix

    found = view.predictions(split)
    matrix = confusion_matrix(found["predicted"], found["labels"], len(view.summary["classes"]))
    return [plots.confusion(matrix, view.summary["classes"], view.plot(f"confusion_{split}.png"),
                            title=f"{split} split: accuracy {100 * found['acc']:.2f}% ({len(found['labels'])} images)")]


def mistakes(view: LoadedRun, split: str = "test", count: int = 8, seed: int = 0) -> list[Path]:
    """A row of correctly and a row of wrongly classified images with true and predicted classes."""
    import numpy as np

    from . import plots

    found = view.predictions(split)
    rng = np.random.default_rng(seed)
    right = rng.permutation(np.flatnonzero(found["predicted"] == found["labels"]))[:count]
    wrong = rng.permutation(np.flatnonzero(found["predicted"] != found["labels"]))[:count]
    return [plots.mistakes((found["images"][right], found["labels"][right]),
                           (found["images"][wrong], found["labels"][wrong], found["predicted"][wrong]),
                           view.summary["classes"], view.plot(f"mistakes_{split}.png"))]


def featuremaps(view: LoadedRun, layers: int = 4, image: Union[np.ndarray, Path, None] = None,
                index: int = 0) -> list[Path]:
    """Feature maps of the first `layers` layers (reports 002 and 004) for one image: a uint8 (C, H, W)
    array or a PNG / JPEG file (resized and converted), by default test image `index`; one PNG per layer."""
    from ..data.images import read_image
    from . import plots
    from .capture import activations_of

    run = view
    if isinstance(image, (str, Path)):
        image = read_image(Path(image), run.input_shape)
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


def filters(view: LoadedRun, layers: int = 3) -> list[Path]:
    """Kernels of the first `layers` conv layers: the first as RGB tiles, deeper ones as gray."""
    import torch

    from . import plots

    paths = []
    convs = [(n, m) for n, m in view.model.named_children() if isinstance(m, torch.nn.Conv2d)][:layers]
    for name, conv in convs:
        weights = conv.weight.detach().float().cpu().numpy()
        kind = "RGB" if weights.shape[1] == 3 else "mean over input channels"
        paths.append(plots.filters(weights, view.plot(f"filters_{name}.png"),
                                   f"{name}: {weights.shape[0]} kernels {weights.shape[2]}x{weights.shape[3]} ({kind})"))
    return paths


def tsne_figure_name(layer: str, epoch: int) -> str:
    return f"tsne_{layer}_epoch{epoch:03d}.png"


def tsne(view: LoadedRun, recompute: bool = False) -> list[Path]:
    """t-SNE of every captured (layer, epoch), titled with its k-NN accuracy and silhouette (scores in
    features/tsne.json): one scatter each, and per layer a beginning / middle / end panel (tsne_LAYER.png)."""
    from . import plots
    from .embed import embed_run

    rows = embed_run(view.path, seed=view.config.seed, recompute=recompute)
    classes = view.summary["classes"]
    paths, panels = [], {}
    for row in rows:
        title = (f"{row['layer']}, epoch {row['epoch']}: k-NN acc {100 * row['knn_acc']:.1f}%, "
                 f"silhouette {row['silhouette']:.3f}")
        item = (row["embedding"], row["labels"], title)
        paths.append(plots.embedding_panel([item], classes, view.plot(tsne_figure_name(row["layer"], row["epoch"])),
                                           f"t-SNE of {row['layer']} ({row['points']} points)"))
        panels.setdefault(row["layer"], []).append(item)
    for layer, items in panels.items():
        chosen = items if len(items) <= 3 else [items[0], items[len(items) // 2], items[-1]]
        paths.append(plots.embedding_panel(chosen, classes, view.plot(f"tsne_{layer}.png"),
                                           f"t-SNE of {layer}: beginning, middle and end of training"))
    return paths


def augment_preview(config: Config, path: Path, count: int = 4, draws: int = 6, seed: int = 0) -> Path:
    """`count` training images of the config's dataset, each under `draws` independent draws of its
    augmentation (one row per image). Needs no run: it shows what a config would train on."""
    import numpy as np

    from ..data.augment import augment_examples
    from ..data.sources import dataset_from_config
    from ..data.splits import channel_stats
    from . import plots

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
class Option:
    """An option of a figure: its default and, for `cifarlab viz NAME`, its help, flags and bounds."""

    default: Any
    help: str
    flags: tuple[str, ...] = ()  # command-line flags (default: --NAME)
    min: Optional[int] = None
    max: Optional[int] = None
    kind: Optional[type] = None  # the value's type (default: the default's)


SPLIT = Option("test", "test | val | train")


def tsne_scores(run: LoadedRun) -> list[str]:
    """Lines for the console after `viz tsne`: each embedding's k-NN accuracy and silhouette."""
    rows = json.loads((run.path / "features" / "tsne.json").read_text())
    return [f"{row['layer']} epoch {row['epoch']}: k-NN accuracy {100 * row['knn_acc']:.1f}%, "
            f"silhouette {row['silhouette']:.3f}" for row in rows]


@dataclass
class Figure:
    """A registered figure: the function that draws it, its caption in report.html, whether the report
    draws it, its options (also `cifarlab viz NAME`'s) and what the console prints after it."""

    draw: Callable[..., list[Path]]
    title: str  # the caption in report.html
    report: bool = True  # drawn in report.html (with the run's analysis settings)
    options: dict[str, Option] = field(default_factory=dict)
    notes: Optional[Callable[[LoadedRun], list[str]]] = None


FIGURES: dict[str, Figure] = {
    "curves": Figure(curves, "Loss and accuracy"),
    "confusion": Figure(confusion, "Confusion matrix (test split, best weights)", options={"split": SPLIT}),
    "mistakes": Figure(mistakes, "Correct (top) and misclassified (bottom) test images", options={
        "split": SPLIT, "count": Option(8, "Images per row.", ("-n", "--count"), 1, 32), "seed": Option(0, "Which images.")}),
    "featuremaps": Figure(featuremaps, "Feature maps", options={
        "image": Option(None, "A PNG / JPEG file (default: a test image).", kind=Path),
        "index": Option(0, "Which test image, without --image.", (), 0),
        "layers": Option(4, "The first N layers.", (), 1)}),
    "filters": Figure(filters, "Filters", options={"layers": Option(3, "The first N conv layers.", (), 1)}),
    "tsne": Figure(tsne, "Latent space (t-SNE)", options={"recompute": Option(False, "Embed again even if cached.")},
                   notes=tsne_scores),
    "samples": Figure(samples, "Training images", report=False, options={
        "split": Option("train", "train | val | test"), "count": Option(32, "Images.", ("-n", "--count"), 1, 400),
        "seed": Option(0, "Which images.")}),
}


def draw(name: str, run: Any, **options: Any) -> list[Path]:
    """Draw the registered figure `name` of a run (a path or a LoadedRun) into its plots/ folder."""
    from .. import runs

    if name not in FIGURES:
        raise ConfigError(f"figure {name!r}: unknown (known: {', '.join(FIGURES)})")
    return FIGURES[name].draw(run if isinstance(run, runs.LoadedRun) else runs.LoadedRun(run), **options)
