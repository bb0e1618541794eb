"""The study file: a base config, axes (a grid) and/or named variants, and repeats (seeds), expanded
into runs that execute as separate processes, then tabulated (results.csv, results.md) and plotted.

    name: bn-x-optim
    base: {data: {root: ...}, train: {epochs: 20}}     # or `config: path/to/config.yaml`
    axes: {optim.name: [adam, sgd], model.batchnorm: [true, false]}
    variants:                                          # optional; each one x the grid
      - {name: kernels-753, set: {model.kernels: [7, 5, 3]}}
    repeats: 2                                         # seeds seed, seed+1, ...
    reference:                                         # optional: what the report itself measured
      source: "report 001, table 3, full CIFAR-10"
      scale: {train_images: 45000, epochs: 100}        # rows that trained on less are marked reduced
      rows: {kernels-753: {train_acc: 84.25, val_acc: 80.59, test_acc: 80.03, best_epoch: 18}}

Command-line overrides apply to every run after its variant's `set:` (they win); `only` / `skip`
select variants by name. `check_plan` tries every run's data and model before anything runs.

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
from ..data.sources import dataset_from_config, known_shape
from ..data.splits import validation_count
from ..errors import CifarlabError, ConfigError
from ..models.build import build_model, check_layer_names
from ..yamlfiles import apply_override, read_yaml

STUDY_KEYS = {"name", "description", "config", "base", "axes", "variants", "repeats", "reference", "executor", "slurm",
              "search", "tune"}
EXECUTOR_KEYS = {"name", "workers", "address", "scheduler_file", "warm"}
REFERENCE_KEYS = {"source", "scale", "rows", "notes"}
REFERENCE_FIELDS = ("train_acc", "val_acc", "test_acc", "best_epoch", "time_s", "params")  # accuracies in %
SCALE_KEYS = ("train_images", "epochs")


class PlanError(ConfigError):
    """Runs of a study that cannot run, one line each (exit code 2)."""

    def __init__(self, study: str, problems: list[str]):
        super().__init__(f"{study}: {len(problems)} run(s) cannot run: " + "; ".join(problems))
        self.problems = problems


@dataclass
class Reference:
    """What the report itself measured, to stand beside the study's own numbers: `rows` maps a row
    label (the variant, or "variant, axis=value") or a variant name to its numbers (REFERENCE_FIELDS,
    accuracies in %); `scale` is what the report trained on (train_images, epochs)."""

    source: str = ""
    rows: dict[str, dict[str, float]] = field(default_factory=dict)
    scale: dict[str, int] = field(default_factory=dict)
    notes: str = ""


@dataclass
class RunSpec:
    """One run of a study, planned: its folder name, settings, seed and validated config."""

    id: str  # folder name inside the study directory
    variant: str
    values: dict[str, Any]  # axis key -> value (and a variant's settings)
    seed: int
    config: Config
    point: dict[str, Any] = field(default_factory=dict)  # the axis values alone

    @property
    def label(self) -> str:
        """The row this run belongs to: its variant, and its axis values when the study has axes."""
        return ", ".join([self.variant, *(f"{k}={value_text(v)}" for k, v in self.point.items())])


@dataclass
class Study:
    """A study file expanded: every run planned (its config validated), and the blocks that the executors
    (executor, slurm) and the search (search, tune) read."""

    name: str
    description: str
    runs: list[RunSpec]
    axes: list[str]
    reference: Reference = field(default_factory=Reference)  # what the report itself measured
    path: Optional[Path] = None
    executor: dict[str, Any] = field(default_factory=dict)  # name (local | dask | slurm), workers, address, ...
    slurm: dict[str, Any] = field(default_factory=dict)  # the Slurm jobs' settings (see slurm.slurm_options)
    search: dict[str, Any] = field(default_factory=dict)  # `cifarlab tune`'s search space and settings
    tune: dict[str, Any] = field(default_factory=dict)
    base: dict[str, Any] = field(default_factory=dict)  # the base config tree (before axes and variants)


def value_text(value: Any) -> str:
    """A setting's value as it appears in run folder names and tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "-".join(map(str, value))
    if isinstance(value, dict):  # model.args: {p: 0.2} -> p=0.2
        return " ".join(f"{k}={value_text(v)}" for k, v in value.items()) or "-"
    if isinstance(value, str) and ".py:" in value:  # model.module's file, by its name (the path is in config.yaml)
        return value.rsplit("/", 1)[-1]
    return str(value)


