"""Experiment loggers as callbacks: `train.loggers: [csv, tensorboard, mlflow, wandb]`.

    csv          RUN/history.csv: Keras CSVLogger's columns (epoch, then the metric keys sorted), a row per epoch
    tensorboard  RUN/tensorboard/: scalars per epoch, running values per train.log_every steps (steps/), weight
                 histograms every train.histogram_every epochs, the model graph, hparams with the final metrics
    mlflow       an MLflow run (train.mlflow_uri; default a file store in RUN/mlruns): params, metrics, status
    wandb        a W&B run in offline mode (train.wandb_mode) under RUN/wandb/

`LOGGERS` maps each name to a builder `(train settings) -> logger`; config.py takes the allowed names from it.
Every package but the csv logger's is optional (`pip install "cifarlab[loggers]"`); a missing one is a
ConfigError when the callbacks are built, before the run directory exists.

The loggers are callbacks (cifarlab/hooks.py's Callback). This module imports nothing above it:
config.py imports it to validate `train.loggers`.

A logger that keeps a run open (TensorBoard's writers, MLflow, W&B) closes it once: as finished
(on_fit_end), killed (on_interrupt) or failed (on_exception: a NaN loss, a failing hook, a full disk).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..errors import first_line
from ..files import append_line, atomic_write
from ..optional import optional_modules
from ..settings import flat_settings
from ..hooks import Callback, TrainerView


log = logging.getLogger(__name__)

CSV_FILE = "history.csv"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_PARAM_LENGTH = 6000  # MLflow's limit on a param value
FINAL_METRICS = ("test_loss", "test_acc", "best_epoch")  # of summary.json, logged as final/<name> at the end


def scalar_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of an epoch record: its top-level numbers but the epoch (not kind, lr_steps, time)."""
    return {key: value for key, value in record.items()
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool)}


class Logger(Callback):
    """A callback that keeps an experiment open. Subclasses that keep a run open implement
    `close(status)` (status: FINISHED, KILLED or FAILED) and call `opened()` in on_fit_start; the
    run is then closed once: FINISHED by on_fit_end, KILLED by on_interrupt, FAILED by on_exception."""

    is_open = False

    def opened(self) -> None:
        self.is_open = True

    def finish(self, status: str) -> None:
        if self.is_open:
            self.is_open = False
            self.close(status)

    def on_exception(self, trainer: TrainerView, error: BaseException) -> None:
        self.finish("FAILED")

    def close(self, status: str) -> None:
        pass


class CSVLogger(Logger):
    """RUN/history.csv as Keras' CSVLogger writes it: a header of `epoch` and the metric keys sorted
    (fixed at the first epoch; a key missing later is written NA), then a row per epoch. Only scalar
    metrics become columns (not lr_steps or time). Unlike Keras the epoch is the run's own (from 1, as
    in metrics.jsonl). A resumed run rewrites the file from its checkpoint's history first, so the
    rows after the checkpoint's epoch never repeat."""

    def __init__(self, separator: str = ","):
        self.separator = separator
        self.keys: Optional[list[str]] = None

    def path(self, trainer: TrainerView) -> Path:
        return trainer.run_dir / CSV_FILE

    def line(self, values: list[Any]) -> str:
        text = io.StringIO()
        csv.writer(text, delimiter=self.separator, lineterminator="\n").writerow(values)
        return text.getvalue().rstrip("\n")

    def row(self, record: dict[str, Any]) -> str:
        metrics = scalar_metrics(record)
        return self.line([record["epoch"]] + [metrics.get(key, "NA") for key in self.keys])

    def on_fit_start(self, trainer: TrainerView) -> None:
        path = self.path(trainer)
        self.keys = None
        if not trainer.history:
            path.unlink(missing_ok=True)
            return
        self.keys = sorted(scalar_metrics(trainer.history[0]))
        lines = [self.line(["epoch"] + self.keys)] + [self.row(r) for r in trainer.history]
        atomic_write(path, "".join(f"{line}\n" for line in lines))

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        path = self.path(trainer)
        if self.keys is None:
            self.keys = sorted(scalar_metrics(record))
            append_line(path, self.line(["epoch"] + self.keys))
        append_line(path, self.row(record))


