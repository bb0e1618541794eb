"""The study file: a base config, axes (a grid) and/or named variants, and repeats (seeds), expanded
into runs that execute as separate processes, then tabulated (results.csv, results.md) and plotted.

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

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from ..config import Config, load_config
from ..errors import ConfigError
from ..yamlfiles import apply_override, read_yaml

STUDY_KEYS = {"name", "description", "config", "base", "axes", "variants", "repeats", "reference", "executor", "slurm",
              "search", "tune"}
EXECUTOR_KEYS = {"name", "workers", "address", "scheduler_file"}


@dataclass
class RunSpec:
    """One run of a study, planned: its folder name, settings, seed and validated config."""

    id: str  # folder name inside the study directory
    variant: str
    values: dict[str, Any]  # axis key -> value (and a variant's settings)
    seed: int
    config: Config


@dataclass
class Study:
    """A study file expanded: every run planned (its config validated), and the blocks that the executors
    (executor, slurm) and the search (search, tune) read."""

    name: str
    description: str
    runs: list[RunSpec]
    axes: list[str]
    reference: Any = None  # what the report itself measured, shown beside our table
    path: Optional[Path] = None
    executor: dict[str, Any] = field(default_factory=dict)  # name (local | dask | slurm), workers, address, ...
    slurm: dict[str, Any] = field(default_factory=dict)  # the Slurm jobs' settings (see executors.slurm_options)
    search: dict[str, Any] = field(default_factory=dict)  # `cifarlab tune`'s search space and settings
    tune: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)  # the base config tree (before axes and variants)


def value_text(value: Any) -> str:
    """A setting's value as it appears in run folder names and tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "-".join(map(str, value))
    return str(value)


def slug(text: str) -> str:
    """`text` with every character that does not belong in a file name replaced by '-'."""
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
                expanded.append(_plan_run(path, base, variant["name"] if named else None, variant.get("set") or {},
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


def _plan_run(path: Path, base: dict, variant: Optional[str], settings: dict[str, Any], point: dict[str, Any],
              repeat: int, overrides: list[str]) -> RunSpec:
    parts = ([variant] if variant else []) + [f"{k}={value_text(v)}" for k, v in point.items()]
    label = slug("_".join(parts) or "base")
    config = config_with(base, {**settings, **point}, overrides, f"{path} ({label})")
    seed = config.seed + repeat
    config.seed = seed
    return RunSpec(f"{label}_seed{seed}", variant or "base", {**settings, **point}, seed, config)


def study_folder(study: Study, out: Union[str, Path, None] = None) -> Path:
    """Where a study's runs and tables go: `out`, else train.out_dir/STUDY-NAME."""
    return Path(out) if out is not None else Path(study.runs[0].config.train.out_dir) / study.name
