"""The `cifarlab sweep`, `cifarlab tune` and `cifarlab study` commands: studies and searches."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

import cifarlab

from .console import err, out, say, setup_logging, user_errors

study_app = typer.Typer(no_args_is_help=True, help="A study's tables, again, from the runs in its folder.")


def names(values: Optional[list[str]]) -> Optional[list[str]]:
    """--only a,b --only c -> [a, b, c]; None when not given."""
    return [n for v in values for n in v.split(",") if n] if values else None


ONLY = typer.Option(None, "--only", help="Run only these variants (names, repeatable or comma-separated).")
SKIP = typer.Option(None, "--skip", help="Leave these variants out (names, repeatable or comma-separated).")
OUT = typer.Option(None, "--out", help="Study directory (default: train.out_dir/NAME).")


@user_errors
def sweep(
    study_file: Path = typer.Argument(..., help="A study YAML (see configs/studies/)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value applied to every run, after each variant's "
                                                    "set (they win), e.g. train.epochs=2"),
    workers: Optional[int] = typer.Option(None, "-w", "--workers", min=1, help="Runs at a time (CPU threads are split)."),
    out_dir: Optional[Path] = OUT, only: Optional[list[str]] = ONLY, skip: Optional[list[str]] = SKIP,
    executor: Optional[str] = typer.Option(None, "-e", "--executor", help="local | dask | slurm (default: the study's)."),
    address: Optional[str] = typer.Option(None, "--address", help="Join this Dask scheduler (tcp://host:8786)."),
    scheduler_file: Optional[Path] = typer.Option(None, "--scheduler-file", help="Join the Dask scheduler this file names."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the runs (and the Slurm job script) and exit."),
) -> None:
    """Run a study (grid and/or variants x seeds) as separate processes, here or on a Dask cluster; tries
    every run's data and model first; skips finished runs, resumes interrupted ones; writes results.csv,
    results.md, results.tex, plots/ (PNG and PDF) and report.html."""
    where = dict(workers=workers, executor=executor, address=address, scheduler_file=scheduler_file)
    chosen = dict(overrides=overrides or [], out=out_dir, only=names(only), skip=names(skip))
    plan = cifarlab.plan_study(study_file, **chosen, **where)  # checks the names and every run first
    if dry_run:
        table = Table("run", "settings", "seed", "state", title=f"{plan.study.name}: {len(plan.runs)} runs into {plan.folder}")
        for run_id, values, seed, state in plan.runs:
            table.add_row(run_id, ", ".join(f"{k}={v}" for k, v in values.items()), str(seed), state)
        out.print(table)
        if plan.job_script is not None:
            out.print("Slurm job script (one per worker; the scheduler address is filled in at start):")
            out.print(plan.job_script)
    for problem in plan.problems:
        err.print(f"error: {problem}")
    if plan.problems:
        raise typer.Exit(2)
    if dry_run:
        return
    placed = {"local": f"{plan.slots} at a time on this machine", "dask": "on Dask",
              "slurm": "on Slurm through Dask"}[plan.executor]
    say(f"study {plan.study.name}: {len(plan.runs)} runs {placed}, into {plan.folder}")
    result = cifarlab.run_study(plan.study, out=plan.folder, on_run=lambda run_id, what: say(f"  {run_id}: {what}"),
                                **where)
    out.print(result.table)
    out.print(f"report: {plan.folder / 'report.html'}")


@user_errors
def tune(
    study_file: Path = typer.Argument(..., help="A study YAML with a search block (see configs/tune/)."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value applied to every trial, e.g. train.epochs=5"),
    trials: Optional[int] = typer.Option(None, "--trials", "-n", min=1, help="Trials in all (default: tune.trials)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", min=0, help="Start no trial after this many seconds."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: sqlite in the study "
                                          "folder); postgresql://user@host/db shares one search between machines."),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="Trial workers: processes on this machine (CPU "
                                "threads are split), or Dask tasks / Slurm jobs with --executor."),
    out_dir: Optional[Path] = OUT,
    executor: Optional[str] = typer.Option(None, "-e", "--executor", help="local | dask | slurm: where the trial "
                                           "workers run (default: the study's)."),
    address: Optional[str] = typer.Option(None, "--address", help="Join this Dask scheduler (tcp://host:8786)."),
    scheduler_file: Optional[Path] = typer.Option(None, "--scheduler-file", help="Join the Dask scheduler this file names."),
    worker_index: int = typer.Option(0, "--worker-index", hidden=True),
) -> None:
    """Hyperparameter search on Optuna: trials of the study's search block, pruned on each epoch's
    validation metric; writes results.csv, results.md, best.yaml, plots/ and report.html."""
    setup_logging()
    options = dict(overrides=overrides or [], out=out_dir, timeout=timeout, storage=storage)
    if worker_index:  # one of the processes that `--workers N` started: trials only
        cifarlab.tune_worker(study_file, trials=trials or 1, worker=worker_index, **options)
        return
    result = cifarlab.tune(study_file, trials=trials, workers=workers, executor=executor, address=address,
                           scheduler_file=scheduler_file, **options)
    out.print(result.table)
    out.print(", ".join(f"{n} {state}" for state, n in sorted(result.counts.items())))
    if result.best_config is not None:
        out.print(f"best: trial {result.best_trial}, {result.best_value:.4f} with "
                  + ", ".join(f"{k}={v}" for k, v in result.best_params.items()))
        out.print(f"best config: {result.best_config}  (cifarlab train -c {result.best_config})")
    out.print(f"report: {result.path / 'report.html'}")


@study_app.command("export")
@user_errors
def study_export(
    study_file: Path = typer.Argument(..., help="The study YAML the runs came from."),
    overrides: Optional[list[str]] = typer.Argument(None, help="The key=value settings the sweep was given."),
    fmt: str = typer.Option("latex", "--format", "-f", help="latex | markdown | csv"),
    out_dir: Optional[Path] = OUT, only: Optional[list[str]] = ONLY, skip: Optional[list[str]] = SKIP,
) -> None:
    """Write results.tex (or results.md / results.csv) again from the study folder's runs; runs nothing."""
    path = cifarlab.export_study(study_file, fmt, overrides=overrides or [], out=out_dir, only=names(only), skip=names(skip))
    say(f"wrote {path}")
