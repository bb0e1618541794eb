"""The configuration: one pydantic model per section, YAML loading and `a.b.c=value` overrides.

Every key has a default, so an empty config is a valid run. Unknown keys and bad values fail here,
before any work starts, with a message that names the key and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import ConfigError

DATASETS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "synthetic")
AUGMENT_PRESETS = {
    "none": {"crop": 0, "flip": False},
    # report 001: RandomCrop(32, padding=4) + RandomHorizontalFlip()
    "crop-flip": {"crop": 4, "flip": True},
}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    dataset: Literal["cifar10", "cifar100", "mnist", "fashion-mnist", "synthetic"] = "cifar10"
    # A directory holding the dataset (or its official sub-folder), a local .tar.gz, or empty:
    # then the cache ($CIFARLAB_DATA, default ~/.cache/cifarlab) and the system locations are searched.
    root: Optional[str] = None
    format: Literal["auto", "python", "binary"] = "auto"  # CIFAR-10 layout; auto prefers python
    labels: Literal["fine", "coarse"] = "fine"  # CIFAR-100 only
    download: bool = False  # fetch into the cache when nothing is found locally
    val_size: float = Field(0.1, ge=0)  # fraction of the training set if < 1, else a count
    stratify: bool = True
    normalize: bool = True  # per-channel mean/std; from the training split unless mean/std given
    mean: Optional[list[float]] = None  # in [0, 1] units, one per channel
    std: Optional[list[float]] = None
    train_limit: Optional[int] = Field(None, gt=0)  # keep only the first N training images
    test_limit: Optional[int] = Field(None, gt=0)  # keep only the first N test images

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise ValueError(f"data.val_size={self.val_size}: use a fraction below 1 or a whole count")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both data.mean and data.std, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"data.std={self.std}: every value must be > 0")
        return self


class AugmentConfig(Section):
    preset: Literal["none", "crop-flip"] = "none"
    # None means "what the preset says"; the resolved config always holds numbers.
    crop: Optional[int] = Field(None, ge=0)  # pad this many pixels (zeros) then crop back
    flip: Optional[bool] = None  # random horizontal flip, p = 0.5

    @model_validator(mode="after")
    def _fill_from_preset(self) -> "AugmentConfig":
        for key, value in AUGMENT_PRESETS[self.preset].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        return self


class ModelConfig(BaseModel):
    """`preset` names a file in models/presets; extra keys set that preset's parameters.
    `layers` gives the network inline instead (see models/build.py for the layer kinds)."""

    model_config = ConfigDict(extra="allow")

    preset: Optional[str] = "cnn3-avg"
    layers: Optional[list[Any]] = None

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        from .models.build import check_model_config

        if self.layers is not None:
            if "preset" in self.model_fields_set and self.preset is not None:
                raise ValueError("give model.preset or model.layers, not both")
            object.__setattr__(self, "preset", None)
        check_model_config(self.preset, self.layers, dict(self.model_extra or {}))
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class OptimConfig(Section):
    name: Literal["sgd", "adam"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd
    nesterov: bool = False  # sgd, needs momentum > 0
    betas: tuple[float, float] = (0.9, 0.999)  # adam
    weight_decay: float = Field(0.0, ge=0)  # decoupled into the optimizer step (torch semantics)
    l2: float = Field(0.0, ge=0)  # Keras kernel_regularizer: loss += l2 * sum(w**2) over conv/dense kernels

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("optim.nesterov=true needs optim.name=sgd and optim.momentum > 0")
        return self


class ScheduleConfig(Section):
    name: Literal["constant", "step", "cosine"] = "constant"
    step_size: int = Field(10, gt=0)  # step: epochs between decays
    gamma: float = Field(0.1, gt=0)  # step: decay factor
    min_lr: float = Field(0.0, ge=0)  # cosine: final learning rate


class EarlyStoppingConfig(Section):
    enabled: bool = True
    monitor: Literal["val_acc", "val_loss", "train_acc", "train_loss"] = "val_acc"
    patience: int = Field(5, ge=0)  # epochs without improvement before stopping (report 001: 5)
    min_delta: float = Field(0.0, ge=0)  # an improvement must beat the best by more than this
    restore_best: bool = True  # evaluate and save the best epoch's weights, not the last


class TrainConfig(Section):
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(1024, gt=0)
    log_every: int = Field(200, gt=0)  # steps between running loss/accuracy lines (report 003)
    out_dir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool = True
    compile: bool = False
    threads: Optional[int] = Field(None, gt=0)  # CPU threads; default: every core
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)


class Config(Section):
    name: Optional[str] = None  # run name; default "<preset>-<dataset>"
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="after")
    def _check(self) -> "Config":
        es = self.train.early_stopping
        if es.enabled and es.monitor.startswith("val_") and self.data.val_size == 0:
            raise ValueError(
                f"train.early_stopping.monitor={es.monitor} needs data.val_size > 0 "
                "(or monitor a train_ metric, or set train.early_stopping.enabled=false)"
            )
        return self

    def run_name(self) -> str:
        return self.name or f"{self.model.preset or 'custom'}-{self.data.dataset}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value), the value read as YAML (numbers, true, [1, 2])."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: expected key.path=value, e.g. train.epochs=5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
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


def read_yaml(path: Union[str, Path]) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror or e})") from None
    try:
        tree = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got {type(tree).__name__}")
    return tree


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> Config:
    """The resolved config: defaults, then the YAML file, then the overrides, in that order."""
    tree = read_yaml(path) if path else {}
    for text in overrides or []:
        apply_override(tree, *parse_override(text))
    return config_from_dict(tree, source=str(path) if path else "config")


def config_from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"{source}: {describe_validation_error(e)}") from None


def describe_validation_error(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            allowed = ", ".join(allowed_keys(item["loc"][:-1]))
            problems.append(f"{key}: unknown key (allowed: {allowed})")
        else:
            message = item["msg"].removeprefix("Value error, ")
            where = f"{key}: " if key and not message.startswith(key) else ""
            shown = item.get("input")
            value = f" (got {shown!r})" if key and not isinstance(shown, (dict, list)) else ""
            problems.append(f"{where}{message}{value}")
    return "; ".join(problems)


def allowed_keys(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def write_config(config: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
