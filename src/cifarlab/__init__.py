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
    "default_callbacks": "api", "run_config": "api", "launches": "api", "reports_runs": "api", "compare_runs": "api",
    "run_study": "experiments", "StudyResult": "experiments", "plan_study": "experiments", "StudyPlan": "experiments",
    "export_study": "experiments", "tune": "experiments", "tune_worker": "experiments", "TuneResult": "studies.tune",
    "load_study": "studies.spec", "Study": "studies.spec",
    "dataset_info": "explore", "dataset_stats": "explore", "dataset_samples": "explore", "download_dataset": "explore",
    "augment_figure": "explore", "presets": "explore", "model_summary": "explore", "summary": "explore",
    "choose_demo_data": "demo", "export_run": "export", "FIGURES": "analysis.figures", "run_entry_point": "processes",
    "Config": "config", "load_config": "config",
    "Callback": "hooks", "Monitor": "train.monitor", "EarlyStopping": "train.callbacks",
    "Trainer": "train.trainer",
    "CifarlabError": "errors", "ConfigError": "errors", "DataError": "errors", "TrainingFailed": "errors",
    "Interrupted": "errors", "WriteError": "errors", "RunInUse": "errors",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports on first use
    from .analysis.figures import FIGURES  # noqa: F401
    from .api import (Run, compare_runs, default_callbacks, evaluate_run, fit, launches, load_run,  # noqa: F401
                      predict_files, reports_runs, resume, run_config)
    from .experiments import StudyPlan, StudyResult, export_study, plan_study, run_study, tune, tune_worker  # noqa: F401
    from .demo import choose_demo_data  # noqa: F401
    from .explore import (augment_figure, dataset_info, dataset_samples, dataset_stats, download_dataset,  # noqa: F401
                          model_summary, presets, summary)
    from .export import export_run  # noqa: F401
    from .processes import run_entry_point  # noqa: F401
    from .config import Config, load_config  # noqa: F401
    from .errors import (CifarlabError, ConfigError, DataError, Interrupted, RunInUse, TrainingFailed,  # noqa: F401
                         WriteError)
    from .studies.spec import Study, load_study  # noqa: F401
    from .studies.tune import TuneResult  # noqa: F401
    from .hooks import Callback  # noqa: F401
    from .train.callbacks import EarlyStopping  # noqa: F401
    from .train.monitor import Monitor  # noqa: F401
    from .train.trainer import Trainer  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cifarlab' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
