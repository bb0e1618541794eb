"""The `cifarlab` command: parses arguments, calls the public API (`cifarlab.*`), prints results. It
decides nothing itself; `viz` has one subcommand per entry of the figures registry (cifarlab.FIGURES)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

import cifarlab

from . import cli_studies
from .config import DATASETS, config_diff, config_yaml, load_config
from .console import out, setup_logging, user_errors
from .errors import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train and study small CNNs on CIFAR-10 and its cousins.")
data_app = typer.Typer(no_args_is_help=True, help="Find, download and look at datasets.")
app.add_typer(data_app, name="data")
viz_app = typer.Typer(no_args_is_help=True, help="Figures of a dataset or a run (PNG).")
app.add_typer(viz_app, name="viz")
config_app = typer.Typer(no_args_is_help=True, help="Show a run's config, or the difference between two.")
app.add_typer(config_app, name="config")

DATASET_HELP = " | ".join(DATASETS)
RUN_ARGUMENT = typer.Argument(..., help="A run directory.")
ROOT_OPTION = typer.Option(None, "--root", help="Folder or .tar.gz holding the dataset (default: the cache).")


@app.callback()
def main_options(context: typer.Context,
                 debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    context.obj = {"debug": debug}


def print_summary(run: "cifarlab.Run") -> None:
    s = run.summary
    pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
    out.print(f"{s['run']}: {s['stop_reason']}")
    tested = s.get("tested_epoch", s["best_epoch"])
    which = {"best": "the best epoch's", "last": "the last epoch's"}.get(s.get("test_weights"), "the best epoch's")
    table = Table(title=f"accuracy ({which} weights: epoch {tested}) and training time")
    for column in ("epochs", "train", "val", "test", "time", "img/s", "params"):  # the title names the tested epoch
        table.add_column(column, justify="right")
    table.add_row(str(s["epochs_run"]), pct(s["train_acc"]), pct(s["val_acc"]),
                  pct(s["test_acc"]), f"{s['train_time_s']:.1f} s", f"{s['train_img_per_s']:.0f}",
                  f"{s['params']['trainable'] + s['params']['non_trainable']:,}")
    out.print(table)
    out.print(f"run directory: {run.path}")
    if (run.path / "report.html").is_file():
        out.print(f"report: {run.path / 'report.html'}")


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
    if resume_run is not None and config_file is not None:
        raise ConfigError("--resume takes its config from the run; give changes as key=value")
    overrides = overrides or []
    config = cifarlab.run_config(resume_run, overrides) if resume_run else load_config(config_file, overrides)
    if print_config:
        return out.print(config_yaml(config), end="")
    setup_logging()
    progress = False if quiet else None
    if resume_run is not None:
        run = cifarlab.resume(resume_run, overrides, progress=progress)
    else:
        run = cifarlab.fit(config, run_dir=run_dir, progress=progress)
    if cifarlab.reports_runs() and not cifarlab.launches(config):  # else the ranks' rank 0 printed it
        print_summary(run)


@app.command()
@user_errors
def demo(
    config_file: Optional[Path] = typer.Option(None, "-c", "--config", help="YAML config for the demo run."),
    cifar10_root: Optional[str] = typer.Option(None, "--cifar10-root", help="A CIFAR-10 folder to use if present."),
    offline: bool = typer.Option(False, "--offline", help="Do not try to download CIFAR-10."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Quick start: train on the best dataset this machine has (CIFAR-10, else Fashion-MNIST, else synthetic)."""
    setup_logging()
    load_config(config_file)  # a bad config fails before any download
    overrides, why = cifarlab.choose_demo_data(cifar10_root, try_download=not offline)
    out.print(f"demo data: {why}")
    print_summary(cifarlab.fit(load_config(config_file, overrides), progress=False if quiet else None))


@app.command("eval")
@user_errors
def eval_command(
    run: Path = RUN_ARGUMENT,
    split: str = typer.Option("test", "--split", help="test | val | train"),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Also report top-k accuracy."),
) -> None:
    """Accuracy, top-k, per-class accuracy and confusion matrix of the weights a run tested (eval_<split>.json)."""
    report = cifarlab.evaluate_run(run, split, top_k)
    top = next(k for k in report if k.startswith("top") and k.endswith("_acc"))
    out.print(f"{report['run']}: {split} accuracy {100 * report['acc']:.2f}% on {report['images']} images "
              f"({report['checkpoint']}, epoch {report['epoch']}); {top.removesuffix('_acc')} {100 * report[top]:.2f}%; "
              f"confusion matrix and per-class accuracy in {Path(run) / f'eval_{split}.json'}")
    table = Table("class", "accuracy")
    for name, acc in report["per_class_acc"].items():
        table.add_row(name, "-" if acc != acc else f"{100 * acc:.1f}%")
    out.print(table)


@app.command()
@user_errors
def predict(
    run: Path = RUN_ARGUMENT,
    images: list[Path] = typer.Argument(..., help="PNG or JPEG files, any size."),
    top_k: int = typer.Option(3, "--top-k", min=1),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Figure path (default RUN/plots/predict.png)."),
) -> None:
    """Class probabilities of images with a run's best model (resized, gray/RGB converted as needed)."""
    result = cifarlab.predict_files(run, images, top_k, output)
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
    setup_logging()  # a line as each figure and t-SNE embedding is done
    path = (cifarlab.load_run(run_dirs[0]).report(output) if len(run_dirs) == 1
            else cifarlab.compare_runs(run_dirs, output or "comparison.html"))
    out.print(f"wrote {path}")


