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
    """The confusion matrix of the tested weights on a split."""
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


def figure_folder(view: LoadedRun, output: Optional[Path], image: Optional[Path] = None) -> Path:
    """Where a figure's PNGs go: `output`, else RUN/plots/ for the run's own data, else (a photo of
    yours) RUN/plots/featuremaps-STEM/, so the run's own figures are never overwritten."""
    if output is not None:
        return Path(output)
    return view.plot(f"featuremaps-{Path(image).stem}") if image is not None else view.plot("")


def photo_as_given(path: Path, channels: int, longest: int = 512) -> tuple[np.ndarray, tuple[int, int]]:
    """A photo file as uint8 (C, H, W) at its own size (at most `longest` pixels on its long side), and
    that size (width, height)."""
    from PIL import Image

    from ..data.images import decode_image

    with Image.open(path) as opened:
        width, height = opened.size
    scale = min(1.0, longest / max(width, height))
    return decode_image(path, (max(1, round(height * scale)), max(1, round(width * scale))), channels), (width, height)


def featuremaps(view: LoadedRun, layers: Union[int, str] = 4, image: Optional[Path] = None, index: int = 0,
                output: Optional[Path] = None) -> list[Path]:
    """Feature maps for one image (reports 002 and 004), one PNG per layer: the first N layers or the
    named ones (`conv1,pool1`; a dotted path inside a module: `features.3`). Under the keras flavor a conv
    layer's maps are after its activation and the activation is no layer of its own. The image: a PNG /
    JPEG file of yours (shown as given and as resized; its figures go to RUN/plots/featuremaps-STEM/ unless
    `output` names a folder), else test image `index`."""
    from ..data.images import read_image
    from . import plots
    from .layer_outputs import feature_map_layers

    run = view
    given, size = None, None
    if image is not None:
        seen = read_image(Path(image), run.input_shape)  # a file that is no image fails here, by name
        (given, size), label = photo_as_given(Path(image), run.input_shape[0]), Path(image).name
    else:
        images, labels = run.split("test")
        if not 0 <= index < len(labels):
            raise ConfigError(f"--index={index}: the test split has {len(labels)} images (0-{len(labels) - 1})")
        seen, label = images[index], f"test image {index}: {run.classes[int(labels[index])]}"
    flavor = run.config.model.defaults or run.config.defaults
    found = feature_map_layers(run.model, run.normalize(seen[None]), layers, flavor)
    folder = figure_folder(run, output, image)
    paths = [plots.input_image(given, seen, folder / "featuremaps_input.png", label, size)]
    for position, layer in enumerate(found, start=1):
        c, h, w = layer.output.shape
        paths.append(plots.feature_maps(layer.output, folder / f"featuremaps_{position:02d}_{layer.name}.png",
                                        f"{layer.title}: {c} maps of {h}x{w} ({label})"))
    return paths


def filters(view: LoadedRun, layers: Union[int, str] = 3, first: int = 0, last: int = 0,
            output: Optional[Path] = None) -> list[Path]:
    """Kernels of the first N conv layers or of the named ones (`conv1,conv2`): the first layer's as RGB
    tiles, deeper ones as gray (the mean over input channels); all of a layer's kernels (at most 64), or
    its first / last N (report 002 shows the last 8)."""
    from . import plots
    from .layer_outputs import conv_layers, kernel_range

    folder = figure_folder(view, output)
    paths = []
    for name, conv in conv_layers(view.model, layers):
        weights = conv.weight.detach().float().cpu().numpy()
        chosen = kernel_range(len(weights), first, last)
        kind = "RGB" if weights.shape[1] == 3 else "mean over input channels"
        which = f"kernels {chosen.start}-{chosen.stop - 1} of {len(weights)}" if len(chosen) < len(weights) \
            else f"{len(weights)} kernels"
        paths.append(plots.filters(weights, folder / f"filters_{name}.png",
                                   f"{name}: {which}, {weights.shape[2]}x{weights.shape[3]} ({kind})", chosen[:64]))
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
    "confusion": Figure(confusion, "Confusion matrix (test split, tested weights)", options={"split": SPLIT}),
    "mistakes": Figure(mistakes, "Correct (top) and misclassified (bottom) test images", options={
        "split": SPLIT, "count": Option(8, "Images per row.", ("-n", "--count"), 1, 32), "seed": Option(0, "Which images.")}),
    "featuremaps": Figure(featuremaps, "Feature maps", options={
        "image": Option(None, "A PNG / JPEG file (default: a test image); its figures go to "
                              "RUN/plots/featuremaps-STEM/.", kind=Path),
        "index": Option(0, "Which test image, without --image.", (), 0),
        "layers": Option("4", "The first N layers, or names: conv1,pool1 (a dotted path inside a module: "
                              "features.3)."),
        "output": Option(None, "Folder for the PNGs.", ("-o", "--output"), kind=Path)}),
    "filters": Figure(filters, "Filters", options={
        "layers": Option("3", "The first N conv layers, or names: conv1,conv2."),
        "first": Option(0, "Only each layer's first N kernels.", (), 0),
        "last": Option(0, "Only each layer's last N kernels (report 002: 8).", (), 0),
        "output": Option(None, "Folder for the PNGs.", ("-o", "--output"), kind=Path)}),
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
