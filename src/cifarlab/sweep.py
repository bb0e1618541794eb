"""Studies: a base config, axes (a grid) and/or named variants, and repeats (seeds), expanded into
runs that execute as separate processes, then tabulated (results.csv, results.md) and plotted.

    name: bn-x-optim
    base: {data: {root: ...}, train: {epochs: 20}}     # or `config: path/to/config.yaml`
    axes: {optim.name: [adam, sgd], model.batchnorm: [true, false]}
    variants:                                          # optional; each one x the grid
      - {name: kernels-753, set: {model.kernels: [7, 5, 3]}}
    repeats: 2                                         # seeds seed, seed+1, ...

A study directory holds one folder per run, named after its variant, axis values and seed, so that
running the study again skips what finished and resumes or redoes what did not.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev
from typing import Any, Optional

from . import runs
from .config import Config, apply_override, load_config, read_yaml, write_config
from .errors import ConfigError
from .executors import IN_USE, Executor, Job, make_executor, run_state
from .files import atomic_write

STUDY_KEYS = {"name", "description", "config", "base", "axes", "variants", "repeats", "reference", "executor", "slurm",
              "search", "tune"}
EXECUTOR_KEYS = {"name", "workers", "address", "scheduler_file"}


@dataclass
class Run:
    """One run of a study."""

    id: str  # folder name inside the study directory
    variant: str
    values: dict[str, Any]  # axis key -> value (and a variant's settings)
    seed: int
    config: Config


@dataclass
class Study:
    name: str
    description: str
    runs: list[Run]
    axes: list[str]
    reference: Any = None  # what the report itself measured, shown beside our table
    path: Optional[Path] = None
    executor: dict[str, Any] = field(default_factory=dict)  # name (local | dask | slurm), workers, address, ...
    slurm: dict[str, Any] = field(default_factory=dict)  # the Slurm jobs' settings (see executors.slurm_options)
    search: dict[str, Any] = field(default_factory=dict)  # `cifarlab tune`'s search space and settings
    tune: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)  # the base config tree (before axes and variants)


def _value_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "-".join(map(str, value))
    return str(value)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip("-")


def load_study(path: Path, overrides: Optional[list[str]] = None) -> Study:
    """Expand a study file into validated runs; `overrides` (key=value) apply to every run."""
    path = Path(path)
    spec = read_yaml(path)
    unknown = set(spec) - STUDY_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown study key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(STUDY_KEYS))})")
    base = read_yaml(path.parent / spec["config"]) if "config" in spec else {}
    for key, value in (spec.get("base") or {}).items():
        base.setdefault(key, {})
        if isinstance(value, dict) and isinstance(base[key], dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    axes = spec.get("axes") or {}
    if not isinstance(axes, dict) or any(not isinstance(v, list) or not v for v in axes.values()):
        raise ConfigError(f"{path}: axes must map each key.path to a non-empty list of values")
    variants = spec.get("variants") or [{"name": "base"}]
    repeats = int(spec.get("repeats", 1))
    if repeats < 1:
        raise ConfigError(f"{path}: repeats must be >= 1")
    expanded = []
    names = set()
    for variant in variants:
        if not isinstance(variant, dict) or "name" not in variant or set(variant) - {"name", "set"}:
            raise ConfigError(f"{path}: each variant is {{name: ..., set: {{key.path: value}}}}, got {variant!r}")
        if variant["name"] in names:
            raise ConfigError(f"{path}: variant name {variant['name']!r} is used twice")
        names.add(variant["name"])
        named = "set" in variant  # a real variant, not the implicit "base"
        for point in itertools.product(*axes.values()):
            for repeat in range(repeats):
                expanded.append(_make_run(path, base, variant["name"] if named else None, variant.get("set") or {},
                                          dict(zip(axes, point)), repeat, overrides or []))
    ids = [r.id for r in expanded]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{path}: two runs would share the folder {next(i for i in ids if ids.count(i) > 1)}")
    executor = spec.get("executor") or {}
    executor = {"name": executor} if isinstance(executor, str) else executor
    if not isinstance(executor, dict) or set(executor) - EXECUTOR_KEYS:
        raise ConfigError(f"{path}: executor is a name (local, dask, slurm) or {{{', '.join(sorted(EXECUTOR_KEYS))}}}")
    for key in ("slurm", "search", "tune"):
        if not isinstance(spec.get(key) or {}, dict):
            raise ConfigError(f"{path}: {key} must be a mapping")
    return Study(spec.get("name") or path.stem, spec.get("description", ""), expanded, list(axes),
                 spec.get("reference"), path, executor, spec.get("slurm") or {}, spec.get("search") or {},
                 spec.get("tune") or {}, base)


def config_with(base: dict[str, Any], values: dict[str, Any], overrides: Optional[list[str]], source: str) -> Config:
    """The validated config of a study's `base` tree with `values` ({key.path: value}) set and then
    `overrides`; a bad key or value is a ConfigError naming `source`."""
    tree = json.loads(json.dumps(base))  # a deep copy of plain YAML data
    for key, value in values.items():
        apply_override(tree, key.split("."), value)
    return load_config(tree, overrides, source=source)


def _make_run(path: Path, base: dict, variant: Optional[str], settings: dict[str, Any], point: dict[str, Any],
              repeat: int, overrides: list[str]) -> Run:
    parts = ([variant] if variant else []) + [f"{k}={_value_text(v)}" for k, v in point.items()]
    label = _slug("_".join(parts) or "base")
    config = config_with(base, {**settings, **point}, overrides, f"{path} ({label})")
    seed = config.seed + repeat
    config.seed = seed
    return Run(f"{label}_seed{seed}", variant or "base", {**settings, **point}, seed, config)


# ---------------------------------------------------------------- execution


def plan_jobs(study: Study, out: Path, threads: Optional[int] = None) -> tuple[dict[str, str], list[Job]]:
    """What a run of the study does now: the runs it skips (completed, or being written by another
    process) and a job for every other one (its config written to out/configs/RUN.yaml); CPU runs
    that do not set train.threads get `threads`."""
    out.mkdir(parents=True, exist_ok=True)
    outcome, jobs = {}, []
    for run in study.runs:
        run_dir = out / run.id
        holder = runs.lock_holder(run_dir) if run_dir.exists() else None
        if holder is not None:  # another sweep (or a train --resume) is writing it: leave it alone
            outcome[run.id] = f"skipped (process {holder} is writing it)"
            continue
        if run_dir.exists() and run_state(run_dir) == "completed":
            outcome[run.id] = "skipped (completed before)"
            continue
        config_path = out / "configs" / f"{run.id}.yaml"
        config_path.parent.mkdir(exist_ok=True)
        write_config(run.config, config_path)
        settings = [] if threads is None or run.config.train.threads is not None else [f"train.threads={threads}"]
        jobs.append(Job(run.id, run_dir, config_path, out / "logs" / f"{run.id}.log", settings, run.config.train.device))
    return outcome, jobs


def run_study(study: Study, out: Path, executor: Optional[Executor] = None, workers: int = 1) -> dict[str, str]:
    """Run what is not finished yet; returns run id -> what happened (skipped, completed, failed ...)."""
    executor = executor or make_executor("local", workers=workers, gpus=local_gpus())
    outcome, jobs = plan_jobs(study, out, executor.run_threads)
    for job_id, code in executor.run(jobs).items():
        if isinstance(code, str):
            outcome[job_id] = code
        elif code == IN_USE:
            outcome[job_id] = "skipped (another process kept writing it)"
        else:
            outcome[job_id] = "completed" if code == 0 else f"failed (exit {code}, see logs/{job_id}.log)"
    return outcome


def study_executor(study: Study, name: Optional[str] = None, workers: Optional[int] = None,
                   address: Optional[str] = None, scheduler_file: Optional[Any] = None) -> tuple[str, Executor, int]:
    """The executor's name, the executor and the worker count for `study`: the arguments, else the
    study's `executor:` block, else local with one worker."""
    settings = study.executor
    name = name or settings.get("name") or ("dask" if address or scheduler_file else "local")
    workers = int(workers or settings.get("workers") or 1)
    if workers < 1:
        raise ConfigError(f"{study.path}: executor workers must be >= 1")
    scheduler_file = scheduler_file or settings.get("scheduler_file")
    executor = make_executor(name, workers=workers, gpus=local_gpus(), address=address or settings.get("address"),
                             scheduler_file=str(scheduler_file) if scheduler_file else None, slurm=study.slurm)
    return name, executor, workers


