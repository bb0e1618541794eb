"""YAML files and `a.b.c=value` overrides: reading YAML within limits that refuse hostile documents,
and parsing and applying overrides to a tree of plain data."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

import yaml

from .errors import ConfigError


# A config is small data. These limits refuse, in well under a second, YAML made to hurt: a huge
# file, nesting deep enough to exhaust the recursion limit, or aliases that expand exponentially
# (a "billion laughs" document is a few hundred bytes).
MAX_YAML_BYTES = 1 << 20
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000


class _LimitedLoader(yaml.SafeLoader):
    """yaml.SafeLoader (plain data only: no tags that construct objects) that also refuses deep
    nesting and documents whose aliases expand to more than MAX_YAML_NODES nodes."""

    depth = 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise yaml.YAMLError(f"nested more than {MAX_YAML_DEPTH} levels deep")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_document(self, node):
        expanded_size(node, {})
        return super().construct_document(node)


def expanded_size(node, seen: dict[int, int]) -> int:
    """How many nodes `node` stands for once every alias is expanded (shared nodes counted at each
    use, as json or pydantic would copy them); refuses more than MAX_YAML_NODES."""
    if id(node) in seen:
        return seen[id(node)]
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(expanded_size(child, seen) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(expanded_size(k, seen) + expanded_size(v, seen) for k, v in node.value)
    if size > MAX_YAML_NODES:
        raise yaml.YAMLError(f"expands to more than {MAX_YAML_NODES:,} values (aliases)")
    seen[id(node)] = size
    return size


def parse_yaml(text: str):
    """Plain data from YAML text, within the limits above."""
    return yaml.load(text, Loader=_LimitedLoader)  # noqa: S506 - a SafeLoader subclass


def read_yaml(path: Union[str, Path]) -> dict[str, Any]:
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_YAML_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for a config "
                              f"(at most {MAX_YAML_BYTES:,})")
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (a config is UTF-8 YAML)") from None
    try:
        tree = parse_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: is not valid YAML (nested too deeply)") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(tree).__name__}")
    return tree


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value read as YAML (numbers, true, [1, 2])."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.path=value, e.g. train.epochs=5")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[: i + 1])} is not a section")
        node = child
    node[path[-1]] = value
