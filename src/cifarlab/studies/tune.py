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

import contextlib
import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, Sequence

from .. import runs
from ..config import Config, write_config
from ..errors import CifarlabError, ConfigError, Interrupted, first_line
from .reach import connect_timeout
from .results import COLUMNS, write_report, write_results
from .space import check_search, finite_number, trial_config
from .spec import Study, value_text

log = logging.getLogger(__name__)
TUNE_KEYS = {"metric", "direction", "sampler", "pruner", "trials", "timeout", "startup_trials", "warmup_epochs",
             "enqueue", "seed", "heartbeat"}
RETRIES = 2  # times a trial whose worker died (no heartbeat for 2 x tune.heartbeat s) or was stopped is tried again
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
    heartbeat: int = 60  # seconds between a running trial's heartbeats; silent for twice that: failed and retried


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
                                                "warmup_epochs", "seed", "heartbeat") if k in spec},
                        enqueue=tuple(spec.get("enqueue") or ()))
    for key, allowed in (("direction", ("maximize", "minimize")), ("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if getattr(settings, key) not in allowed:
            raise ConfigError(f"{where}: tune.{key} is {getattr(settings, key)!r}; choose from: {', '.join(allowed)}")
    for key, least in (("trials", 1), ("startup_trials", 0), ("warmup_epochs", 0), ("heartbeat", 1)):
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
        try:
            self.trial.report(record[self.metric], record["epoch"])
        except _optuna().exceptions.UpdateFinishedTrialError:  # failed by another worker: its heartbeats came late
            trainer.stop("trial failed by another worker (its heartbeats came late); it is tried again")
            return
        if self.trial.should_prune():
            self.pruned_at = record["epoch"]
            trainer.stop(f"pruned by optuna at epoch {record['epoch']}")


def storage_url(out: Path, storage: Optional[str]) -> str:
    return storage or f"sqlite:///{(out / 'optuna.db').resolve()}"


def open_study(study: Study, settings: Settings, out: Path, storage: Optional[str], worker: int = 0):
    """The Optuna study (created by the first process, joined by the others). Its storage keeps each
    running trial's heartbeat: a trial whose worker died is failed and tried again (RETRIES times)."""
    optuna = _optuna()
    url = storage_url(out, storage)
    engine: dict[str, Any] = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("postgresql") and "connect_timeout" not in url:  # a server that does not answer: bounded wait
        engine["connect_args"] = {"connect_timeout": max(2, math.ceil(connect_timeout()))}  # libpq: whole seconds, >= 2
    try:
        with quiet():
            backend = optuna.storages.RDBStorage(url, engine_kwargs=engine, heartbeat_interval=settings.heartbeat,
                                                 grace_period=2 * settings.heartbeat,
                                                 heartbeat_stale_trial_callback=retry_class()(max_retry=RETRIES))
    except Exception as e:  # noqa: BLE001 - a wrong URL, an unreachable server, a missing driver
        raise ConfigError(f"--storage {url}: cannot open the Optuna storage ({type(e).__name__}: "
                          f"{first_line(e)})") from None
    seed = (settings.seed if settings.seed is not None else study.runs[0].config.seed) + worker

    def sampler(seed: int):
        return (optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials)
                if settings.sampler == "tpe" else optuna.samplers.RandomSampler(seed=seed))

    pruner = {"median": lambda: optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials,
                                                            n_warmup_steps=settings.warmup_epochs),
              "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
              "none": lambda: optuna.pruners.NopPruner()}[settings.pruner]()
    opened = optuna.create_study(study_name=study.name, storage=backend, direction=settings.direction,
                                 sampler=sampler(seed), pruner=pruner, load_if_exists=True)
    waiting = optuna.trial.TrialState.WAITING
    started = sum(1 for t in opened.get_trials(deepcopy=False) if t.state != waiting)
    if started:  # joining a search under way (again, after a worker died): not the samples its first start drew
        opened.sampler = sampler(seed + 7919 * started)
    if worker == 0 and settings.enqueue and not opened.trials:
        for values in settings.enqueue:
            opened.enqueue_trial(values, skip_if_exists=True)
    return opened


def trial_folder(out: Path, number: int) -> Path:
    return out / f"trial-{number:04d}"


