"""The public Python API of runs: train, resume and read back runs; evaluate, predict, report
(studies and searches: experiments.py).

    import cifarlab
    run = cifarlab.fit("configs/quickstart.yaml", overrides={"train.epochs": 5})
    run.summary["test_acc"]; run.history; run.model(); run.predict(images); run.report()

This module connects training (train/) and analysis (analysis/): `default_callbacks` turns a
config into the list of callbacks a run executes, in a fixed order.
"""

from __future__ import annotations

import base64
import html
import time
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from . import runs
from .analysis import figures
from .analysis.capture import FeatureCapture
from .analysis.metrics import confusion_matrix, per_class_accuracy, top_k_accuracy
from .analysis.report import ReportCallback, build_comparison, build_run_report
from .config import Config, ConfigSource, Overrides, load_config
from .data.downloads import cache_dir
from .data.images import read_image
from .data.local import arrays_dataset, content_checksum, save_npz
from .data.sources import Dataset, check_dataset
from .errors import ConfigError, DataError, WriteError
from .evaluation import predict_logits
from .hooks import Callback
from .models.own import OwnModel, own_settings
from .train import distributed, launch, trainer
from .train.callbacks import (BestCheckpoint, DivergenceStop, EarlyStopping, LastCheckpoint, Lookahead, MetricsLog,
                              NaNGuard, TargetStop, TimeLimit)
from .train.progress import default_progress

PathLike = Union[str, Path]
Progress = Union[bool, Callback, None]
Images = Union[np.ndarray, torch.Tensor, PathLike, Sequence[PathLike]]
Data = Union["Dataset", tuple]  # (x_train, y_train, x_test, y_test[, classes]) or a Dataset


def default_callbacks(config: Config, callbacks: Sequence[Any] = (), progress: Progress = None) -> list[Any]:
    """The callbacks a run executes, in dispatch order: metrics log, loggers, progress, NaN guard, feature
    capture, stopping rules (early stopping, divergence, target, time limit), then `callbacks`
    (yours), then best and last checkpoints (so last.pt holds every callback's state after the
    epoch) and the report. `progress`: True / False / None (a bar in a notebook or on a terminal),
    or a callback of your own."""
    from .train.loggers import build_loggers  # train.loggers: csv, tensorboard, mlflow, wandb

    t = config.train
    chosen: list[Any] = [MetricsLog(), *build_loggers(t.loggers, t.model_dump()),
                         progress if isinstance(progress, Callback) else default_progress(progress), NaNGuard()]
    if config.analysis.tsne.layers:
        chosen.append(FeatureCapture(config.analysis.tsne))
    if t.lookahead.every:
        chosen.append(Lookahead(t.lookahead.every, t.lookahead.decay, t.lookahead.power))
    if t.early_stopping.enabled:
        chosen.append(EarlyStopping(t.early_stopping.monitor, t.early_stopping.patience, t.early_stopping.min_delta))
    if t.divergence.enabled:
        chosen.append(DivergenceStop(t.divergence.warmup, t.divergence.epochs))
    if t.target.metric:
        chosen.append(TargetStop(t.target.metric, t.target.value))
    if t.max_time_s:
        chosen.append(TimeLimit(t.max_time_s))
    chosen += list(callbacks)
    chosen += [BestCheckpoint(t.early_stopping.monitor, t.early_stopping.min_delta, t.tested_weights() == "best"),
               LastCheckpoint()]
    if config.analysis.report:
        chosen.append(ReportCallback())
    return chosen


