"""What a run saves to continue exactly, and the rules for continuing it: the state of last.pt
(weights, optimizer, schedule, gradient scaler, callbacks, RNG states, progress, the position inside
an interrupted epoch), putting that state back into a trainer, re-applying the config's optimizer
settings over a loaded optimizer, and the settings a resumed run may not change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .. import runs
from ..config import Config
from ..data.prepare import Splits
from ..errors import ConfigError
from .optim import make_optimizer
from .schedules import LRSchedule
from .strategy import SingleProcess

# What a resumed run must share with its checkpoint: the network, the data and its split (seed). A new
# data.root (the data moved) or train.* / optim.* / schedule.* settings are allowed.
FIXED_ON_RESUME = ("model", "data", "seed")
# and single keys: another optimizer cannot take the saved state (nor other parameter groups: bias_lr_scale
# splits the biases off); the batch size sets the step count the schedule and a mid-epoch position are measured in
FIXED_KEYS_ON_RESUME = (("optim", "name"), ("optim", "bias_lr_scale"), ("train", "batch_size"))
MOVABLE_DATA_KEYS = ("root", "download")


def state_keys(callbacks: Sequence[Any]) -> list[str]:
    """Each callback's key in last.pt: its state_key or class name, numbered when repeated."""
    keys: list[str] = []
    for callback in callbacks:
        base = getattr(callback, "state_key", None) or type(callback).__name__
        key, n = base, 1
        while key in keys:
            n += 1
            key = f"{base}#{n}"
        keys.append(key)
    return keys


class Checkpointing:
    """The trainer's checkpoint state, as a mixin of Trainer (train/trainer.py) so that no type import
    points up: what best.pt and last.pt hold, and putting last.pt back."""

    config: Config
    model: nn.Module
    device: torch.device
    classes: list[str]
    input_shape: tuple[int, int, int]
    splits: Splits
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    augment_generator: torch.Generator
    strategy: SingleProcess
    callbacks: list[Any]
    callback_keys: list[str]
    rank_states: list[dict[str, Any]]
    position: Optional[dict[str, Any]]
    history: list[dict[str, Any]]
    epoch: int
    step: int
    train_time: float
    images_seen: int

    def weights_state(self) -> dict[str, Any]:
        """What best.pt holds: the current weights and what is needed to use them."""
        return {"config": self.config.to_dict(), "classes": self.classes, "input_shape": list(self.input_shape),
                "normalization": self.splits.normalization(), "epoch": self.epoch, "model": self.model.state_dict()}

    def rng_state(self) -> dict[str, Any]:
        """This rank's own random states: augmentation generator, torch (and CUDA) RNG."""
        device = self.device
        return {"augment": self.augment_generator.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}

    def checkpoint_state(self, position: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, schedule, callbacks, RNG states,
        progress (with several ranks also every rank's RNG states, under "ranks")."""
        ranks = {"ranks": self.rank_states} if self.rank_states else {}
        return {**self.weights_state(), **ranks, "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(), "scaler": self.scaler.state_dict(),
                "callbacks": {key: cb.state_dict() for key, cb in zip(self.callback_keys, self.callbacks)
                              if hasattr(cb, "state_dict")},
                "generator": self.generator.get_state() if position is None else position["generator"],
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                "progress": {"step": self.step, "train_time": self.train_time, "images_seen": self.images_seen,
                             "history": self.history},
                "position": position}

    def apply_optim_settings(self) -> None:
        """The config's optimizer settings over the ones a loaded optimizer state brought back (a resumed
        run may change optim.lr, weight_decay, momentum, ...; the moments and step counts stay)."""
        fresh = make_optimizer(self.config.optim, self.model).param_groups
        for group, new in zip(self.optimizer.param_groups, fresh):
            group.update({k: v for k, v in new.items() if k != "params"})
            group["initial_lr"] = new["lr"]  # the schedule multiplies this

    def restore(self, state: dict[str, Any], source: Path) -> None:
        """Put a last.pt `state` back (read from `source`, named in errors)."""
        runs.load_weights(self.model, state["model"], source)
        self.optimizer.load_state_dict(state["optimizer"])
        self.apply_optim_settings()
        self.schedule.load_state_dict(state["schedule"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        saved = state.get("callbacks", {})
        for key, callback in zip(self.callback_keys, self.callbacks):
            if key in saved and hasattr(callback, "load_state_dict"):
                callback.load_state_dict(saved[key])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        progress = state["progress"]
        self.epoch, self.step = state["epoch"], progress["step"]
        self.train_time, self.images_seen = progress["train_time"], progress["images_seen"]
        self.history = list(progress["history"])
        self.position = state["position"]
        if "ranks" in state:  # a data-parallel run: this rank's own draws
            own = state["ranks"][self.strategy.rank]
            self.augment_generator.set_state(own["augment"])
            torch.set_rng_state(own["torch_rng"])
            if own["cuda_rng"] is not None:
                torch.cuda.set_rng_state(own["cuda_rng"], self.device)

    def check_unfinished(self, run_dir: Path) -> None:
        """Refuse to resume a completed run that has nothing left to train (a run killed after its last
        epoch's last.pt but before summary.json only needs its test score, so it may resume)."""
        finished = (run_dir / runs.SUMMARY).is_file() and runs.read_summary(run_dir).get("status") == "completed"
        epochs = self.config.train.epochs
        if self.position is None and self.epoch >= epochs and finished:
            raise ConfigError(f"{run_dir}: already trained {self.epoch} of train.epochs={epochs}; "
                              "pass train.epochs=N to train longer")


def check_resumable(saved: dict[str, Any], config: Config, run_dir: Path) -> None:
    """Refuse overrides that cannot apply to a run's checkpoint (ConfigError naming the key)."""
    now = config.to_dict()
    devices = saved.get("train", {}).get("devices", 1)  # runs from before train.devices had one
    if saved and devices != config.train.devices:
        raise ConfigError(f"{run_dir}: train.devices cannot change when resuming (it was {devices}, now "
                          f"{config.train.devices}): the ranks' random draws and the data order would not continue "
                          "exactly; start a new run instead")
    for section in FIXED_ON_RESUME:
        before, after = saved.get(section), now.get(section)
        if isinstance(before, dict) and isinstance(after, dict):
            # model: any key (preset parameters are free-form); data: a key the checkpoint lacks is a
            # setting added to cifarlab since, which keeps its default
            keys = set(before) | set(after) if section == "model" else set(before) & set(after)
            changed = [f"{section}.{k}" for k in sorted(keys)
                       if before.get(k) != after.get(k) and not (section == "data" and k in MOVABLE_DATA_KEYS)]
            if changed:
                key = changed[0]
                leaf = key.split(".", 1)[1]
                raise ConfigError(f"{run_dir}: {key} cannot change when resuming (it was {before.get(leaf)!r}, "
                                  f"now {after.get(leaf)!r}); start a new run instead")
        elif saved and before != after:
            raise ConfigError(f"{run_dir}: {section} cannot change when resuming (it was {before!r}, now {after!r})")
    for section, key in FIXED_KEYS_ON_RESUME:
        before, after = saved.get(section, {}).get(key), now.get(section, {}).get(key)
        if before is not None and before != after:
            raise ConfigError(f"{run_dir}: {section}.{key} cannot change when resuming (it was {before!r}, "
                              f"now {after!r}); start a new run instead")