def work(study: Study, out: Path, fit: Fit, *, trials: int, timeout: Optional[float], storage: Optional[str],
         worker: int = 0, overrides: Optional[list[str]] = None) -> int:
    """One worker's loop: ask for a trial, train it with `fit` (its heartbeat in the storage meanwhile),
    tell the result, until the study has `trials` trials or `timeout` seconds have passed. A trial whose
    worker died is failed and tried again (it counts once), so a worker with nothing left to ask for waits
    while others' trials run. Returns how many trials this worker ran."""
    optuna = _optuna()
    settings = tune_settings(study)
    search = check_search(study)
    opened = open_study(study, settings, out, storage, worker)
    if worker:  # the first process waits for this one before it asks for trials (see run_search)
        (out / "logs").mkdir(parents=True, exist_ok=True)
        (out / "logs" / f"worker-{worker}.ready").touch()
    deadline = time.monotonic() + timeout if timeout else None
    ran = 0
    while deadline is None or time.monotonic() < deadline:
        with quiet():
            optuna.storages.fail_stale_trials(opened)  # trials whose worker died: failed, and queued again
        current = counting(opened.get_trials(deepcopy=False))
        if sum(1 for t in current if t.state != optuna.trial.TrialState.WAITING) >= trials:  # enqueued ones wait
            if not any(t.state == optuna.trial.TrialState.RUNNING for t in current):
                break
            time.sleep(1.0)  # another worker's trial: should that worker die, it is failed and retried
            continue
        with quiet():
            trial = opened.ask()
            opened._storage.record_heartbeat(trial._trial_id)  # at once: a worker dying now leaves a stale trial
        if sum(1 for t in counting(opened.get_trials(deepcopy=False)) if t.number < trial.number) >= trials:
            trial.set_user_attr("surplus", True)  # another worker asked for the last trial at the same moment
            opened.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            continue
        try:
            values = suggest(trial, search)
        except Exception as e:  # noqa: BLE001 - check_search should have refused it; the trial must not stay RUNNING
            opened.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            raise ConfigError(f"{study.path}: Optuna refused the search block ({type(e).__name__}: {e})") from None
        folder = trial_folder(out, trial.number)
        trial.set_user_attr("run", folder.name)
        trial.set_user_attr("worker", worker)
        pruning = Pruning(trial, settings.metric)
        try:
            with Heartbeat(opened, trial, settings.heartbeat):
                fit(trial_config(study, values, overrides), run_dir=folder, callbacks=[pruning], progress=False)
        except Interrupted:  # SIGTERM (scancel, a job's time limit) or SIGINT: failed, retried by another worker
            finished = runs.read_summary(folder) if (folder / runs.SUMMARY).is_file() else {}
            if finished.get("status") == "completed":  # stopped in the analysis after training: the result stands
                opened.tell(trial, finished[settings.metric], skip_if_finished=True)
                raise
            if not opened._storage.get_trial(trial._trial_id).state.is_finished():  # else failed and queued already
                trial.set_user_attr("error", "its worker was stopped")
                frozen = opened.tell(trial, state=optuna.trial.TrialState.FAIL)
                with quiet():
                    retry_class()(max_retry=RETRIES)(opened, frozen)
            raise
        except CifarlabError as e:  # diverged, a bad value combination: this trial failed, the search goes on
            log.warning("trial %d failed: %s", trial.number, e)
            trial.set_user_attr("error", first_line(e) or type(e).__name__)
            opened.tell(trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
            ran += 1
            continue
        summary = runs.read_summary(folder)
        # skip_if_finished: a trial whose heartbeats came late was failed (and queued again) by another worker
        if pruning.pruned_at is not None:
            opened.tell(trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
        else:
            opened.tell(trial, summary[settings.metric], skip_if_finished=True)
        ran += 1
    return ran


@contextlib.contextmanager
def quiet():
    """Optuna without its warnings that heartbeats and retries are experimental (or renamed), and that
    heartbeats are meant for Study.optimize (this module beats them itself: Heartbeat)."""
    optuna = _optuna()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*RetryFailedTrialCallback")
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
        yield


def retry_class():
    """Optuna's callback that queues a failed trial again (renamed in Optuna 4.9)."""
    storages = _optuna().storages
    return getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback


def retried_as(trials: list) -> dict[int, int]:
    """Failed trial number -> the number of the trial that tries it again (the last of its retry history)."""
    with quiet():
        history = {t.number: retry_class().retry_history(t) for t in trials}
    return {numbers[-1]: new for new, numbers in history.items() if numbers}


def counting(trials: list) -> list:
    """The trials that count toward the search's number: all but those tried again and the surplus ones
    (asked by two workers at the same moment for the last place)."""
    again = retried_as(trials)
    return [t for t in trials if t.number not in again and not t.user_attrs.get("surplus")]


class Heartbeat:
    """While a trial trains: its heartbeat in the storage every `interval` seconds, from a thread."""

    def __init__(self, opened, trial, interval: float):
        self.storage, self.trial_id, self.interval = opened._storage, trial._trial_id, interval  # Optuna's own ids
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.beat, name="optuna-heartbeat", daemon=True)

    def beat(self) -> None:
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # noqa: BLE001 - a storage hiccup: the next beat may get through
                log.warning("trial heartbeat not recorded: %s", e)
            if self.stop.wait(self.interval):
                return

    def __enter__(self) -> "Heartbeat":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


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


def summarize_tune(study: Study, out: Path, storage: Optional[str] = None) -> TuneResult:
    """results.csv, results.md, best.yaml, plots/ and report.html from the study's trials so far."""
    optuna = _optuna()
    settings = tune_settings(study)
    opened = optuna.load_study(study_name=study.name, storage=storage_url(out, storage))
    finished = [t for t in opened.get_trials(deepcopy=False) if not t.user_attrs.get("surplus")]
    again = retried_as(finished)
    rows = [trial_row(t, out, again.get(t.number)) for t in finished]
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


def trial_row(trial, out: Path, retried_as: Optional[int] = None) -> dict[str, Any]:
    """A trial as a row of the study table: its settings, state and the run's figures (and the trial
    that tried it again)."""
    folder = trial_folder(out, trial.number)
    summary = runs.read_summary(folder) if (folder / runs.SUMMARY).is_file() else {}
    state = trial.state.name.lower()
    if state == "pruned":
        status = f"pruned at epoch {summary.get('epochs_run', '?')}"
    elif state == "fail":
        reason = trial.user_attrs.get("error") or ("its worker died" if retried_as is not None else None)
        status = f"failed: {reason or summary.get('stop_reason', 'no summary')}"
        status += f"; tried again as trial {retried_as}" if retried_as is not None else ""
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