@app.command()
@user_errors
def summary(
    model: str = typer.Argument(..., help="A preset name (see `cifarlab summary list`), a config YAML, or your own model "
                                             "(package.module:Factory or file.py:Factory)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key.path=value, e.g. model.dropout=0.2"),
    dataset: Optional[str] = typer.Option(None, "--dataset", help=f"Input shape of: {DATASET_HELP}"),
) -> None:
    """Keras-style summary: layers, output shapes, parameters (trainable / non-trainable)."""
    for name, description in cifarlab.presets() if model == "list" else []:
        out.print(f"{name:16s} {description}")
    if model != "list":
        out.print(cifarlab.model_summary(model, overrides, dataset))


@data_app.command("download")
@user_errors
def data_download(dataset: str = typer.Argument(..., help="cifar10 | cifar10-binary | cifar100"),
                  url: Optional[str] = typer.Option(None, "--url", help="A mirror of the official archive.")) -> None:
    """Download an official archive into the cache ($CIFARLAB_DATA), checking its md5."""
    out.print(f"{dataset}: {cifarlab.download_dataset(dataset, url)}")


@data_app.command("info")
@user_errors
def data_info(dataset: str = typer.Argument(..., help=DATASET_HELP), root: Optional[str] = ROOT_OPTION) -> None:
    """Where a dataset was found, its sizes, image shape and images per class."""
    info = cifarlab.dataset_info(dataset, root)
    out.print(f"{info.name} from {info.origin}")
    out.print(f"train {info.train}, test {info.test}, images {'x'.join(map(str, info.image_shape))} uint8")
    table = Table("class", "train", "test")
    for i, name in enumerate(info.classes):
        table.add_row(f"{i} {name}", str(info.train_counts[i]), str(info.test_counts[i]))
    out.print(table)


@data_app.command("stats")
@user_errors
def data_stats(dataset: str = typer.Argument(..., help=DATASET_HELP), root: Optional[str] = ROOT_OPTION) -> None:
    """Per-channel mean and std of the training set, in [0, 1] units."""
    count, mean, std = cifarlab.dataset_stats(dataset, root)
    out.print(f"{dataset} training set, {count} images")
    out.print("mean: " + ", ".join(f"{m:.4f}" for m in mean))
    out.print("std:  " + ", ".join(f"{s:.4f}" for s in std))


@data_app.command("show")
@user_errors
def data_show(dataset: str = typer.Argument(..., help=DATASET_HELP), root: Optional[str] = ROOT_OPTION,
              output: Optional[Path] = typer.Option(None, "-o", "--output", help="PNG path."),
              count: int = typer.Option(32, "-n", "--count", min=1, max=400),
              seed: int = typer.Option(0, "--seed")) -> None:
    """Write a PNG grid of random training images titled with their class names."""
    out.print(f"wrote {cifarlab.dataset_samples(dataset, root, output, count, seed)}")


@config_app.command("show")
@user_errors
def config_show(run: Path = RUN_ARGUMENT) -> None:
    """A run's resolved config (its config.yaml)."""
    out.print(config_yaml(cifarlab.run_config(run)), end="")


@config_app.command("diff")
@user_errors
def config_diff_command(first: Path = typer.Argument(..., help="A run directory (or config YAML)."),
                        second: Path = typer.Argument(..., help="Another run directory (or config YAML).")) -> None:
    """The settings that differ between two runs' configs."""
    configs = [cifarlab.run_config(p) if p.is_dir() else load_config(p) for p in (first, second)]
    changed = config_diff(*configs)
    if not changed:
        out.print(f"{first} and {second}: the same settings")
        return
    table = Table("key", str(first), str(second), title=f"{len(changed)} setting(s) differ")
    for key, a, b in changed:
        table.add_row(key, repr(a), repr(b))
    out.print(table)


def figure_command(name: str, figure) -> None:
    """`cifarlab viz NAME RUN [options]` for a registered figure: its options become the command's."""

    def command(run: Path, **options) -> None:
        loaded = cifarlab.load_run(run)
        for path in loaded.figure(name, **options):
            out.print(f"wrote {path}")
        for line in figure.notes(loaded.loaded) if figure.notes else []:
            out.print(line)

    parameters = [inspect.Parameter("run", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=RUN_ARGUMENT)]
    for key, option in figure.options.items():
        kind = option.kind or type(option.default)
        parameters.append(inspect.Parameter(
            key, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[kind] if option.default is None else kind,
            default=typer.Option(option.default, *(option.flags or (f"--{key}",)), help=option.help, min=option.min,
                                 max=option.max)))
    command.__signature__ = inspect.Signature(parameters)
    command.__doc__ = figure.draw.__doc__
    viz_app.command(name)(user_errors(command))


for _name, _figure in cifarlab.FIGURES.items():
    figure_command(_name, _figure)


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
    out.print(f"wrote {cifarlab.augment_figure(target, overrides, root, output, count, draws, seed)}")


@app.command()
@user_errors
def export(
    run: Path = RUN_ARGUMENT,
    fmt: str = typer.Option(..., "--format", "-f", help="onnx | safetensors | torch"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="File path (default RUN/export/model.<ext>)."),
    tta: Optional[str] = typer.Option(None, "--tta", help="flip-shift | flip | none: bake that average into the ONNX graph "
                                      "(default: the run's train.tta)."),
    input_dtype: str = typer.Option("uint8", "--input", help="onnx input: uint8 (0..255) or float (float32 in [0, 1]), "
                                    "NHWC either way."),
) -> None:
    """Export the weights a run tested: ONNX (images -> probabilities, normalization inside), safetensors or torch."""
    out.print(f"wrote {cifarlab.export_run(run, fmt, output, tta, input_dtype)}")


app.command()(cli_studies.sweep)
app.command()(cli_studies.tune)
app.add_typer(cli_studies.study_app, name="study")


def main() -> None:
    cifarlab.run_entry_point(app)


if __name__ == "__main__":
    main()