def local_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES values (those already visible, if set)."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return names[:torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


# ---------------------------------------------------------------- results

COLUMNS = ["train_acc", "val_acc", "test_acc", "best_epoch", "epochs_run", "train_time_s", "train_img_per_s"]


def collect(study: Study, out: Path) -> list[dict[str, Any]]:
    """One row per variant (grid point): settings, status, and each metric's mean (and std over repeats)."""
    groups: dict[tuple, list[Run]] = {}
    for run in study.runs:
        groups.setdefault((run.variant, json.dumps(run.values, sort_keys=True)), []).append(run)
    rows = []
    for (variant, _), members in groups.items():
        summaries = []
        for run in members:
            path = out / run.id / runs.SUMMARY
            summaries.append(json.loads(path.read_text()) if path.is_file() else {"status": "missing"})
        done = [s for s in summaries if s.get("status") == "completed"]
        failed = [s for s in summaries if s.get("status") != "completed"]
        row: dict[str, Any] = {"variant": variant, **{k: _value_text(v) for k, v in members[0].values.items()},
                               "runs": len(members), "completed": len(done),
                               "status": "completed" if not failed else "; ".join(
                                   f"{s.get('status')}: {s.get('stop_reason', 'no summary')}" for s in failed)}
        for key in COLUMNS:
            values = [s[key] for s in done if s.get(key) is not None]
            row[key] = mean(values) if values else None
            if len(members) > 1:
                row[f"{key}_std"] = stdev(values) if len(values) > 1 else None
        row["stop_reason"] = "; ".join(sorted({s["stop_reason"].split(":")[0] for s in done})) if done else ""
        row["params"] = done[0]["params"]["trainable"] + done[0]["params"]["non_trainable"] if done else None
        row["ids"] = [r.id for r in members]
        rows.append(row)
    return rows