def fit(config: ConfigSource = None, *, overrides: Overrides = None, callbacks: Sequence[Any] = (),
        run_dir: Optional[PathLike] = None, progress: Progress = None, data: Optional[Data] = None,
        model: Optional[OwnModel] = None) -> "Run":
    """Train a model and return its Run. `config`: a Config, a YAML path or a dict of sections;
    `overrides`: `key.path=value` strings or a dict {"train.epochs": 5}; `callbacks`: objects with
    any of the hooks of cifarlab.Callback; `run_dir`: a new or empty folder (default
    train.out_dir/NAME-TIMESTAMP); `data`: arrays instead of data.dataset, as (x_train, y_train,
    x_test, y_test[, class names]) with uint8 images NHWC or NCHW, or a cifarlab Dataset; `model`: your
    own network instead of model.* (an nn.Module, trained in place, or a class / function called as
    f(input_shape, num_classes), see models/own.py; the run records it as model.module when it can be
    imported again, else as model.given, and loading the run elsewhere then needs `model=`). Raises
    TrainingFailed when the loss becomes NaN, Interrupted on SIGINT / SIGTERM (state saved in
    last.pt; `resume` continues exactly). With train.devices=N > 1 the N ranks run as processes
    (`cifarlab train`), which take no callbacks of yours."""
    resolved = load_config(config, overrides)
    if data is not None:
        resolved = load_config(resolved, {"data.dataset": "npz", "data.root": str(stored_arrays(data))})
    if model is not None:
        tree = resolved.to_dict()
        tree["model"] = {**own_settings(model), "args": resolved.model.args}
        resolved = load_config(tree)
    if launch.launches(resolved):
        refuse_callbacks(callbacks, progress)
        if resolved.model.given:
            raise ConfigError(f"train.devices={resolved.train.devices}: each rank builds the model in its own "
                              f"process, and {resolved.model.given} cannot be imported there; pass a class or "
                              "function from a .py file (or model.module)")
        return Run(launch.launch_checked(resolved, run_dir=Path(run_dir) if run_dir is not None else None,
                                              quiet=progress is False))
    bar = progress if isinstance(progress, Callback) else default_progress(progress)
    with closing_progress(bar):
        path = trainer.fit(resolved, default_callbacks(resolved, callbacks, bar),
                           Path(run_dir) if run_dir is not None else None, model)
    return Run(path, model=model)


def stored_arrays(data: Data) -> Path:
    """Arrays handed to `fit`, checked and kept as a .npz in the cache (named by their checksum), so
    the run can be resumed, evaluated and reported like any other."""
    if not isinstance(data, Dataset) and not (isinstance(data, (tuple, list)) and len(data) in (4, 5)):
        raise DataError(f"data=: a cifarlab Dataset or (x_train, y_train, x_test, y_test[, classes]), "
                        f"got {type(data).__name__}{f' of {len(data)}' if isinstance(data, (tuple, list)) else ''}")
    ds = check_dataset(data if isinstance(data, Dataset) else arrays_dataset(*data))
    path = cache_dir() / "arrays" / f"{content_checksum(ds)[:20]}.npz"
    if not path.is_file():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WriteError(f"{path.parent}: cannot keep the arrays there ({e.strerror or e}); "
                             "set $CIFARLAB_DATA to a writable folder") from None
        save_npz(ds, path)
    return path


def resume(run: Union["Run", PathLike], overrides: Overrides = None, *, callbacks: Sequence[Any] = (),
           progress: Progress = None, model: Optional[OwnModel] = None) -> "Run":
    """Continue a run from its last.pt exactly where it stopped (the end of an epoch, or the step of
    an interrupt). Overrides such as train.epochs=30 train a finished run further. `model`: your own
    network, for a run that recorded it as model.given (default: the one a Run was given)."""
    path = runs.resolve_run(run.path if isinstance(run, Run) else run)
    model = model if model is not None else getattr(run, "given_model", None)
    config = load_config(path / runs.CONFIG, overrides)
    if launch.launches(config):
        refuse_callbacks(callbacks, progress)
        return Run(launch.launch_checked(config, resume=path, overrides=overrides, quiet=progress is False))
    bar = progress if isinstance(progress, Callback) else default_progress(progress)
    with closing_progress(bar):
        return Run(trainer.resume(path, config, default_callbacks(config, callbacks, bar), model), model=model)


def refuse_callbacks(callbacks: Sequence[Any], progress: Progress) -> None:
    """Callbacks (and a progress callback) cannot cross into the ranks' processes."""
    if list(callbacks) or isinstance(progress, Callback):
        raise ConfigError("user callbacks need train.devices=1, or start the ranks yourself with torchrun "
                          "(then rank 0 runs them)")


@contextmanager
def closing_progress(progress: Any) -> Iterator[None]:
    """A progress display is closed however training ends (a terminal bar must not outlive it)."""
    try:
        yield
    finally:
        if hasattr(progress, "close"):
            progress.close()


def load_run(path: Union["Run", PathLike], model: Optional[OwnModel] = None) -> "Run":
    """A run directory written by `fit` (or `cifarlab train`). `model`: your own network, for a run
    whose model was passed in Python and cannot be imported again (model.given)."""
    if isinstance(path, Run) and model is None:
        return path
    return Run(path, model=model if model is not None else getattr(path, "given_model", None))


