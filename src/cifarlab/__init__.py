"""cifarlab: train and study small CNNs on CIFAR-10 and its cousins.

    import cifarlab
    run = cifarlab.fit("configs/quickstart.yaml", overrides={"train.epochs": 5})
    run.summary["test_acc"], run.history, run.predict(images), run.report()

The names below are imported on first use, so `import cifarlab` (and the command line) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "fit": "api", "resume": "api", "load_run": "api", "Run": "api", "evaluate_run": "api", "predict_files": "api",
    "run_study": "api", "StudyResult": "api", "default_callbacks": "api", "tune": "tuning", "TuneResult": "tuning",
    "load_study": "sweep", "Study": "sweep",
    "Config": "config", "load_config": "config",
    "Callback": "train.callbacks", "Monitor": "train.monitor", "EarlyStopping": "train.callbacks",
    "Trainer": "train.trainer",
    "CifarlabError": "errors", "ConfigError": "errors", "DataError": "errors", "TrainingFailed": "errors",
    "Interrupted": "errors", "WriteError": "errors", "RunInUse": "errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports on first use
    from .api import Run, StudyResult, default_callbacks, evaluate_run, fit, load_run, predict_files, resume, run_study  # noqa: F401
    from .config import Config, load_config  # noqa: F401
    from .errors import (CifarlabError, ConfigError, DataError, Interrupted, RunInUse, TrainingFailed,  # noqa: F401
                         WriteError)
    from .sweep import Study, load_study  # noqa: F401
    from .train.callbacks import Callback, EarlyStopping  # noqa: F401
    from .train.monitor import Monitor  # noqa: F401
    from .train.trainer import Trainer  # noqa: F401
    from .tuning import TuneResult, tune  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cifarlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
