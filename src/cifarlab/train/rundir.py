"""The run directory of a trainer, as a mixin of Trainer (train/trainer.py) so that no type import
points up: creating it (config.yaml, env.json, the run lock), taking it up again to resume, and
summary.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .. import runs
from ..config import write_config
from ..data.local import content_checksum
from ..models.summary import count_params
from .checkpoint import Checkpointing


class RunDirectory(Checkpointing):
    """Where a run writes (see runs.py for what each file holds)."""

    run_dir: Optional[Path]
    lock: Optional[runs.RunLock]
    resuming: bool

    def summary_base(self) -> dict[str, Any]:
        trainable, non_trainable = count_params(self.model)
        sizes = {name: len(getattr(self.splits, name)[1]) for name in ("train", "val", "test")}
        return {"run": self.run_dir.name, "dataset": self.splits.dataset.name, "model": self.config.model.name(),
                "sizes": sizes, "params": {"trainable": trainable, "non_trainable": non_trainable},
                "normalization": {"mean": self.splits.mean, "std": self.splits.std}, "classes": self.classes,
                "input_shape": list(self.input_shape), "device": str(self.device),
                "devices": self.config.train.devices, "world_size": self.strategy.world,
                "monitor": self.config.train.early_stopping.monitor}

    def write_summary(self, status: str, stop_reason: str, **fields: Any) -> dict[str, Any]:
        """summary.json (written by rank 0 only); returns its contents."""
        summary = {**self.summary_base(), "status": status, "stop_reason": stop_reason, "epochs_run": self.epoch,
                   **fields}
        if self.strategy.is_main:
            runs.write_json(self.run_dir / runs.SUMMARY, summary)
        return summary

    def start(self, run_dir: Optional[Path] = None) -> Path:
        """A new run directory (`run_dir` if given) with config.yaml and env.json, made by rank 0 (the
        other ranks learn its path)."""
        if self.strategy.is_main:
            self.run_dir = runs.create_run_dir(self.config.train.out_dir, self.config.run_name(), run_dir)
            self.lock = runs.RunLock(self.run_dir).acquire()
            try:
                write_config(self.config, self.run_dir / runs.CONFIG)
                runs.write_json(self.run_dir / runs.ENV, {**runs.environment(str(self.device), self.config.seed),
                                                          "data_origin": self.splits.dataset.origin,
                                                          "data_sha256": content_checksum(self.splits.dataset)})
            except BaseException:
                self.lock.release()
                raise
        self.run_dir = Path(self.strategy.share(str(self.run_dir)))
        return self.run_dir

    def resume_from(self, run_dir: Path, state: dict[str, Any], lock: Optional[runs.RunLock]) -> Path:
        """Take up `run_dir` from its last.pt `state` (end of an epoch, or the step of an interrupt),
        holding its `lock` until fit() ends."""
        self.lock = lock
        self.restore(state, run_dir / runs.CHECKPOINTS / "last.pt")
        self.check_unfinished(run_dir)
        self.run_dir, self.resuming = run_dir, True
        if self.strategy.is_main:
            write_config(self.config, run_dir / runs.CONFIG)
            (run_dir / runs.SUMMARY).unlink(missing_ok=True)
        return run_dir