def evaluate_run(run: Union["Run", PathLike], split: str = "test", top_k: int = 5) -> dict[str, Any]:
    """Accuracy, loss, top-k accuracy, per-class accuracy and the confusion matrix of the weights a run tested
    (best.pt or last.pt: train.test_weights)
    on one split, with the run's own normalization; also written to RUN/eval_<split>.json."""
    loaded = run.loaded if isinstance(run, Run) else runs.LoadedRun(run)
    labels = loaded.split(split)[1]
    result = loaded.evaluate(split)
    predicted = result.predictions.cpu().numpy()
    classes = loaded.classes
    k = min(top_k, len(classes))
    report = {"run": loaded.path.name, "split": split, "checkpoint": loaded.checkpoint_name,
              "epoch": loaded.checkpoint["epoch"], "images": len(labels),
              "loss": result.loss, "acc": result.acc,
              f"top{k}_acc": top_k_accuracy(result.logits.cpu().numpy(), labels, k),
              "per_class_acc": dict(zip(classes, per_class_accuracy(predicted, labels, len(classes)))),
              "classes": classes, "confusion": confusion_matrix(predicted, labels, len(classes)).tolist()}
    runs.write_json(loaded.path / f"eval_{split}.json", report)
    return report


class Run:
    """A run directory: its summary, history and config, its tested model, and what can be done with it.
    In a notebook, a cell that returns a Run shows its summary and curves."""

    def __init__(self, path: PathLike, model: Optional[OwnModel] = None):
        self.path: Path = runs.resolve_run(path)
        self.given_model = model  # your own network passed in Python (see fit), used to rebuild the model

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: PathLike) -> Path:
        """run / "report.html": a path inside the run directory."""
        return self.path / name

    @property
    def summary(self) -> dict[str, Any]:
        """summary.json: status, stop reason, accuracies of the tested epoch, times, sizes."""
        return runs.read_summary(self.path)

    @property
    def history(self) -> list[dict[str, Any]]:
        """One record per epoch (train_loss, train_acc, val_loss, val_acc, lr, time, ...)."""
        return runs.epoch_records(self.path)

    @property
    def metrics(self) -> dict[str, list[Any]]:
        """The history as Keras' History.history has it: a list per metric, one value per epoch
        (run.metrics["val_acc"]; also "epoch", "train_loss", "train_acc", "lr", and test_* when scored)."""
        records = self.history
        keys = [k for k in dict.fromkeys(k for r in records for k in r) if k not in ("kind", "time", "lr_steps")]
        return {key: [r.get(key) for r in records] for key in keys}

    @cached_property
    def config(self) -> Config:
        return runs.read_run_config(self.path)

    @cached_property
    def loaded(self) -> runs.LoadedRun:
        """The run read back: the tested weights' model, the data splits and each split's predictions (each read once)."""
        return runs.LoadedRun(self.path, model=self.given_model)

    @property
    def classes(self) -> list[str]:
        return self.loaded.classes

    def model(self) -> nn.Module:
        """The tested weights (best.pt or last.pt: train.test_weights), built and in eval mode, on the run's device."""
        return self.loaded.model

    def predict(self, images: Images) -> np.ndarray:
        """Class probabilities (N, classes) of images: uint8 arrays (N, C, H, W) or (N, H, W, C), float
        arrays in [0, 1], a single image, or image file paths (any size; resized and converted).
        Uses the run's normalization, precision and test-time augmentation."""
        batch = self.as_batch(images)
        loaded = self.loaded
        size = loaded.config.train.eval_batch_size
        with torch.inference_mode():
            probabilities = [torch.softmax(predict_logits(loaded.model, loaded.normalize(batch[i:i + size]),
                                                          loaded.config.train.precision, loaded.config.train.tta),
                                           dim=1).cpu().numpy()
                             for i in range(0, len(batch), size)]
        return np.concatenate(probabilities) if probabilities else np.zeros((0, len(self.classes)), np.float32)

    def as_batch(self, images: Images) -> np.ndarray:
        """Images as a (N, C, H, W) array in the model's input shape (uint8, or float32 in [0, 1])."""
        shape = self.loaded.input_shape
        if isinstance(images, (str, Path)):
            images = [images]
        if isinstance(images, (list, tuple)) and all(isinstance(p, (str, Path)) for p in images):
            return np.stack([read_image(Path(p), shape) for p in images]) if images else np.zeros((0, *shape), np.uint8)
        if isinstance(images, (list, tuple)):
            images = np.stack([i.cpu().numpy() if isinstance(i, torch.Tensor) else np.asarray(i) for i in images])
        array = images.cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
        if array.ndim == 3:
            array = array[None]
        if array.ndim == 4 and array.shape[1:] != shape and array.shape[1:] == (*shape[1:], shape[0]):
            array = array.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        if array.ndim != 4 or array.shape[1:] != shape:
            raise DataError(f"images of shape {array.shape}: this run's model takes (N, {', '.join(map(str, shape))}) "
                            f"or (N, {shape[1]}, {shape[2]}, {shape[0]})")
        return array if array.dtype == np.uint8 else array.astype(np.float32)

    def evaluate(self, split: str = "test", top_k: int = 5) -> dict[str, Any]:
        """Accuracy, top-k, per-class accuracy and confusion matrix of the tested weights on a split (see evaluate_run)."""
        return evaluate_run(self, split, top_k)

    def figure(self, name: str, **options: Any) -> list[Path]:
        """Draw a registered figure (curves, confusion, mistakes, featuremaps, filters, tsne, samples)
        into RUN/plots/; returns the PNG paths."""
        return figures.draw(name, self.loaded, **options)

    def report(self, output: Optional[PathLike] = None) -> Path:
        """Write report.html (or `output`) with every figure; returns its path. The run's own report.html
        finishes an analysis that was interrupted or failed after training (summary.json: analysis done);
        it is written holding the run's lock (RunInUse while another process writes the run)."""
        if output:
            return build_run_report(self.loaded, Path(output))
        started, steps = time.perf_counter(), {}
        with runs.RunLock(self.path):
            path = build_run_report(self.loaded, timings=steps)
            runs.analysis_done(self.path, time.perf_counter() - started, steps)
        return path

    def _repr_html_(self) -> str:
        s = self.summary
        pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"  # noqa: E731
        rows = [("status", f"{s['status']}: {s['stop_reason']}"), ("model", f"{s.get('model') or 'custom'} on "
                                                                             f"{s['dataset']}"),
                ("tested epoch / epochs", f"{s.get('tested_epoch', s.get('best_epoch', '-'))} ({s.get('test_weights', 'best')}) "
                                          f"/ {s['epochs_run']}"),
                ("train / val / test accuracy", " / ".join(pct(s.get(k)) for k in ("train_acc", "val_acc", "test_acc"))),
                ("training time", f"{s.get('train_time_s') or 0:.1f} s")]
        table = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                        f"{html.escape(str(v))}</td></tr>" for k, v in rows)
        curves = self.path / "plots" / "curves.png"
        if s["status"] == "completed" and not curves.is_file():
            figures.draw("curves", self.path)
        image = (f"<img style='max-width:100%' src='data:image/png;base64,"
                 f"{base64.b64encode(curves.read_bytes()).decode()}'>") if curves.is_file() else ""
        return f"<div><b>{html.escape(self.path.name)}</b><table>{table}</table>{image}</div>"