def slug(text: str) -> str:
    """`text` with every character that does not belong in a file name replaced by '-'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in text).strip("-")


def load_study(path: Path, overrides: Optional[list[str]] = None, only: Optional[list[str]] = None,
               skip: Optional[list[str]] = None) -> Study:
    """Expand a study file into validated runs; `overrides` (key=value) apply to every run; `only` /
    `skip` keep or leave out variants by name."""
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
    variants = select_variants(path, spec.get("variants") or [{"name": "base"}], only, skip)
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
    if not isinstance(executor.get("warm", True), bool):
        raise ConfigError(f"{path}: executor.warm must be true or false, got {executor['warm']!r}")
    for key in ("slurm", "search", "tune"):
        if not isinstance(spec.get(key) or {}, dict):
            raise ConfigError(f"{path}: {key} must be a mapping")
    return Study(spec.get("name") or path.stem, spec.get("description", ""), expanded, list(axes),
                 read_reference(path, spec.get("reference"), [v.get("name") for v in spec.get("variants") or []]),
                 path, executor, spec.get("slurm") or {}, spec.get("search") or {},
                 spec.get("tune") or {}, base)


def config_with(base: dict[str, Any], values: dict[str, Any], overrides: Optional[list[str]], source: str) -> Config:
    """The validated config of a study's `base` tree with `values` ({key.path: value}) set and then
    `overrides`; a bad key or value is a ConfigError naming `source`. Values that set model.module or
    model.layers replace the base's preset (and its parameters)."""
    tree = json.loads(json.dumps(base))  # a deep copy of plain YAML data
    chosen = {"model.preset", "model.module", "model.layers"} & set(values)
    if chosen and isinstance(tree.get("model"), dict):
        # a variant choosing the network (a preset next to your module, say): the base's other choices go,
        # its preset parameters when the variant leaves presets, its module's args when it leaves the module
        keep = {"defaults"} | ({"args"} if "model.module" in chosen else set())
        if chosen == {"model.preset"} and tree["model"].get("preset") is not None:
            keep = set(tree["model"]) - {"module", "layers", "args", "given"}
        tree["model"] = {k: v for k, v in tree["model"].items() if k in keep}
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
    return RunSpec(f"{label}_seed{seed}", variant or "base", {**settings, **point}, seed, config, dict(point))


def select_variants(path: Path, variants: Any, only: Optional[list[str]], skip: Optional[list[str]]) -> list:
    """The variants `only` keeps (all when None) minus those `skip` names; unknown names are errors."""
    if not isinstance(variants, list):
        raise ConfigError(f"{path}: variants must be a list of {{name: ..., set: {{...}}}}")
    names = [v.get("name") for v in variants if isinstance(v, dict)]
    for option, chosen in (("--only", only), ("--skip", skip)):
        unknown = [n for n in chosen or [] if n not in names]
        if unknown:
            raise ConfigError(f"{option} {unknown[0]}: no such variant in {path} (variants: {', '.join(map(str, names))})")
    kept = [v for v in variants if not isinstance(v, dict) or
            ((only is None or v.get("name") in only) and v.get("name") not in (skip or []))]
    if not kept:
        raise ConfigError(f"{path}: --only / --skip leave no variant to run")
    return kept


