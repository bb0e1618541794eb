"""The public Python API of studies and searches: plan and run a study, regenerate its tables, and
search a study's space with Optuna. Trials are trained by `api.fit`, passed down to studies/tune.py
(the studies package never imports the API).

    result = cifarlab.run_study("configs/studies/report-001.yaml", overrides=["train.epochs=2"])
    print(result.table)                        # results.md; results.csv, results.tex, plots/, report.html
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .api import fit
from .errors import CifarlabError, first_line
from .studies.executors import run_jobs, run_state, study_executor
from .studies.results import FORMATS, collect, summarize_study, write_results
from .studies.slurm import slurm_job_script
from .studies.spec import PlanError, Study, check_plan, load_study, study_folder
from .studies.search import run_search, search_executor
from .studies.tune import TuneResult, work

PathLike = Union[str, Path]


@dataclass
class StudyResult:
    """Where a study's runs and tables are, and what happened to each run this time."""

    path: Path
    outcome: dict[str, str]  # run id -> completed, skipped (completed before), failed (exit N, see logs/...)

    @property
    def table(self) -> str:
        """results.md: one row per variant, mean +- std over repeats, the report's numbers beside them."""
        return (self.path / "results.md").read_text()


def as_study(study: Union[Study, PathLike], overrides: Optional[list[str]] = None, only: Optional[list[str]] = None,
             skip: Optional[list[str]] = None) -> Study:
    return study if isinstance(study, Study) else load_study(Path(study), overrides, only, skip)


def run_study(study: Union[Study, PathLike], *, overrides: Optional[list[str]] = None, out: Optional[PathLike] = None,
              workers: Optional[int] = None, executor: Optional[str] = None, address: Optional[str] = None,
              scheduler_file: Optional[PathLike] = None, only: Optional[list[str]] = None,
              skip: Optional[list[str]] = None, on_run: Optional[Callable[[str, str], None]] = None) -> StudyResult:
    """Run a study (a Study or a study YAML; `overrides` apply to every run, after each variant's
    `set:`; `only` / `skip` pick variants by name): first every run's data and model are tried
    (PlanError, one line per run that cannot run, before any folder is made), then every run not
    finished yet runs in its own process, `workers` at a time, on this machine (`executor="local"`), a
    Dask cluster (`"dask"`: a local one on 127.0.0.1, or the scheduler at `address` /
    `scheduler_file`) or Slurm (`"slurm"`, from the study's `slurm:` block); `on_run(run id, what
    happened)` hears of each run as it ends. Then results.csv / .md / .tex, plots/ (PNG and PDF) and
    report.html in the study folder (default train.out_dir/STUDY-NAME)."""
    study = as_study(study, overrides, only, skip)
    folder = study_folder(study, out)
    _, chosen, workers = study_executor(study, executor, workers, address, scheduler_file, folder)
    check_plan(study, reads_here(chosen))
    outcome = run_jobs(study, folder, chosen, workers, on_run)
    try:
        summarize_study(study, folder)
    except Exception as e:  # noqa: BLE001 - the runs are done and kept: say how to write the tables again
        error = CifarlabError(f"{folder}: every run finished, but the tables failed ({type(e).__name__}: "
                              f"{first_line(e)}); write them again, without training, with: cifarlab study "
                              f"export {study.path} --out {folder}")
        error.exit_code = 1
        raise error from e
    return StudyResult(folder, outcome)


def reads_here(executor: Any) -> bool:
    """Whether the runs read their data on this machine (local processes or a local Dask cluster)."""
    return not any(getattr(executor, key, None) for key in ("address", "scheduler_file", "make_cluster"))


@dataclass
class StudyPlan:
    """What `run_study` would do: the study, its folder, the executor and its slots, each run's state,
    and the runs that cannot run (one line each)."""

    study: Study
    folder: Path
    executor: str
    slots: int
    runs: list[tuple[str, dict[str, Any], int, str]]  # (run id, settings, seed, new | completed | ...)
    job_script: Optional[str]  # the Slurm job script of one worker (executor "slurm")
    problems: list[str]