def predict_files(run: Union[Run, PathLike], paths: Sequence[PathLike], top_k: int = 3,
                  output: Optional[PathLike] = None) -> dict[str, Any]:
    """Class probabilities of image files with a run's tested model, and a figure of the images with
    their top-k classes (default RUN/plots/predict.png)."""
    from .analysis.plots import predictions

    run = load_run(run)
    images = run.as_batch(list(paths))
    probabilities = run.predict(images)
    names = [Path(p).name for p in paths]
    figure = predictions(list(images), names, probabilities, run.classes,
                         Path(output) if output else run.path / "plots" / "predict.png", min(top_k, len(run.classes)))
    return {"names": names, "classes": run.classes, "probabilities": probabilities, "figure": figure}


def run_config(run: Union[Run, PathLike], overrides: Overrides = None) -> Config:
    """A run's resolved config (its config.yaml), with `overrides` on top."""
    return load_config(runs.resolve_run(run.path if isinstance(run, Run) else run) / runs.CONFIG, overrides)


def launches(config: Config) -> bool:
    """Whether running `config` in this process starts data-parallel ranks (train.devices > 1 and
    this process is not a rank already); their rank 0 then reports the run."""
    return launch.launches(config)


def reports_runs() -> bool:
    """Whether this process reports what it trained: not one of the ranks 1..N-1 of a data-parallel run."""
    return distributed.main_process()


def compare_runs(run_dirs: Sequence[PathLike], output: PathLike = "comparison.html") -> Path:
    """One HTML page comparing runs: a sortable table of their summaries and overlaid validation curves."""
    return build_comparison([Path(p) for p in run_dirs], Path(output))
