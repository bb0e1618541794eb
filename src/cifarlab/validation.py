"""The text of config validation errors: a registry-backed choice worded like pydantic's own, and
pydantic's errors as one line that names each key (and, for an unknown key, the allowed ones)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


def one_of(names: Any, value: Any) -> Any:
    """`value` if it is one of `names` (a registry's keys), else pydantic's own wording for a Literal
    mismatch, so a registry-backed key reads like every other choice."""
    names = list(names)  # a list, not the registry: an unhashable value (a YAML list) must fail as a mismatch
    if value in names:
        return value
    quoted = [repr(name) for name in names]
    choices = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
    raise ValueError(f"Input should be {choices}")


def describe_validation_error(error: ValidationError, root: type[BaseModel]) -> str:
    """The errors of validating `root` as one line: each names its key, and an unknown key the allowed ones."""
    problems = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(allowed_keys(root, item["loc"][:-1]))
            problems.append(f"{key}: unknown key (allowed: {allowed})")
        else:
            message = item["msg"].removeprefix("Value error, ")
            where = f"{key}: " if key and not message.startswith(key) else ""
            shown = item.get("input")
            value = f" (got {shown!r})" if key and not isinstance(shown, (dict, list)) else ""
            problems.append(f"{where}{message}{value}")
    return "; ".join(problems)


def allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """The keys of the section of `root` at `loc` (a key path); none when `loc` names no section."""
    model: Any = root
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))
