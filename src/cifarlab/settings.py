"""Nested settings as flat dotted keys (for config diffs and for loggers' params); imports nothing."""

from __future__ import annotations

from typing import Any


def flat_settings(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"epochs": 10}} -> {"train.epochs": 10}: every leaf by its dotted key (lists, None and
    empty sections stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flat_settings(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