class TensorBoardLogger(Logger):
    """RUN/tensorboard/ (open with `tensorboard --logdir RUN/tensorboard`):

    - per epoch (step = epoch): every scalar metric under its metrics.jsonl name (train_loss, train_acc,
      lr, val_loss, val_acc, ...) and time/epoch_s, time/img_per_s;
    - in steps/ (step = optimizer step): running_loss, running_acc and lr every train.log_every steps;
    - histograms of every parameter at epochs 1, 1 + N, 1 + 2N, ... (N = train.histogram_every; 0: never);
    - the model graph once, traced in eval mode on one zero image (a failure is a warning);
    - in hparams/: the flattened config with the final metrics (final/test_loss, final/test_acc, ...).

    A resumed run purges what was logged after its checkpoint (SummaryWriter's purge_step)."""

    def __init__(self, histogram_every: int = 5):
        self.tensorboard = optional_modules({"torch.utils.tensorboard": "tensorboard"}, "train.loggers: tensorboard",
                                            "loggers")["torch.utils.tensorboard"]
        self.histogram_every = histogram_every
        self.writer: Any = None
        self.steps: Any = None
        self.steps_purge: Optional[int] = None

    def folder(self, trainer: TrainerView) -> Path:
        return trainer.run_dir / TENSORBOARD_DIR

    def on_fit_start(self, trainer: TrainerView) -> None:
        self.writer = self.tensorboard.SummaryWriter(str(self.folder(trainer)),
                                                     purge_step=trainer.epoch + 1 if trainer.epoch else None)
        self.steps, self.steps_purge = None, trainer.step + 1 if trainer.step else None
        self.opened()
        if not trainer.resuming:
            self.add_graph(trainer)

    def add_graph(self, trainer: TrainerView) -> None:
        model = trainer.model
        training = model.training
        example = torch.zeros(1, *trainer.input_shape, device=trainer.device)
        if trainer.config.train.channels_last:
            example = example.contiguous(memory_format=torch.channels_last)
        try:
            model.eval()  # no batch-norm statistics change, no dropout draws: training stays bit-exact
            with torch.no_grad(), torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.writer.add_graph(model, example)
        except Exception as e:  # noqa: BLE001 - a model the tracer cannot handle still trains
            log.warning("tensorboard: no model graph (%s: %s)", type(e).__name__, first_line(e))
        finally:
            model.train(training)

    def on_step_end(self, trainer: TrainerView, batch: int, logs: Optional[dict[str, float]]) -> None:
        if logs is None:
            return
        if self.steps is None:
            self.steps = self.tensorboard.SummaryWriter(str(self.folder(trainer) / "steps"), purge_step=self.steps_purge)
        for key, value in logs.items():
            self.steps.add_scalar(key if key == "lr" else f"running_{key}", value, trainer.step)

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        epoch = record["epoch"]
        for key, value in scalar_metrics(record).items():
            self.writer.add_scalar(key, value, epoch)
        for key in ("epoch_s", "img_per_s"):
            if key in record.get("time", {}):
                self.writer.add_scalar(f"time/{key}", record["time"][key], epoch)
        if self.histogram_every and (epoch - 1) % self.histogram_every == 0:
            for name, param in trainer.model.named_parameters():
                self.writer.add_histogram(name, param.detach().float().cpu(), epoch)
        self.writer.flush()
        if self.steps is not None:
            self.steps.flush()

    def on_fit_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        hparams = {key: value if isinstance(value, (bool, int, float, str)) else str(value)
                   for key, value in flat_settings(trainer.config.to_dict()).items()}
        final = {f"final/{key}": summary[key] for key in FINAL_METRICS if summary.get(key) is not None}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.writer.add_hparams(hparams, final, run_name="hparams", global_step=trainer.selected_epoch)
        self.finish("FINISHED")

    def on_interrupt(self, trainer: TrainerView, position: dict[str, Any]) -> None:
        self.finish("KILLED")

    def close(self, status: str) -> None:
        for writer in (self.writer, self.steps):
            if writer is not None:
                writer.close()
        self.writer = self.steps = None