def read_reference(path: Path, spec: Any, variants: list[str]) -> Reference:
    """The study's `reference:` block, checked: known keys, rows that name a variant or a row, numbers."""
    if spec is None:
        return Reference()
    if not isinstance(spec, dict) or set(spec) - REFERENCE_KEYS:
        raise ConfigError(f"{path}: reference is {{source, scale, rows, notes}} (rows: name -> "
                          f"{{{', '.join(REFERENCE_FIELDS)}}}), got {spec!r:.80}")
    scale, rows = spec.get("scale") or {}, spec.get("rows") or {}
    if not isinstance(scale, dict) or set(scale) - set(SCALE_KEYS):
        raise ConfigError(f"{path}: reference.scale takes {', '.join(SCALE_KEYS)}")
    if not isinstance(rows, dict):
        raise ConfigError(f"{path}: reference.rows maps a variant to {{{', '.join(REFERENCE_FIELDS)}}}")
    for name, numbers in rows.items():
        if not isinstance(numbers, dict):
            raise ConfigError(f"{path}: reference.rows.{name} must map {', '.join(REFERENCE_FIELDS)} to numbers")
        bad = [k for k, v in numbers.items() if k not in REFERENCE_FIELDS or isinstance(v, bool)
               or not isinstance(v, (int, float))]
        if bad:
            raise ConfigError(f"reference.rows.{name}.{bad[0]}: {numbers[bad[0]]!r} in {path} (numbers for "
                              f"{', '.join(REFERENCE_FIELDS)})")
        if name.split(", ")[0] not in (variants or ["base"]):
            raise ConfigError(f"reference.rows.{name}: no such variant in {path} (variants: {', '.join(variants)})")
    for key in scale:
        if isinstance(scale[key], bool) or not isinstance(scale[key], int) or scale[key] < 1:
            raise ConfigError(f"reference.scale.{key}: {scale[key]!r} in {path} (a positive whole number)")
    return Reference(str(spec.get("source") or ""), dict(rows), dict(scale), str(spec.get("notes") or ""))


def check_plan(study: Study, read_data: bool = True) -> None:
    """Try every run's data and model before anything runs: its dataset can be read, its split sizes
    fit the data, and the layers its analysis names exist. PlanError lists each run that cannot run.
    Without `read_data` (the runs will read their data on other machines) only the layers are checked,
    for datasets whose shape is known without reading them."""
    datasets: dict[str, Any] = {}
    problems = []
    for run in study.runs:
        try:
            check_run(run.config, datasets, read_data)
        except CifarlabError as e:
            problems.append(f"{run.id}: {' '.join(str(e).split())}")
    if problems:
        raise PlanError(study.name, problems)


def check_run(config: Config, datasets: dict[str, Any], read_data: bool = True) -> None:
    """Raise the error a run of `config` would meet while preparing its data and model (datasets are
    read once per data section and seed, into `datasets`)."""
    if not read_data:
        known = known_shape(config.data)
        if known and (config.analysis.tsne.layers or config.model.module or config.model.given):
            check_model_layers(config, *known)
        return
    key = json.dumps([config.data.model_dump(mode="json"), config.seed])
    if key not in datasets:
        try:
            datasets[key] = dataset_from_config(config.data, config.seed)
        except CifarlabError as e:
            datasets[key] = e
    found = datasets[key]
    if isinstance(found, CifarlabError):
        raise found
    validation_count(len(found.y_train), config.data.val_size)
    if config.analysis.tsne.layers or config.model.module or config.model.given:  # your own model: it builds and fits
        check_model_layers(config, found.image_shape, len(found.classes))


def check_model_layers(config: Config, shape: tuple[int, int, int], classes: int) -> None:
    """The network the config builds (your own model: imported, called, its output checked) has the
    layers analysis.tsne.layers names."""
    check_layer_names(build_model(config.model, shape, classes), config.analysis.tsne.layers)


def study_folder(study: Study, out: Union[str, Path, None] = None) -> Path:
    """Where a study's runs and tables go: `out`, else train.out_dir/STUDY-NAME."""
    return Path(out) if out is not None else Path(study.runs[0].config.train.out_dir) / study.name
