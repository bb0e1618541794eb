"""The `cifarlab` command: parses arguments, builds a config, calls the library, prints results."""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .errors import CifarlabError, ConfigError, Interrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and study small CNNs on CIFAR-10 and its cousins.")
data_app = typer.Typer(no_args_is_help=True, help="Find, download and look at datasets.")
app.add_typer(data_app, name="data")
viz_app = typer.Typer(no_args_is_help=True, help="Figures of a dataset or a run (PNG).")
app.add_typer(viz_app, name="viz")
config_app = typer.Typer(no_args_is_help=True, help="Show a run's config, or the difference between two.")
app.add_typer(config_app, name="config")
# No markup: user values such as [32, 64] must print as they are.
out = Console(markup=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
state = {"debug": False}

DATASET_HELP = "cifar10 | cifar100 | mnist | fashion-mnist | synthetic"


def user_errors(command):
    """Print a user's mistake as one line and exit 2 (1 for failed training); --debug shows the traceback."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Interrupted as e:
            from .train.distributed import main_process

            if main_process():  # data-parallel ranks stop together: rank 0 says so
                err.print(f"{one_line(str(e))}; state saved, resume with: cifarlab train --resume {e.run_dir}")
            raise typer.Exit(e.exit_code) from None
        except CifarlabError as e:
            if state["debug"]:
                raise
            err.print(Text.assemble(("error: ", "bold red"), one_line(str(e))))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return run


def one_line(message: str) -> str:
    """Every error is one line, whatever a library below put in its message."""
    return " ".join(message.split())


@app.callback()
def main_options(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    state["debug"] = debug


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("pooch", "openTSNE", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def train_and_report(config, resume_run: Optional[Path] = None, overrides: Optional[list[str]] = None,
                     run_dir: Optional[Path] = None) -> Path:
    from . import api
    from .train.distributed import launches, main_process
    from .train.progress import LogProgress, TerminalProgress

    progress = LogProgress() if state.get("quiet") or not sys.stderr.isatty() else TerminalProgress(err)
    if resume_run is not None:
        run = api.resume(resume_run, overrides, progress=progress)
    else:
        run = api.fit(config, run_dir=run_dir, progress=progress)
    if main_process() and not (config is not None and launches(config)):  # the ranks' rank 0 printed it
        print_summary(run.path)
    return run.path


def print_summary(run_dir: Path) -> None:
    from .runs import read_summary

    s = read_summary(run_dir)
    out.print(f"{s['run']}: {s['stop_reason']}")
    table = Table(title="accuracy (best epoch's weights) and training time")
    for column in ("best epoch", "epochs", "train", "val", "test", "time", "img/s", "params"):
        table.add_column(column, justify="right")
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    table.add_row(str(s["best_epoch"]), str(s["epochs_run"]), pct(s["train_acc"]), pct(s["val_acc"]),
                  pct(s["test_acc"]), f"{s['train_time_s']:.1f} s", f"{s['train_img_per_s']:.0f}",
                  f"{s['params']['trainable'] + s['params']['non_trainable']:,}")
    out.print(table)
    out.print(f"run directory: {run_dir}")
    if (run_dir / "report.html").is_file():
        out.print(f"report: {run_dir / 'report.html'}")


@app.command()
@user_errors
def train(
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value settings, e.g. train.epochs=5"),
    config_file: Optional[Path] = typer.Option(None, "-c", "--config", help="YAML config file."),
    resume_run: Optional[Path] = typer.Option(None, "--resume", help="Continue this run from its last.pt."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Write the run here (new or empty folder)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Plain log lines instead of a progress bar."),
    print_config: bool = typer.Option(False, "--print-config", help="Print the resolved config (YAML) and exit."),
) -> None:
    """Train a model; writes a run directory (config, metrics, summary, checkpoints). With
    train.devices=N > 1, starts N data-parallel ranks on this machine and exits with their worst exit code."""
    from .config import config_yaml, load_config
    from .runs import read_run_config, resolve_run
    from .train.distributed import launch, launches

    state["quiet"] = quiet
    if resume_run is not None and config_file is not None:
        raise ConfigError("--resume takes its config from the run; give changes as key=value")
    if print_config:
        config = read_run_config(resolve_run(resume_run), overrides) if resume_run else load_config(config_file, overrides)
        out.print(config_yaml(config), end="")
        return
    setup_logging()
    config = read_run_config(resolve_run(resume_run), overrides) if resume_run else load_config(config_file, overrides or [])
    if launches(config):  # the ranks print the progress, the summary and their errors
        code, _ = launch(config, run_dir=run_dir, resume=resume_run, overrides=overrides or [], quiet=quiet)
        raise typer.Exit(code)
    if resume_run is not None:
        train_and_report(None, resume_run, overrides or [])
        return
    train_and_report(config, run_dir=run_dir)


@app.command()
@user_errors
def demo(
    config_file: Optional[Path] = typer.Option(None, "-c", "--config", help="YAML config for the demo run."),
    cifar10_root: Optional[str] = typer.Option(None, "--cifar10-root", help="A CIFAR-10 folder to use if present."),
    offline: bool = typer.Option(False, "--offline", help="Do not try to download CIFAR-10."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Quick start: train on the best dataset this machine has (CIFAR-10, else Fashion-MNIST, else synthetic)."""
    from .config import load_config
    from .demo import choose_demo_data

    state["quiet"] = quiet
    setup_logging()
    load_config(config_file)  # a bad config fails before any download
    overrides, why = choose_demo_data(cifar10_root, try_download=not offline)
    out.print(f"demo data: {why}")
    train_and_report(load_config(config_file, overrides))


@app.command("eval")
@user_errors
def eval_command(
    run: Path = typer.Argument(..., help="A run directory."),
    split: str = typer.Option("test", "--split", help="test | val | train"),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Also report top-k accuracy."),
) -> None:
    """Accuracy, top-k, per-class accuracy and confusion matrix of a run's best checkpoint (eval_<split>.json)."""
    from .api import evaluate_run

    from .analysis.figures import check_split

    check_split(split)
    report = evaluate_run(run, split, top_k)
    top = next(k for k in report if k.startswith("top") and k.endswith("_acc"))
    out.print(f"{report['run']}: {split} accuracy {100 * report['acc']:.2f}% on {report['images']} images "
              f"(best.pt, epoch {report['epoch']}); {top.removesuffix('_acc')} {100 * report[top]:.2f}%; "
              f"confusion matrix and per-class accuracy in {Path(run) / f'eval_{split}.json'}")
    table = Table()
    table.add_column("class")
    table.add_column("accuracy", justify="right")
    for name, acc in report["per_class_acc"].items():
        table.add_row(name, "-" if acc != acc else f"{100 * acc:.1f}%")
    out.print(table)


@app.command()
@user_errors
def predict(
    run: Path = typer.Argument(..., help="A run directory."),
    images: list[Path] = typer.Argument(..., help="PNG or JPEG files, any size."),
    top_k: int = typer.Option(3, "--top-k", min=1),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Figure path (default RUN/plots/predict.png)."),
) -> None:
    """Class probabilities of images with a run's best model (resized, gray/RGB converted as needed)."""
    from .api import predict_files

    result = predict_files(run, images, top_k, output)
    classes = result["classes"]
    probabilities = result["probabilities"]
    table = Table(title="class probabilities (%)")
    table.add_column("class")
    for name in result["names"]:
        table.add_column(name, justify="right", overflow="fold")
    for index, name in enumerate(classes):
        table.add_row(name, *(f"{100 * probs[index]:.2f}" for probs in probabilities))
    table.add_row("prediction", *(classes[int(probs.argmax())] for probs in probabilities), style="bold")
    out.print(table)
    out.print(f"wrote {result['figure']}")


@app.command()
@user_errors
def report(
    run_dirs: list[Path] = typer.Argument(..., help="One run (its report.html) or several (a comparison)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="HTML path."),
) -> None:
    """Self-contained HTML report of a run (figures, tables, t-SNE), or a comparison of runs."""
    from .analysis.report import build_comparison
    from .api import load_run

    if len(run_dirs) == 1:
        path = load_run(run_dirs[0]).report(output)
    else:
        path = build_comparison(run_dirs, output or Path("comparison.html"))
    out.print(f"wrote {path}")


@app.command()
@user_errors
def summary(
    model: str = typer.Argument(..., help="A preset name (see `cifarlab summary list`) or a config YAML."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value, e.g. model.dropout=0.2"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help=f"Input shape of: {DATASET_HELP}"),
) -> None:
    """Keras-style summary: layers, output shapes, parameters (trainable / non-trainable)."""
    from .config import load_config
    from .data.sources import SHAPES
    from .models.build import build_model, load_preset, preset_names
    from .models.summary import format_summary, summarize

    if model == "list":
        for name in preset_names():
            out.print(f"{name:16s} {load_preset(name).get('description', '')}")
        return
    is_file = model.endswith((".yaml", ".yml")) or Path(model).is_file()
    config = load_config(model if is_file else None, ([] if is_file else [f"model.preset={model}"]) + (overrides or []))
    name = dataset or config.data.dataset
    if name not in SHAPES:
        raise ConfigError(f"--dataset={name}: use one of {DATASET_HELP}")
    shape, classes = SHAPES[name]
    if name == "cifar100" and config.data.labels == "coarse":
        classes = 20
    network = build_model(config.model, shape, classes)
    title = f"{config.model.preset or 'custom'} for {name} ({'x'.join(map(str, shape))}, {classes} classes)"
    out.print(format_summary(summarize(network, shape), title))


def _load(dataset: str, root: Optional[str], download: bool = False):
    from .config import DATASETS
    from .data.sources import load_dataset

    if dataset not in DATASETS:
        raise ConfigError(f"dataset {dataset!r}: use one of {DATASET_HELP}")
    return load_dataset(dataset, root, allow_download=download)


ROOT_OPTION = typer.Option(None, "--root", help="Folder or .tar.gz holding the dataset (default: the cache).")


@data_app.command("download")
@user_errors
def data_download(dataset: str = typer.Argument(..., help="cifar10 | cifar10-binary | cifar100"),
                  url: Optional[str] = typer.Option(None, "--url", help="A mirror of the official archive.")) -> None:
    """Download an official archive into the cache ($CIFARLAB_DATA), checking its md5."""
    from .data.sources import download

    out.print(f"{dataset}: {download(dataset, url=url)}")


@data_app.command("info")
@user_errors
def data_info(dataset: str = typer.Argument(..., help=DATASET_HELP), root: Optional[str] = ROOT_OPTION) -> None:
    """Where a dataset was found, its sizes, image shape and images per class."""
    import numpy as np

    ds = _load(dataset, root)
    out.print(f"{ds.name} from {ds.origin}")
    out.print(f"train {len(ds.y_train)}, test {len(ds.y_test)}, images {'x'.join(map(str, ds.image_shape))} uint8")
    table = Table()
    for column in ("class", "train", "test"):
        table.add_column(column, justify="left" if column == "class" else "right")
    train_counts = np.bincount(ds.y_train, minlength=len(ds.classes))
    test_counts = np.bincount(ds.y_test, minlength=len(ds.classes))
    for i, name in enumerate(ds.classes):
        table.add_row(f"{i} {name}", str(train_counts[i]), str(test_counts[i]))
    out.print(table)


@data_app.command("stats")
@user_errors
def data_stats(dataset: str = typer.Argument(..., help=DATASET_HELP), root: Optional[str] = ROOT_OPTION) -> None:
    """Per-channel mean and std of the training set, in [0, 1] units."""
    from .data.splits import channel_stats

    ds = _load(dataset, root)
    mean, std = channel_stats(ds.x_train)
    out.print(f"{ds.name} training set, {len(ds.y_train)} images")
    out.print("mean: " + ", ".join(f"{m:.4f}" for m in mean))
    out.print("std:  " + ", ".join(f"{s:.4f}" for s in std))


@data_app.command("show")
@user_errors
def data_show(dataset: str = typer.Argument(..., help=DATASET_HELP), root: Optional[str] = ROOT_OPTION,
              output: Optional[Path] = typer.Option(None, "-o", "--output", help="PNG path."),
              count: int = typer.Option(32, "-n", "--count", min=1, max=400),
              seed: int = typer.Option(0, "--seed")) -> None:
    """Write a PNG grid of random training images titled with their class names."""
    import numpy as np

    from .analysis.plots import sample_grid

    ds = _load(dataset, root)
    pick = np.random.default_rng(seed).choice(len(ds.y_train), size=min(count, len(ds.y_train)), replace=False)
    path = sample_grid(ds.x_train[pick], ds.y_train[pick], ds.classes, output or Path(f"{ds.name}-samples.png"),
                       title=f"{ds.name}: {len(pick)} training images")
    out.print(f"wrote {path}")


@app.command()
@user_errors
def sweep(
    study_file: Path = typer.Argument(..., help="A study YAML (see configs/studies/)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value applied to every run, e.g. train.epochs=2"),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", min=1,
                                          help="Runs at a time (local, or local Dask workers; CPU threads are split)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Study directory (default: train.out_dir/NAME)."),
    executor: Optional[str] = typer.Option(None, "--executor", "-e",
                                           help="local | dask | slurm (default: the study's, else local)."),
    address: Optional[str] = typer.Option(None, "--address", help="Join this Dask scheduler (tcp://host:8786)."),
    scheduler_file: Optional[Path] = typer.Option(None, "--scheduler-file", help="Join the Dask scheduler this file names."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the runs (and the Slurm job script) and exit."),
) -> None:
    """Run a study (grid and/or variants x seeds) as separate processes, here or on a Dask cluster;
    skips finished runs, resumes interrupted ones; writes results.csv, results.md, plots/ and report.html."""
    from .api import run_study, study_folder
    from .executors import run_state
    from .sweep import load_study, study_executor

    study = load_study(study_file, overrides or [])
    out_path = study_folder(study, out_dir)
    name, _, count = study_executor(study, executor, workers, address, scheduler_file)  # checks the names first
    if dry_run:
        table = Table(title=f"{study.name}: {len(study.runs)} runs into {out_path}")
        for column in ("run", "settings", "seed", "state"):
            table.add_column(column)
        for run in study.runs:
            state = run_state(out_path / run.id) if (out_path / run.id).exists() else "new"
            table.add_row(run.id, ", ".join(f"{k}={v}" for k, v in run.values.items()), str(run.seed), state)
        out.print(table)
        if name == "slurm":
            from .executors import slurm_job_script

            out.print("Slurm job script (one per worker; the scheduler address is filled in at start):")
            out.print(slurm_job_script(study.slurm), markup=False, highlight=False)
        return
    where = {"local": f"{count} at a time on this machine", "dask": "on Dask", "slurm": "on Slurm through Dask"}[name]
    out.print(f"study {study.name}: {len(study.runs)} runs {where}, into {out_path}")
    result = run_study(study, out=out_path, workers=workers, executor=executor, address=address,
                       scheduler_file=scheduler_file)
    for run_id, what in result.outcome.items():
        out.print(f"  {run_id}: {what}")
    out.print(result.table)
    out.print(f"report: {out_path / 'report.html'}")


@app.command()
@user_errors
def tune(
    study_file: Path = typer.Argument(..., help="A study YAML with a search block (see configs/tune/)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value applied to every trial, e.g. train.epochs=5"),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", min=1, help="Trials in all (default: tune.trials)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0, help="Start no trial after this many seconds."),
    storage: Optional[str] = typer.Option(None, "--storage",
                                          help="Optuna storage URL (default: sqlite in the study folder); "
                                               "e.g. postgresql://user@host/db to share one search between machines."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="Processes on this machine (CPU threads are split)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Study directory (default: train.out_dir/NAME)."),
    worker_index: int = typer.Option(0, "--worker-index", hidden=True),
) -> None:
    """Hyperparameter search on Optuna: trials of the study's search block, pruned on each epoch's
    validation metric; writes results.csv, results.md, best.yaml, plots/ and report.html."""
    from .api import study_folder
    from .sweep import load_study
    from .tuning import run_tune, work

    study = load_study(study_file, overrides or [])
    out_path = study_folder(study, out_dir)
    if worker_index:  # one of the processes that `--workers N` started: trials only
        setup_logging()
        work(study, out_path, trials=trials or 1, timeout=timeout, storage=storage, worker=worker_index,
             overrides=overrides or [])
        return
    setup_logging()
    result = run_tune(study, out_path, trials=trials, timeout=timeout, storage=storage, workers=workers,
                      overrides=overrides or [])
    out.print(result.table)
    out.print(", ".join(f"{n} {state}" for state, n in sorted(result.counts.items())))
    if result.best_config is not None:
        out.print(f"best: trial {result.best_trial}, {result.best_value:.4f} with "
                  + ", ".join(f"{k}={v}" for k, v in result.best_params.items()))
        out.print(f"best config: {result.best_config}  (cifarlab train -c {result.best_config})")
    out.print(f"report: {out_path / 'report.html'}")


def draw_figure(name: str, run: Path, **options) -> list[Path]:
    from .analysis.figures import draw

    paths = draw(name, run, **options)
    for path in paths:
        out.print(f"wrote {path}")
    return paths


@config_app.command("show")
@user_errors
def config_show(run: Path = typer.Argument(..., help="A run directory.")) -> None:
    """A run's resolved config (its config.yaml)."""
    from .config import config_yaml
    from .runs import read_run_config, resolve_run

    out.print(config_yaml(read_run_config(resolve_run(run))), end="")


@config_app.command("diff")
@user_errors
def config_diff_command(first: Path = typer.Argument(..., help="A run directory (or config YAML)."),
                        second: Path = typer.Argument(..., help="Another run directory (or config YAML).")) -> None:
    """The settings that differ between two runs' configs."""
    from .config import config_diff, load_config
    from .runs import CONFIG

    configs = [load_config(p / CONFIG if p.is_dir() else p) for p in (first, second)]
    changed = config_diff(*configs)
    if not changed:
        out.print(f"{first} and {second}: the same settings")
    table = Table(title=f"{len(changed)} setting(s) differ")
    for column in ("key", str(first), str(second)):
        table.add_column(column, overflow="fold")
    for key, a, b in changed:
        table.add_row(key, repr(a), repr(b))
    if changed:
        out.print(table)


@viz_app.command("curves")
@user_errors
def viz_curves(run: Path = typer.Argument(..., help="A run directory.")) -> None:
    """Loss and accuracy per epoch (train / val / test) and the running per-step values."""
    draw_figure("curves", run)


@viz_app.command("samples")
@user_errors
def viz_samples(run: Path = typer.Argument(..., help="A run directory."),
                split: str = typer.Option("train", "--split"), count: int = typer.Option(32, "-n", min=1, max=400),
                seed: int = typer.Option(0, "--seed")) -> None:
    """A grid of a run's images with their class names."""
    from .analysis.figures import check_split

    check_split(split)
    draw_figure("samples", run, split=split, count=count, seed=seed)


@viz_app.command("confusion")
@user_errors
def viz_confusion(run: Path = typer.Argument(..., help="A run directory."),
                  split: str = typer.Option("test", "--split")) -> None:
    """The confusion matrix of best.pt on a split."""
    from .analysis.figures import check_split

    check_split(split)
    draw_figure("confusion", run, split=split)


@viz_app.command("mistakes")
@user_errors
def viz_mistakes(run: Path = typer.Argument(..., help="A run directory."),
                 split: str = typer.Option("test", "--split"), count: int = typer.Option(8, "-n", min=1, max=32),
                 seed: int = typer.Option(0, "--seed")) -> None:
    """A row of correctly and a row of wrongly classified images with true and predicted classes."""
    from .analysis.figures import check_split

    check_split(split)
    draw_figure("mistakes", run, split=split, count=count, seed=seed)


@viz_app.command("featuremaps")
@user_errors
def viz_featuremaps(run: Path = typer.Argument(..., help="A run directory."),
                    image: Optional[Path] = typer.Option(None, "--image", help="A PNG/JPEG (default: a test image)."),
                    index: int = typer.Option(0, "--index", min=0, help="Which test image, without --image."),
                    layers: int = typer.Option(4, "--layers", min=1, help="The first N layers.")) -> None:
    """Feature maps of the first N layers for one image, one grid per layer."""
    from .data.images import read_image
    from .runs import read_summary, resolve_run

    picture = read_image(image, tuple(read_summary(resolve_run(run))["input_shape"])) if image else None
    draw_figure("featuremaps", run, layers=layers, image=picture, index=index)


@viz_app.command("filters")
@user_errors
def viz_filters(run: Path = typer.Argument(..., help="A run directory."),
                layers: int = typer.Option(3, "--layers", min=1, help="The first N conv layers.")) -> None:
    """Convolution kernels: the first layer's as RGB tiles, deeper ones as gray tiles."""
    draw_figure("filters", run, layers=layers)


@viz_app.command("tsne")
@user_errors
def viz_tsne(run: Path = typer.Argument(..., help="A run directory with captured features."),
             recompute: bool = typer.Option(False, "--recompute", help="Embed again even if cached.")) -> None:
    """t-SNE (PCA 50 + openTSNE) of the features captured during training, scored by k-NN accuracy
    and silhouette; one scatter per layer and epoch and a beginning / middle / end panel per layer."""
    import json

    draw_figure("tsne", run, recompute=recompute)
    for row in json.loads((run / "features" / "tsne.json").read_text()):
        out.print(f"{row['layer']} epoch {row['epoch']}: k-NN accuracy {100 * row['knn_acc']:.1f}%, "
                  f"silhouette {row['silhouette']:.3f}")


@viz_app.command("augment")
@user_errors
def viz_augment(
    target: str = typer.Argument(..., help=f"A run directory, or a dataset: {DATASET_HELP}"),
    overrides: Optional[list[str]] = typer.Argument(None, help="augment.* (and data.*) settings, key=value"),
    root: Optional[str] = ROOT_OPTION,
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="PNG path."),
    count: int = typer.Option(4, "-n", "--count", min=1, max=32, help="Images (rows)."),
    draws: int = typer.Option(6, "--draws", min=1, max=16, help="Augmented draws per image (columns)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Write a PNG of a few training images, each under several draws of the augmentation."""
    from .analysis.figures import augment_preview
    from .config import load_config
    from .runs import read_run_config, resolve_run

    settings = list(overrides or [])
    if Path(target).is_dir():
        run = resolve_run(target)
        config = read_run_config(run, settings)
        default_path = run / "plots" / "augment.png"
    else:
        config = load_config(None, [f"data.dataset={target}", *([f"data.root={root}"] if root else []), *settings])
        default_path = Path(f"{target}-augment-{config.augment.preset}.png")
    out.print(f"wrote {augment_preview(config, output or default_path, count, draws, seed)}")


@app.command()
@user_errors
def export(
    run: Path = typer.Argument(..., help="A run directory."),
    fmt: str = typer.Option(..., "--format", "-f", help="onnx | safetensors | torch"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="File path (default RUN/export/model.<ext>)."),
    tta: Optional[str] = typer.Option(None, "--tta", help="flip-shift | flip | none: bake that average into the ONNX graph "
                                      "(default: the run's train.tta)."),
    input_dtype: str = typer.Option("uint8", "--input", help="onnx input: uint8 (0..255) or float (float32 in [0, 1]), "
                                    "NHWC either way."),
) -> None:
    """Export a run's best weights: ONNX (images -> probabilities, normalization inside), safetensors or torch."""
    from .export import export_run

    out.print(f"wrote {export_run(run, fmt, output, tta, input_dtype)}")


def main() -> None:
    from .processes import die_with_parent

    die_with_parent()
    if "WORLD_SIZE" not in os.environ:
        app()
        return
    # One rank of a data-parallel run: leave without Python's teardown. Freeing the gloo process group
    # while the interpreter shuts down can abort the process ("terminate called without an active
    # exception") after the run was written in full.
    try:
        app()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
