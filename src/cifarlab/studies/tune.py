"""Hyperparameter search on Optuna: a study file's `search` block (ranges and choices over any
config key) and `tune` block (metric, sampler, pruner, trials), run as ordinary runs.

    search:
      optim.lr: {float: [1.0e-4, 1.0e-1], log: true}
      model.dropout: {float: [0.0, 0.5], step: 0.1}
      train.batch_size: {choice: [32, 64, 128]}
      train.epochs: {int: [5, 20]}
    tune: {metric: val_acc, sampler: tpe, pruner: median, trials: 20}

Every trial is a run folder trial-NNNN in the study folder; the pruner sees each epoch's value of the
metric (a validation metric: the test split never chooses). The Optuna study lives in a storage
(SQLite inside the study folder by default, or any SQLAlchemy URL such as PostgreSQL), so that
several processes, on one machine or many, run the same command and share one search.

A trial is trained by the `fit` its caller passes in (the public API's `fit`: the config's default
callbacks plus the pruning callback), so this module never imports the API above it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from .. import processes, runs
from ..config import Config, write_config
from ..errors import CifarlabError, ConfigError
from .reach import connect_timeout
from .results import COLUMNS, write_report, write_results
from .space import check_search, finite_number, trial_config
from .spec import Study, value_text

log = logging.getLogger(__name__)
TUNE_KEYS = {"metric", "direction", "sampler", "pruner", "trials", "timeout", "startup_trials", "warmup_epochs",
             "enqueue", "seed"}
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "halving", "none")


def _optuna():
    try:
        import optuna
    except ImportError:
        raise ConfigError("cifarlab tune needs the cluster extra: pip install 'cifarlab[cluster]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


class Fit(Protocol):
    """How a trial is trained: a run of `config` in `run_dir` with the config's default callbacks and
    `callbacks` (the pruning one) after them; what it returns is not used (the run folder is read)."""

    def __call__(self, config: Config, *, run_dir: Path, callbacks: Sequence[Any], progress: bool) -> Any: ...


@dataclass
class Settings:
    """The `tune` block with its defaults."""

    metric: str = "val_acc"
    direction: str = "maximize"
    sampler: str = "tpe"
    pruner: str = "median"
    trials: int = 20
    timeout: Optional[float] = None
    startup_trials: int = 5  # trials before the pruner (and TPE) start judging
    warmup_epochs: int = 0  # epochs of a trial the pruner never stops
    enqueue: tuple = ()  # settings of the first trials, e.g. the recipe's own
    seed: Optional[int] = None


def tune_settings(study: Study) -> Settings:
    spec, where = study.tune, study.path
    unknown = set(spec) - TUNE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown tune key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(TUNE_KEYS))})")
    metric = spec.get("metric", "val_acc")
    if not isinstance(metric, str) or not metric.startswith(("val_", "train_")):
        raise ConfigError(f"{where}: tune.metric must be a validation or training metric (val_acc, val_loss, ...), "
                          f"not {metric!r}: the test split never chooses")
    settings = Settings(metric=metric, direction=spec.get("direction", "minimize" if metric.endswith("loss") else "maximize"),
                        **{k: spec[k] for k in ("sampler", "pruner", "trials", "timeout", "startup_trials",
                                                "warmup_epochs", "seed") if k in spec},
                        enqueue=tuple(spec.get("enqueue") or ()))
    for key, allowed in (("direction", ("maximize", "minimize")), ("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if getattr(settings, key) not in allowed:
            raise ConfigError(f"{where}: tune.{key} is {getattr(settings, key)!r}; choose from: {', '.join(allowed)}")
    for key, least in (("trials", 1), ("startup_trials", 0), ("warmup_epochs", 0)):
        value = getattr(settings, key)
        if finite_number(value, integer=True) is None or value < least:
            raise ConfigError(f"{where}: tune.{key} must be an integer >= {least}, got {value!r}")
    if settings.seed is not None and finite_number(settings.seed, integer=True) is None:
        raise ConfigError(f"{where}: tune.seed must be an integer, got {settings.seed!r}")
    if settings.timeout is not None and (finite_number(settings.timeout) is None or float(settings.timeout) <= 0):
        raise ConfigError(f"{where}: tune.timeout must be a number of seconds > 0, got {settings.timeout!r}")
    settings.timeout = float(settings.timeout) if settings.timeout is not None else None
    return settings


def suggest(trial, search: dict[str, dict[str, Any]]) -> dict[str, Any]:
    values = {}
    for key, spec in search.items():
        if "choice" in spec:
            values[key] = trial.suggest_categorical(key, spec["choice"])
        elif "int" in spec:
            low, high = spec["int"]
            values[key] = trial.suggest_int(key, low, high, step=spec.get("step", 1), log=spec["log"])
        else:
            low, high = spec["float"]
            values[key] = trial.suggest_float(key, low, high, step=spec.get("step"), log=spec["log"])
    return values


class Pruning:
    """A callback that reports each epoch's metric to the Optuna trial and stops the run when the
    pruner says so."""

    def __init__(self, trial, metric: str):
        self.trial, self.metric = trial, metric
        self.pruned_at: Optional[int] = None

    def on_epoch_end(self, trainer, record: dict[str, Any]) -> None:
        if self.metric not in record:
            raise ConfigError(f"tune.metric {self.metric!r} is not measured (the epoch has: "
                              f"{', '.join(k for k in record if k.startswith(('train_', 'val_')))})")
        self.trial.report(record[self.metric], record["epoch"])
        if self.trial.should_prune():
            self.pruned_at = record["epoch"]
            trainer.stop(f"pruned by optuna at epoch {record['epoch']}")


def storage_url(out: Path, storage: Optional[str]) -> str:
    return storage or f"sqlite:///{(out / 'optuna.db').resolve()}"


def open_study(study: Study, settings: Settings, out: Path, storage: Optional[str], worker: int = 0):
    """The Optuna study (created by the first process, joined by the others)."""
    optuna = _optuna()
    url = storage_url(out, storage)
    engine: dict[str, Any] = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("postgresql") and "connect_timeout" not in url:  # a server that does not answer: bounded wait
        engine["connect_args"] = {"connect_timeout": max(2, math.ceil(connect_timeout()))}  # libpq: whole seconds, >= 2
    try:
        backend = optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as e:  # noqa: BLE001 - a wrong URL, an unreachable server, a missing driver
        raise ConfigError(f"--storage {url}: cannot open the Optuna storage ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})") from None
    seed = settings.seed if settings.seed is not None else study.runs[0].config.seed
    sampler = (optuna.samplers.TPESampler(seed=seed + worker, n_startup_trials=settings.startup_trials)
               if settings.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed + worker))
    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials,
                                                            n_warmup_steps=settings.warmup_epochs),
              "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
              "none": lambda: optuna.pruners.NopPruner()}[settings.pruner]()
    opened = optuna.create_study(study_name=study.name, storage=backend, direction=settings.direction,
                                 sampler=sampler, pruner=pruner, load_if_exists=True)
    if worker == 0 and settings.enqueue and not opened.trials:
        for values in settings.enqueue:
            opened.enqueue_trial(values, skip_if_exists=True)
    return opened


def trial_folder(out: Path, number: int) -> Path:
    return out / f"trial-{number:04d}"


def work(study: Study, out: Path, fit: Fit, *, trials: int, timeout: Optional[float], storage: Optional[str],
         worker: int = 0, overrides: Optional[list[str]] = None) -> int:
    """One worker's loop: ask for a trial, train it with `fit`, tell the result, until the study has
    `trials` trials or `timeout` seconds have passed. Returns how many trials this worker ran."""
    optuna = _optuna()
    settings = tune_settings(study)
    search = check_search(study)
    opened = open_study(study, settings, out, storage, worker)
    if worker:  # the first process waits for this one before it asks for trials (see run_search)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "logs" / f"worker-{worker}.ready").touch()
    deadline = time.monotonic() + timeout if timeout else None
    ran = 0
    started = tuple(s for s in optuna.trial.TrialState if s != optuna.trial.TrialState.WAITING)  # enqueued ones wait
    while len(opened.get_trials(deepcopy=False, states=started)) < trials and \
            (deadline is None or time.monotonic() < deadline):
        trial = opened.ask()
        try:
            values = suggest(trial, search)
        except Exception as e:  # noqa: BLE001 - check_search should have refused it; the trial must not stay RUNNING
            opened.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise ConfigError(f"{study.path}: Optuna refused the search block ({type(e).__name__}: {e})") from None
        folder = trial_folder(out, trial.number)
        trial.set_user_attr("run", folder.name)
        trial.set_user_attr("worker", worker)
        pruning = Pruning(trial, settings.metric)
        try:
            fit(trial_config(study, values, overrides), run_dir=folder, callbacks=[pruning], progress=False)
        except CifarlabError as e:  # diverged, a bad value combination: this trial failed, the search goes on
            log.warning("trial %d failed: %s", trial.number, e)
            trial.set_user_attr("error", str(e).splitlines()[0] if str(e) else type(e).__name__)
            opened.tell(trial, state=optuna.trial.TrialState.FAIL)
            ran += 1
            continue
        summary = runs.read_summary(folder)
        if pruning.pruned_at is not None:
            opened.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:
            opened.tell(trial, summary[settings.metric])
        ran += 1
    return ran


WORKER_START_S = 120.0  # how long the first process waits for the others to open the study


def wait_until_ready(helpers: list, out: Path, limit_s: float = WORKER_START_S) -> None:
    """Wait until every other worker process opened the study (or ended, or `limit_s` passed), so that
    all ask for their first trial together: otherwise the first process, already running, may take
    every trial of a short search before the others have imported torch."""
    deadline = time.monotonic() + limit_s
    for index, helper in enumerate(helpers, start=1):
        ready = out / "logs" / f"worker-{index}.ready"
        while not ready.exists() and helper.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)


@dataclass
class TuneResult:
    """What `cifarlab tune` leaves: the study folder, the best trial, its settings and config."""

    path: Path
    best_trial: Optional[int]
    best_value: Optional[float]
    best_params: dict[str, Any]
    best_config: Optional[Path]  # best.yaml: the base config with the best settings, ready to train
    counts: dict[str, int]  # trial state -> count

    @property
    def table(self) -> str:
        return (self.path / "results.md").read_text()


def run_search(study: Study, out: Path, fit: Fit, *, trials: Optional[int] = None, timeout: Optional[float] = None,
               storage: Optional[str] = None, workers: int = 1, overrides: Optional[list[str]] = None) -> TuneResult:
    """Run the search with `workers` processes on this machine (this one, training its trials with
    `fit`, and workers - 1 more), then write results.csv, results.md, best.yaml, plots/ and report.html."""
    settings = tune_settings(study)
    check_search(study)
    trials = trials or settings.trials
    timeout = timeout if timeout is not None else settings.timeout
    url = storage_url(out, storage)
    if storage is None:  # SQLite in the study folder; a server's storage is reached before the folder is made
        out.mkdir(parents=True, exist_ok=True)
    open_study(study, settings, out, url)  # created (and its first trials enqueued) before any worker joins
    out.mkdir(parents=True, exist_ok=True)
    # the study's runs carry the overrides: a train.threads given there is kept
    given = [] if study.runs[0].config.train.threads else [f"train.threads={processes.cores_per(workers)}"]
    helpers = []
    for index in range(1, workers):
        command = [sys.executable, "-m", "cifarlab.cli", "tune", str(study.path), *(overrides or []), *given,
                   "--trials", str(trials), "--storage", url, "--out", str(out), "--worker-index", str(index)]
        if timeout:
            command += ["--timeout", str(timeout)]
        (out / "logs").mkdir(exist_ok=True)
        helpers.append(processes.start(command, dict(os.environ), open(out / "logs" / f"worker-{index}.log", "a")))
    try:
        wait_until_ready(helpers, out)
        work(study, out, fit, trials=trials, timeout=timeout, storage=url, overrides=[*(overrides or []), *given])
        for helper in helpers:
            helper.wait()
    except BaseException:
        for helper in helpers:
            processes.stop(helper)
        raise
    return summarize_tune(study, out, url)


def summarize_tune(study: Study, out: Path, storage: Optional[str] = None) -> TuneResult:
    """results.csv, results.md, best.yaml, plots/ and report.html from the study's trials so far."""
    optuna = _optuna()
    settings = tune_settings(study)
    opened = optuna.load_study(study_name=study.name, storage=storage_url(out, storage))
    finished = opened.get_trials(deepcopy=False)
    rows = [trial_row(t, out) for t in finished]
    counts: dict[str, int] = {}
    for t in finished:
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    complete = [t for t in finished if t.state == optuna.trial.TrialState.COMPLETE]
    best = opened.best_trial if complete else None
    best_config = None
    if best is not None:  # the best trial's own config (overrides included), without the workers' thread split
        best_config = out / "best.yaml"
        config = runs.read_run_config(trial_folder(out, best.number))
        config.train.threads = study.runs[0].config.train.threads
        write_config(config, best_config)
    description = (f"{study.description.strip()} Optuna search: {settings.sampler} sampler, {settings.pruner} pruner, "
                   f"{settings.direction} {settings.metric}; "
                   + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
                   + (f". Best: trial {best.number}, {settings.metric} {best.value:.4f} (best.yaml)." if best else "."))
    shown = Study(study.name, description, study.runs, list(study.search), study.reference, study.path)
    write_results(shown, out, rows)
    figures = tune_figures(opened, settings, out) if rows else []
    write_report(shown, out, rows, figures, counts=f"{len(rows)} trials")
    return TuneResult(out, best.number if best else None, best.value if best else None, dict(best.params) if best else {},
                      best_config, counts)