def write_results(study: Study, out: Path, rows: list[dict[str, Any]]) -> None:
    keys = [k for k in rows[0] if k != "ids"] if rows else []

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items() if k != "ids"})

    atomic_write(out / "results.csv", write_csv)
    atomic_write(out / "results.md", results_markdown(study, rows))


def setting_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The columns of `collect` rows that hold a variant's settings (axis keys and `set` keys)."""
    fixed = {"variant", "runs", "completed", "status", "stop_reason", "params", "ids", *COLUMNS}
    return [k for k in rows[0] if k not in fixed and not k.endswith("_std")] if rows else []


def _pct(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    std = row.get(f"{key}_std")
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def results_markdown(study: Study, rows: list[dict[str, Any]]) -> str:
    settings = setting_keys(rows)
    header = ["variant", *settings, "train %", "val %", "test %", "best epoch", "epochs", "stop", "time (s)",
              "img/s", "params", "status"]
    lines = [f"# {study.name}", "", study.description.strip(), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["variant"], *(str(row[k]) for k in settings), _pct(row, "train_acc"), _pct(row, "val_acc"),
                 _pct(row, "test_acc"), _num(row.get("best_epoch")), _num(row.get("epochs_run")),
                 row["stop_reason"], _num(row.get("train_time_s")), _num(row.get("train_img_per_s")),
                 f"{row['params']:,}" if row.get("params") else "-", row["status"]]
        lines.append("| " + " | ".join(cells) + " |")
    repeats = max((r["runs"] for r in rows), default=1)
    if repeats > 1:
        lines += ["", f"Mean ± standard deviation over {repeats} seeds."]
    return "\n".join(lines) + "\n"


def _num(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) and not float(value).is_integer() else f"{int(value)}"


def epoch_records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's per-epoch records (none for a run that has not started)."""
    path = run_dir / runs.METRICS
    return [r for r in runs.read_jsonl(path) if r["kind"] == "epoch"] if path.is_file() else []


def curve(records: list[dict[str, Any]], metric: str) -> tuple[list[int], list[float]]:
    rows = [r for r in records if metric in r]
    return [r["epoch"] for r in rows], [100 * r[metric] for r in rows]


def study_figures(study: Study, out: Path) -> list[Path]:
    """Overlaid validation curves: one figure per axis (lines colored by that axis' value), and one
    of the named variants when there are several. When some runs have no validation split (an
    ablation that trains on every image), all runs are drawn by their training accuracy instead."""
    from .analysis.plots import overlay_curves

    records = {run.id: epoch_records(out / run.id) for run in study.runs}
    no_val = any(r and not any("val_acc" in e for e in r) for r in records.values())
    metric, words = ("train_acc", "training accuracy") if no_val else ("val_acc", "validation accuracy")
    figures = []
    groupings = [(axis, lambda r, a=axis: f"{a}={_value_text(r.values[a])}") for axis in study.axes]
    if len({r.variant for r in study.runs}) > 1:
        groupings.insert(0, ("variant", lambda r: r.variant))
    for axis, label_of in groupings:
        series = [(label_of(run), *curve(records[run.id], metric)) for run in study.runs]
        series = [s for s in series if s[1]]
        if series:
            figures.append(overlay_curves(series, out / "plots" / f"{metric}_by_{_slug(axis)}.png",
                                          f"{study.name}: {words} by {axis}", ylabel=f"{words} (%)"))
    return figures


def write_report(study: Study, out: Path, rows: list[dict[str, Any]], figures: list[Path],
                 counts: Optional[str] = None) -> Path:
    from .analysis.report import inline, render_html

    settings = setting_keys(rows)
    columns = ([{"title": "variant", "text": True}] + [{"title": s, "text": True} for s in settings] +
               [{"title": t, "text": False} for t in ("train %", "val %", "test %", "best epoch", "epochs",
                                                      "time (s)", "img/s", "params")] +
               [{"title": "stop", "text": True}, {"title": "status", "text": True}])
    table = []
    for row in rows:
        numbers = [(row.get(k), _pct(row, k)) for k in ("train_acc", "val_acc", "test_acc")]
        numbers += [(row.get(k), _num(row.get(k))) for k in ("best_epoch", "epochs_run", "train_time_s",
                                                              "train_img_per_s")]
        numbers.append((row.get("params"), f"{row['params']:,}" if row.get("params") else "-"))
        cells = [{"sort": row["variant"], "shown": row["variant"]}]
        cells += [{"sort": str(row[s]), "shown": str(row[s])} for s in settings]
        cells += [{"sort": "" if v is None else v, "shown": shown} for v, shown in numbers]
        cells += [{"sort": row["stop_reason"], "shown": row["stop_reason"]}, {"sort": row["status"], "shown": row["status"]}]
        table.append({"cells": cells, "ok": row["status"] == "completed"})
    reference = study.reference
    return render_html(
        "study.html", out / "report.html", study=study, columns=columns, table=table,
        counts=counts or f"{len(rows)} variants, {len(study.runs)} runs",
        reference=json.dumps(reference, indent=2) if isinstance(reference, (dict, list)) else reference,
        figures=[{"title": p.stem.replace("_", " "), "data": inline(p)} for p in figures])


def summarize_study(study: Study, out: Path) -> list[dict[str, Any]]:
    """results.csv, results.md, plots/ and report.html from whatever runs exist."""
    rows = collect(study, out)
    write_results(study, out, rows)
    write_report(study, out, rows, study_figures(study, out))
    return rows