def plan_study(study: Union[Study, PathLike], *, overrides: Optional[list[str]] = None, out: Optional[PathLike] = None,
               workers: Optional[int] = None, executor: Optional[str] = None, address: Optional[str] = None,
               scheduler_file: Optional[PathLike] = None, only: Optional[list[str]] = None,
               skip: Optional[list[str]] = None) -> StudyPlan:
    """Check a study as `run_study` takes it (its runs' data and models tried) and say what it would run."""
    study = as_study(study, overrides, only, skip)
    folder = study_folder(study, out)
    name, chosen, count = study_executor(study, executor, workers, address, scheduler_file, folder)
    rows = [(run.id, dict(run.values), run.seed, run_state(folder / run.id) if (folder / run.id).exists() else "new")
            for run in study.runs]
    try:
        check_plan(study, reads_here(chosen))
        problems = []
    except PlanError as e:
        problems = e.problems
    return StudyPlan(study, folder, name, count, rows, slurm_job_script(study.slurm) if name == "slurm" else None,
                     problems)


def export_study(study: Union[Study, PathLike], format: str = "latex", *, overrides: Optional[list[str]] = None,
                 out: Optional[PathLike] = None, only: Optional[list[str]] = None,
                 skip: Optional[list[str]] = None) -> Path:
    """Write a study's table again from the runs in its folder, without running anything: `format`
    latex (results.tex), markdown (results.md) or csv (results.csv). Returns the file."""
    from .errors import ConfigError

    if format not in FORMATS:
        raise ConfigError(f"--format {format}: use {' | '.join(FORMATS)}")
    study = as_study(study, overrides, only, skip)
    folder = study_folder(study, out)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no study folder (run `cifarlab sweep` first, or pass --out)")
    return write_results(study, folder, collect(study, folder), (format,))[0]


def tune(study: Union[Study, PathLike], *, overrides: Optional[list[str]] = None, out: Optional[PathLike] = None,
         trials: Optional[int] = None, timeout: Optional[float] = None, storage: Optional[str] = None,
         workers: int = 1, executor: Optional[str] = None, address: Optional[str] = None,
         scheduler_file: Optional[PathLike] = None) -> TuneResult:
    """Hyperparameter search on Optuna over a study file's `search` block: `trials` in all (default
    tune.trials), no new trial after `timeout` seconds, `workers` trial workers: processes on this
    machine (`executor="local"`), tasks of a Dask cluster (`"dask"`: a local one, or the scheduler at
    `address` / `scheduler_file`) or Slurm jobs (`"slurm"`, from the study's `slurm:` block), the
    Optuna study in `storage` (default: SQLite in the study folder; workers on other machines need a
    PostgreSQL URL). Each trial is a run folder trained by `fit`; returns the best trial, its
    settings and best.yaml, with results.md and report.html in the study folder (default
    train.out_dir/NAME)."""
    study = as_study(study, overrides)
    folder = study_folder(study, out)
    placed = search_executor(study, folder, name=executor, workers=workers, storage=storage, address=address,
                             scheduler_file=str(scheduler_file) if scheduler_file else None)
    return run_search(study, folder, fit, trials=trials, timeout=timeout, storage=storage, workers=workers,
                      overrides=overrides, executor=placed)


def tune_worker(study: Union[Study, PathLike], *, worker: int, trials: int, overrides: Optional[list[str]] = None,
                out: Optional[PathLike] = None, timeout: Optional[float] = None, storage: Optional[str] = None) -> int:
    """One of the processes that `tune(workers=N)` starts (`cifarlab tune --worker-index N`): trials
    of the shared search until it has `trials`, trained by `fit`, and no tables. Returns how many
    trials this process ran."""
    study = as_study(study, overrides)
    return work(study, study_folder(study, out), fit, trials=trials, timeout=timeout, storage=storage, worker=worker,
                overrides=overrides)
