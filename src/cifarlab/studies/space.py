"""A search block checked whole before any storage is touched (`check_search`): every numeric field,
bound, step and log range, and every choice and enqueued setting validated as a setting of its key, so
that Optuna refuses nothing once the search has started."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from ..config import Config
from ..errors import ConfigError
from .spec import Study, config_with

KINDS = ("float", "int", "choice")


def check_search(study: Study) -> dict[str, dict[str, Any]]:
    """The `search` block checked whole before any storage is touched, and returned with its bounds as
    numbers: one of float / int / choice per key; numeric bounds (finite; integers for int), low < high,
    a step > 0, log a boolean with a positive low end (>= 1 for int) and no step; choices that Optuna
    stores (numbers, strings, booleans, null). Both bounds (and a float range's inner point) and every
    choice are validated as settings of their key, and so are the settings of tune.enqueue."""
    where = study.path
    if not study.search or not isinstance(study.search, dict):
        raise ConfigError(f"{where}: a tune study needs a search block (key.path: {{float|int|choice: ...}})")
    checked = {}
    for key, spec in study.search.items():
        if not isinstance(spec, dict) or len(set(spec) & set(KINDS)) != 1 or set(spec) - {*KINDS, "log", "step"}:
            raise ConfigError(f"{where}: search.{key} must be {{float: [low, high]}}, {{int: [low, high]}} or "
                              "{choice: [a, b, ...]} (with optional log: true, step: s)")
        kind = next(k for k in KINDS if k in spec)
        values = spec[kind]
        if not isinstance(values, list) or not values or (kind != "choice" and len(values) != 2):
            shape = "of choices" if kind == "choice" else "[low, high]"
            raise ConfigError(f"{where}: search.{key}.{kind} must be a list {shape}")
        checked[key] = choice_spec(where, key, spec) if kind == "choice" else range_spec(where, key, kind, spec)
        if kind == "choice":
            samples = values
        else:  # a float range also takes a value between its ends: an integer setting refuses it here, not in a trial
            low, high = checked[key][kind]
            samples = [low, high, *([low + 0.37 * (high - low)] if kind == "float" else [])]
        for value in samples:
            trial_config(study, {key: value})
    enqueue = study.tune.get("enqueue") or []
    for values in enqueue if isinstance(enqueue, list) else [None]:
        if not isinstance(values, dict) or set(values) - set(checked):
            raise ConfigError(f"{where}: tune.enqueue must be a list of {{key: value}} settings of search keys "
                              f"({', '.join(checked)}), got {values!r}")
        trial_config(study, values)
    return checked


def finite_number(value: Any, integer: bool = False) -> Optional[float]:
    """`value` as a number (YAML reads 1e-4 without a dot as text: numeric text counts), or None when it
    is not a finite number (an integer where `integer`)."""
    if isinstance(value, bool):
        return None
    if integer:
        return value if isinstance(value, int) else None
    try:
        number = float(value) if isinstance(value, (int, float, str)) else None
    except ValueError:
        return None
    return number if number is not None and math.isfinite(number) else None


def range_spec(where: Path, key: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A float / int range with its bounds and step as numbers, or a ConfigError naming what Optuna would refuse."""
    integer, name = kind == "int", f"{where}: search.{key}"
    low, high = (finite_number(v, integer) for v in spec[kind])
    if low is None or high is None:
        bad = spec[kind][0] if low is None else spec[kind][1]
        raise ConfigError(f"{name}.{kind}: {bad!r} is not {'an integer' if integer else 'a finite number'}")
    if not low < high:
        raise ConfigError(f"{name}.{kind} must be [low, high] with low < high, got {spec[kind]}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{name}.log must be true or false, got {log!r}")
    step = spec.get("step")
    if step is not None and (finite_number(step, integer) is None or finite_number(step, integer) <= 0):
        raise ConfigError(f"{name}.step must be {'an integer' if integer else 'a number'} > 0, got {step!r}")
    if log and step is not None:
        raise ConfigError(f"{name}: log: true and a step do not go together (Optuna samples a log range without steps)")
    if log and (low < 1 if integer else low <= 0):
        raise ConfigError(f"{name} is log-scaled, so its low end must be {'>= 1' if integer else '> 0'}, got {low}")
    checked = {kind: [low, high], "log": log}
    if step is not None:
        checked["step"] = finite_number(step, integer)
    return checked


def choice_spec(where: Path, key: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A choice, each one a value Optuna stores as a categorical (no lists or mappings), without log or step."""
    if set(spec) != {"choice"}:
        raise ConfigError(f"{where}: search.{key}: log and step are for float and int ranges, not choices")
    for value in spec["choice"]:
        if not (value is None or isinstance(value, (bool, int, float, str))):
            raise ConfigError(f"{where}: search.{key}.choice: {value!r} is not a number, string, boolean or null "
                              "(Optuna's choices; a list of settings is a study variant)")
    return {"choice": list(spec["choice"])}


def trial_config(study: Study, values: dict[str, Any], overrides: Optional[list[str]] = None) -> Config:
    """The study's base config with a trial's `values` (validated: a bad key or value is named)."""
    return config_with(study.base, values, overrides, f"{study.path} (search values {values})")
