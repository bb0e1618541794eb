"""Where a search's trial workers run: processes on this machine (`--workers N`: this process and N - 1
more), or tasks of a Dask cluster (`--executor dask`: a local one on 127.0.0.1 or a scheduler at an
address) or of Slurm jobs (`--executor slurm`: one job per worker, from the study's `slurm:` block).
Every worker is a `cifarlab tune --worker-index I` process on the one Optuna storage; workers on other
machines share it through a database server (PostgreSQL), not a SQLite file. A worker that dies leaves
its trial to the storage's heartbeat: failed, and tried again by a worker still running (tune.py)."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import processes
from ..errors import ConfigError
from .executors import EXECUTORS, Executor, Job, describe_exit, local_gpus, make_executor
from .space import check_search
from .spec import Study
from .tune import Fit, TuneResult, open_study, storage_url, summarize_tune, tune_settings, work

log = logging.getLogger(__name__)
WORKER_START_S = 120.0  # how long the first process waits for the others to open the study


@dataclass
class SearchWorker(Job):
    """A search worker placed by an executor: a `cifarlab tune --worker-index I` process. Its `run_dir`
    is the search folder (never locked: each trial locks its own run folder)."""

    argv: list[str] = field(default_factory=list)
    warm: bool = False  # a long-lived process: a cold start costs it little

    def command(self) -> list[str]:
        return self.argv


def search_executor(study: Study, out: Path, *, name: Optional[str], workers: int, storage: Optional[str],
                    address: Optional[str] = None, scheduler_file: Optional[str] = None) -> Optional[Executor]:
    """The executor that places the search's workers (None: processes on this machine): the argument,
    else the study's `executor:` block. Workers on other machines need a storage server."""
    settings = study.executor
    name = name or settings.get("name") or ("dask" if address or scheduler_file else "local")
    address, scheduler_file = address or settings.get("address"), scheduler_file or settings.get("scheduler_file")
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r} (choose from: {', '.join(EXECUTORS)})")
    if name == "local":
        if address or scheduler_file:
            raise ConfigError("--address and --scheduler-file need --executor dask")
        return None
    if (name == "slurm" or address or scheduler_file) and (storage is None or storage.startswith("sqlite")):
        raise ConfigError(f"--executor {name}: trial workers on other machines share the search through a database "
                          f"server; give --storage postgresql://USER@HOST/DB (not {storage or 'the default SQLite file'})")
    return make_executor(name, workers=workers, gpus=local_gpus(), address=address,
                         scheduler_file=str(scheduler_file) if scheduler_file else None,
                         slurm={**study.slurm, "jobs": workers}, logs=out / "logs" / "slurm")


def worker_command(study: Study, out: Path, index: int, *, trials: int, url: str, timeout: Optional[float],
                   overrides: list[str]) -> list[str]:
    """The command line of search worker `index` (>= 1)."""
    command = [sys.executable, "-m", "cifarlab.cli", "tune", str(Path(study.path).resolve()), *overrides,
               "--trials", str(trials), "--storage", url, "--out", str(out.resolve()), "--worker-index", str(index)]
    return command + (["--timeout", str(timeout)] if timeout else [])


def wait_until_ready(helpers: list, out: Path, limit_s: float = WORKER_START_S) -> None:
    """Wait until every other worker process opened the study (or ended, or `limit_s` passed), so that
    all ask for their first trial together: otherwise the first process, already running, may take
    every trial of a short search before the others have imported torch."""
    deadline = time.monotonic() + limit_s
    for index, helper in enumerate(helpers, start=1):
        ready = out / "logs" / f"worker-{index}.ready"
        while not ready.exists() and helper.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)


def run_search(study: Study, out: Path, fit: Fit, *, trials: Optional[int] = None, timeout: Optional[float] = None,
               storage: Optional[str] = None, workers: int = 1, overrides: Optional[list[str]] = None,
               executor: Optional[Executor] = None) -> TuneResult:
    """Run the search with `workers` workers: processes on this machine (this one, training its trials
    with `fit`, and workers - 1 more), or, given an `executor`, `workers` worker processes that it places
    (this process trains nothing); then write results.csv, results.md, best.yaml, plots/ and report.html."""
    settings = tune_settings(study)
    check_search(study)
    trials = trials or settings.trials
    timeout = timeout if timeout is not None else settings.timeout
    url = storage_url(out, storage)
    if executor is not None:
        executor.reach()  # a cluster that cannot be reached: one error, before the storage and the folder
    if storage is None:  # SQLite in the study folder; a server's storage is reached before the folder is made
        out.mkdir(parents=True, exist_ok=True)
    open_study(study, settings, out, url)  # created (and its first trials enqueued) before any worker joins
    (out / "logs").mkdir(parents=True, exist_ok=True)
    # the study's runs carry the overrides: a train.threads given there is kept
    threads = executor.run_threads if executor is not None else processes.cores_per(workers)
    given = [] if study.runs[0].config.train.threads or threads is None else [f"train.threads={threads}"]
    settings_given = [*(overrides or []), *given]
    if executor is not None:
        jobs = [SearchWorker(f"worker-{index}", out, Path(study.path), out / "logs" / f"worker-{index}.log",
                             device=study.runs[0].config.train.device,
                             argv=worker_command(study, out, index, trials=trials, url=url, timeout=timeout,
                                                 overrides=settings_given))
                for index in range(1, workers + 1)]
        for job_id, code in executor.run(jobs).items():
            if code != 0:
                log.warning("search %s: %s", job_id, describe_exit(job_id, code))
        return summarize_tune(study, out, url)
    helpers = []
    for index in range(1, workers):
        command = worker_command(study, out, index, trials=trials, url=url, timeout=timeout, overrides=settings_given)
        helpers.append(processes.start(command, dict(os.environ), open(out / "logs" / f"worker-{index}.log", "a")))
    try:
        wait_until_ready(helpers, out)
        work(study, out, fit, trials=trials, timeout=timeout, storage=url, overrides=settings_given)
        for helper in helpers:
            helper.wait()
    except BaseException:
        for helper in helpers:
            processes.stop(helper)
        raise
    return summarize_tune(study, out, url)
