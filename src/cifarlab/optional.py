"""Optional packages (the export and loggers extras): imported when a feature needs them, with one
error naming what is missing and the pip command that installs it."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import ConfigError


def optional_modules(packages: dict[str, str], purpose: str, extra: str) -> dict[str, ModuleType]:
    """Import `packages` (module name -> the pip package that provides it), or a ConfigError saying
    that `purpose` needs the missing ones and `pip install "cifarlab[extra]"` installs them."""
    modules, missing = {}, []
    for module, package in packages.items():
        try:
            modules[module] = importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        plural = len(missing) > 1
        raise ConfigError(f"{purpose} needs the package{'s' if plural else ''} {', '.join(missing)}, which "
                          f"{'are' if plural else 'is'} not installed; install it with: pip install \"cifarlab[{extra}]\"")
    return modules