def trial_row(trial, out: Path) -> dict[str, Any]:
    """A trial as a row of the study table: its settings, state and the run's figures."""
    folder = trial_folder(out, trial.number)
    summary = runs.read_summary(folder) if (folder / runs.SUMMARY).is_file() else {}
    state = trial.state.name.lower()
    if state == "pruned":
        status = f"pruned at epoch {summary.get('epochs_run', '?')}"
    elif state == "fail":
        status = f"failed: {trial.user_attrs.get('error') or summary.get('stop_reason', 'no summary')}"
    else:
        status = "completed" if state == "complete" else state
    row: dict[str, Any] = {"variant": f"trial {trial.number}",
                           **{k: f"{v:.4g}" if isinstance(v, float) else value_text(v) for k, v in trial.params.items()},
                           "runs": 1, "completed": int(state == "complete"), "status": status}
    for key in COLUMNS:
        row[key] = summary.get(key) if summary.get("status") == "completed" else None
    row["stop_reason"] = (summary.get("stop_reason") or "").split(":")[0]
    params = summary.get("params")
    row["params"] = params["trainable"] + params["non_trainable"] if params else None
    row["ids"] = [folder.name]
    return row


def tune_figures(opened, settings: Settings, out: Path) -> list[Path]:
    """Optuna's optimization history (each trial's value, the best so far, pruned trials at their
    last reported value) and parameter importances."""
    optuna = _optuna()
    from ..analysis.plots import save, subplots

    paths = []
    fig, ax = subplots(figsize=(7, 4))
    done = [t for t in opened.trials if t.state == optuna.trial.TrialState.COMPLETE]
    pruned = [t for t in opened.trials if t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values]
    scale = 100 if settings.metric.endswith("acc") else 1
    if done:
        ax.scatter([t.number for t in done], [scale * t.value for t in done], s=22, label="complete", zorder=3)
        better = max if settings.direction == "maximize" else min
        best, so_far = None, []
        for t in done:
            best = t.value if best is None else better(best, t.value)
            so_far.append(scale * best)
        ax.step([t.number for t in done], so_far, where="post", color="C3", label="best so far")
    if pruned:
        ax.scatter([t.number for t in pruned], [scale * t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                   s=22, marker="x", color="0.5", label="pruned (last epoch reported)", zorder=3)
    ax.set_xlabel("trial")
    ax.set_ylabel(settings.metric + (" (%)" if scale == 100 else ""))
    ax.set_title(f"optimization history: {settings.metric}", fontsize=10)
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(save(fig, out / "plots" / "optimization_history.png"))
    if len(done) >= 2:
        try:
            importances = optuna.importance.get_param_importances(opened)
        except (RuntimeError, ValueError) as e:  # e.g. every trial had the same settings
            log.warning("no parameter importances: %s", e)
            importances = {}
        if importances:
            fig, ax = subplots(figsize=(7, 0.5 + 0.45 * len(importances)))
            names = list(importances)[::-1]
            ax.barh(names, [importances[n] for n in names], color="C0")
            ax.set_xlabel(f"importance for {settings.metric} (Optuna, {len(done)} complete trials)")
            ax.set_title("hyperparameter importances", fontsize=10)
            ax.grid(alpha=0.3, axis="x")
            fig.tight_layout()
            paths.append(save(fig, out / "plots" / "param_importances.png"))
    return paths