class MLflowLogger(Logger):
    """An MLflow run in experiment <run name> (config `name`, default <preset>-<dataset>), named after the
    run directory, at train.mlflow_uri (default: a file store in RUN/mlruns): the flattened config as
    params, every scalar metric per epoch (step = epoch), the final metrics (final/test_loss, ...), and
    the status FINISHED, KILLED (interrupted) or FAILED. A resumed run continues the same MLflow run.
    MLflow 3 refuses a file: store unless MLFLOW_ALLOW_FILE_STORE=true; for a file: URI this sets it
    in the process environment when it is not set."""

    def __init__(self, uri: Optional[str] = None):
        self.mlflow = optional_modules({"mlflow": "mlflow-skinny"}, "train.loggers: mlflow", "loggers")["mlflow"]
        self.uri = uri
        self.run_id: Optional[str] = None
        self.client: Any = None

    def tracking_uri(self, trainer: TrainerView) -> str:
        return self.uri or (trainer.run_dir / MLFLOW_DIR).resolve().as_uri()

    def on_fit_start(self, trainer: TrainerView) -> None:
        uri = self.tracking_uri(trainer)
        if uri.startswith("file:"):  # MLflow 3 refuses its file store unless asked for it
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = self.mlflow.tracking.MlflowClient(uri)
        if self.run_id is not None and self.find_run(self.run_id):
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.experiment(trainer.config.run_name())
            self.run_id = self.client.create_run(experiment, run_name=trainer.run_dir.name,
                                                 tags={"cifarlab.run_dir": str(trainer.run_dir)}).info.run_id
        self.log_params(trainer)
        self.opened()

    def find_run(self, run_id: str) -> bool:
        try:
            self.client.get_run(run_id)
            return True
        except self.mlflow.exceptions.MlflowException:
            return False

    def experiment(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name)
        except self.mlflow.exceptions.MlflowException:  # another run created it meanwhile
            return self.client.get_experiment_by_name(name).experiment_id

    def log_params(self, trainer: TrainerView) -> None:
        """The config's settings; a resumed run adds new ones and tags the ones it changed (MLflow
        params cannot change) as resumed.<key>."""
        Param, RunTag = self.mlflow.entities.Param, self.mlflow.entities.RunTag
        logged = self.client.get_run(self.run_id).data.params
        params, tags = [], []
        for key, value in flat_settings(trainer.config.to_dict()).items():
            text = str(value)[:MLFLOW_PARAM_LENGTH]
            if key not in logged:
                params.append(Param(key, text))
            elif logged[key] != text:
                tags.append(RunTag(f"resumed.{key}", text))
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])
        if tags:
            self.client.log_batch(self.run_id, tags=tags)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        Metric = self.mlflow.entities.Metric
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now, step)
                                                    for key, value in metrics.items()])

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        self.log_metrics(scalar_metrics(record), record["epoch"])

    def on_fit_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        self.log_metrics({f"final/{key}": summary[key] for key in FINAL_METRICS if summary.get(key) is not None},
                         trainer.selected_epoch or trainer.epoch)
        self.finish("FINISHED")

    def on_interrupt(self, trainer: TrainerView, position: dict[str, Any]) -> None:
        self.finish("KILLED")

    def close(self, status: str) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status)

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")


class WandbLogger(Logger):
    """A W&B run under RUN/wandb/, offline unless train.wandb_mode=online (`wandb sync RUN/wandb/offline-run-*`
    uploads an offline run later): project <run name>, run name = the run directory, the flattened config,
    every scalar metric per epoch (step = epoch, with an `epoch` key), the final metrics in the run summary.
    Finished with exit code 0, or 1 when interrupted or failed. A resumed run continues the same run id."""

    def __init__(self, mode: str = "offline"):
        self.wandb = optional_modules({"wandb": "wandb"}, "train.loggers: wandb", "loggers")["wandb"]
        self.mode = mode
        self.run_id: Optional[str] = None
        self.run: Any = None

    def on_fit_start(self, trainer: TrainerView) -> None:
        wandb, config = self.wandb, trainer.config
        self.run = wandb.init(project=config.run_name(), name=trainer.run_dir.name, id=self.run_id,
                              resume="allow" if self.run_id else None, dir=str(trainer.run_dir), mode=self.mode,
                              config=flat_settings(config.to_dict()), reinit="create_new",
                              settings=wandb.Settings(console="off"))
        self.run_id = self.run.id
        self.opened()

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        self.run.log({**scalar_metrics(record), "epoch": record["epoch"]}, step=record["epoch"])

    def on_fit_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        self.run.summary.update({f"final/{key}": summary[key] for key in FINAL_METRICS if summary.get(key) is not None})
        self.finish("FINISHED")

    def on_interrupt(self, trainer: TrainerView, position: dict[str, Any]) -> None:
        self.finish("KILLED")

    def close(self, status: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "FINISHED" else 1)
            self.run = None

    def state_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_id = state.get("run_id")


# name -> builder(train settings) -> logger; config.py allows exactly these names in train.loggers. A
# builder reads its own settings from the train section's values (histogram_every, mlflow_uri, wandb_mode).
LOGGERS: dict[str, Callable[[dict[str, Any]], Logger]] = {
    "csv": lambda settings: CSVLogger(),
    "tensorboard": lambda settings: TensorBoardLogger(settings["histogram_every"]),
    "mlflow": lambda settings: MLflowLogger(settings["mlflow_uri"]),
    "wandb": lambda settings: WandbLogger(settings["wandb_mode"]),
}


def build_loggers(names: list[str], settings: dict[str, Any]) -> list[Logger]:
    """The loggers `names` (train.loggers), in the order given, built from the train section's
    `settings` (ConfigError when a package is missing)."""
    return [LOGGERS[name](settings) for name in names]
