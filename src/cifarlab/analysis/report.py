"""The figures of a run (plots/*.png), its t-SNE embeddings, and a self-contained report.html;
and a comparison report of several runs."""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import yaml

from .. import runs
from ..errors import ConfigError
from ..models.summary import summarize
from . import plots
from .metrics import confusion_matrix, per_class_accuracy

log = logging.getLogger(__name__)
FEATURE_FILE = re.compile(r"(?P<layer>.+)-epoch(?P<epoch>\d+)\.npy$")


def curves_figure(run_dir: Path) -> Path:
    rows = runs.read_jsonl(run_dir / runs.METRICS)
    epochs = [r for r in rows if r["kind"] == "epoch"]
    steps = [r for r in rows if r["kind"] == "step"]
    summary = runs.read_summary(run_dir)
    config = runs.read_run_config(run_dir)
    steps_per_epoch = -(-summary["sizes"]["train"] // config.train.batch_size)
    return plots.curves(epochs, steps, steps_per_epoch, run_dir / "plots" / "curves.png",
                        title=f"{run_dir.name}: {summary['stop_reason']}")


def predictions_of(run, split: str) -> dict[str, Any]:
    from ..train.trainer import evaluate

    images, labels = run.split(split)
    result = evaluate(run.model, run.loader(split), run.config.train)
    return {"images": images, "labels": labels, "predicted": result["predictions"].numpy(), "acc": result["acc"]}


def confusion_figure(run, split: str = "test", found: Optional[dict] = None) -> Path:
    found = found or predictions_of(run, split)
    matrix = confusion_matrix(found["predicted"], found["labels"], len(run.classes))
    return plots.confusion(matrix, run.classes, run.path / "plots" / f"confusion_{split}.png",
                           title=f"{split} split: accuracy {100 * found['acc']:.2f}% ({len(found['labels'])} images)")


def mistakes_figure(run, split: str = "test", count: int = 8, found: Optional[dict] = None, seed: int = 0) -> Path:
    found = found or predictions_of(run, split)
    rng = np.random.default_rng(seed)
    right = np.flatnonzero(found["predicted"] == found["labels"])
    wrong = np.flatnonzero(found["predicted"] != found["labels"])
    right = rng.permutation(right)[:count]
    wrong = rng.permutation(wrong)[:count]
    return plots.mistakes((found["images"][right], found["labels"][right]),
                          (found["images"][wrong], found["labels"][wrong], found["predicted"][wrong]),
                          run.classes, run.path / "plots" / f"mistakes_{split}.png")


def featuremap_figures(run, layers: int = 4, image: Optional[np.ndarray] = None, index: int = 0) -> list[Path]:
    """Feature maps of the first `layers` layers (reports 002 and 004) for one image (default: the
    first test image), one PNG per layer."""
    from .features import activations_of

    if image is None:
        images, labels = run.split("test")
        image, label = images[index], run.classes[int(labels[index])]
    else:
        label = "input image"
    names = [name for name, _ in run.model.named_children()][:layers]
    found = activations_of(run.model, run.normalize(image[None]), names)
    paths = [plots.sample_grid(image[None], [0], [label], run.path / "plots" / "featuremaps_input.png", columns=1)]
    for position, name in enumerate(names, start=1):
        activation = found[name]
        if activation.ndim != 3:
            break
        paths.append(plots.feature_maps(activation, run.path / "plots" / f"featuremaps_{position:02d}_{name}.png",
                                        f"{name}: {activation.shape[0]} maps of {activation.shape[1]}x"
                                        f"{activation.shape[2]} for a {label}"))
    return paths


def filter_figures(run, limit: int = 3) -> list[Path]:
    """Kernels of the first `limit` conv layers: the first as RGB tiles, deeper ones as gray."""
    paths = []
    convs = [(n, m) for n, m in run.model.named_children() if isinstance(m, torch.nn.Conv2d)][:limit]
    for name, conv in convs:
        weights = conv.weight.detach().float().cpu().numpy()
        kind = "RGB" if weights.shape[1] == 3 else "mean over input channels"
        paths.append(plots.filters(weights, run.path / "plots" / f"filters_{name}.png",
                                   f"{name}: {weights.shape[0]} kernels {weights.shape[2]}x{weights.shape[3]} ({kind})"))
    return paths


def feature_files(run_dir: Path) -> dict[str, dict[int, Path]]:
    """{layer: {epoch: path}} of the features captured during training."""
    found: dict[str, dict[int, Path]] = {}
    for path in sorted((run_dir / "features").glob("*-epoch*.npy")):
        match = FEATURE_FILE.match(path.name)
        if match and not path.name.endswith(".tsne.npy"):
            found.setdefault(match["layer"], {})[int(match["epoch"])] = path
    return found


def tsne_figures(run_dir: Path, classes: list[str], seed: int = 0, recompute: bool = False) -> list[dict[str, Any]]:
    """Embed every captured (layer, epoch), score it, and draw one scatter per (layer, epoch) and one
    first / middle / last panel per layer. Scores go to features/tsne.json."""
    from .embed import separation, tsne

    files = feature_files(run_dir)
    if not files:
        raise ConfigError(f"{run_dir}: no captured features (set analysis.tsne.layers, e.g. [flatten, fc1])")
    labels = np.load(run_dir / "features" / "labels.npy")
    results = []
    for layer, by_epoch in files.items():
        panel = []
        for epoch, path in sorted(by_epoch.items()):
            cached = path.with_name(path.name.replace(".npy", ".tsne.npy"))
            if cached.is_file() and not recompute:
                embedding = np.load(cached)
            else:
                embedding = tsne(np.load(path).astype(np.float32), seed=seed)
                np.save(cached, embedding.astype(np.float32))
            scores = separation(embedding, labels, seed=seed)
            title = (f"{layer}, epoch {epoch}: k-NN acc {100 * scores['knn_acc']:.1f}%, "
                     f"silhouette {scores['silhouette']:.3f}")
            figure = plots.embedding_panel([(embedding, labels, title)], classes,
                                           run_dir / "plots" / f"tsne_{layer}_epoch{epoch:03d}.png",
                                           f"t-SNE of {layer} ({len(labels)} points)")
            results.append({"layer": layer, "epoch": epoch, "points": len(labels), **scores, "figure": figure.name})
            panel.append((embedding, labels, title))
        chosen = panel if len(panel) <= 3 else [panel[0], panel[len(panel) // 2], panel[-1]]
        plots.embedding_panel(chosen, classes, run_dir / "plots" / f"tsne_{layer}.png",
                              f"t-SNE of {layer}: beginning, middle and end of training")
    runs.write_json(run_dir / "features" / "tsne.json", results)
    return results


def inline(path: Path) -> str:
    """A PNG as base64 for a data: URL, so the HTML needs no other file."""
    return base64.b64encode(path.read_bytes()).decode()


def render_html(template: str, path: Path, **context: Any) -> Path:
    """Render a template from analysis/templates to `path` (atomically)."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("cifarlab", "analysis/templates"),
                             autoescape=jinja2.select_autoescape(["html"]))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(env.get_template(template).render(**context))
    os.replace(tmp, path)
    return path


def build_run_report(run_dir: Path, output: Optional[Path] = None) -> Path:
    """All figures of a run and report.html (images inlined; opens from disk, offline)."""
    from ..train.trainer import load_run

    run = load_run(run_dir)
    summary = runs.read_summary(run.path)
    config = run.config
    figures: list[tuple[str, Path]] = [("Loss and accuracy", curves_figure(run.path))]
    found = predictions_of(run, "test")
    figures.append(("Confusion matrix (test split, best weights)", confusion_figure(run, "test", found)))
    figures.append(("Correct (top) and misclassified (bottom) test images", mistakes_figure(run, "test", found=found)))
    per_class = per_class_accuracy(found["predicted"], found["labels"], len(run.classes))
    counts = np.bincount(found["labels"], minlength=len(run.classes))
    featuremaps = featuremap_figures(run, config.analysis.featuremaps) if config.analysis.featuremaps else []
    filters = filter_figures(run)
    tsne_rows: list[dict[str, Any]] = []
    if feature_files(run.path) and config.analysis.tsne.embed:
        tsne_rows = tsne_figures(run.path, run.classes, seed=config.seed)
    layers = summarize(run.model, tuple(run.checkpoint["input_shape"]))
    tsne_panels = sorted({r["layer"] for r in tsne_rows})
    return render_html(
        "run.html", output or run.path / "report.html", run=run.path.name, summary=summary,
        config_text=yaml.safe_dump(config.to_dict(), sort_keys=False),
        figures=[{"title": title, "data": inline(path)} for title, path in figures],
        per_class=[{"name": name, "acc": acc, "count": int(n)} for name, acc, n in zip(run.classes, per_class, counts)],
        layers=layers, featuremaps=[{"title": p.stem.replace("featuremaps_", ""), "data": inline(p)} for p in featuremaps],
        filters=[{"title": p.stem.replace("filters_", ""), "data": inline(p)} for p in filters],
        tsne_rows=tsne_rows,
        tsne_panels=[{"title": layer, "data": inline(run.path / "plots" / f"tsne_{layer}.png")} for layer in tsne_panels],
        env=json.loads((run.path / runs.ENV).read_text()))


def build_comparison(run_dirs: list[Path], output: Path) -> Path:
    """One page comparing runs: a sortable table of their summaries and overlaid curves."""
    rows, series_acc, series_loss = [], [], []
    for run_dir in run_dirs:
        run_dir = runs.resolve_run(run_dir)
        s = runs.read_summary(run_dir)
        config = runs.read_run_config(run_dir)
        rows.append({"run": run_dir.name, "model": config.model.preset or "custom", "optim": config.optim.name,
                     "augment": config.augment.preset, **{k: s.get(k) for k in (
                         "train_acc", "val_acc", "test_acc", "best_epoch", "epochs_run", "train_time_s",
                         "train_img_per_s")}, "stop": s.get("stop_reason", ""), "status": s.get("status", "")})
        epochs = [r for r in runs.read_jsonl(run_dir / runs.METRICS) if r["kind"] == "epoch" and "val_acc" in r]
        series_acc.append((run_dir.name, [r["epoch"] for r in epochs], [100 * r["val_acc"] for r in epochs]))
        series_loss.append((run_dir.name, [r["epoch"] for r in epochs], [r["val_loss"] for r in epochs]))
    output = Path(output)
    folder = output.with_suffix("")
    figures = [plots.overlay_curves(series_acc, folder.with_name(folder.name + "_val_acc.png"),
                                    "validation accuracy"),
               plots.overlay_curves(series_loss, folder.with_name(folder.name + "_val_loss.png"), "validation loss",
                                    ylabel="validation loss")]
    rendered = render_html("compare.html", output, rows=rows,
                           figures=[{"title": p.stem, "data": inline(p)} for p in figures])
    for p in figures:
        p.unlink()
    return rendered
