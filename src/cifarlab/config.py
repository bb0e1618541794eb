"""The configuration: one pydantic model per section, loading (YAML, dict or Config, then overrides),
validation-error text, and writing and comparing configs. Reading YAML and parsing overrides is yamlfiles.py.

Every key has a default, so an empty config is a valid run. Unknown keys and bad values fail here,
before any work starts, with a message that names the key and what is allowed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from .data import sources
from .errors import ConfigError
from .files import atomic_write
from .settings import flat_settings
from .sections import AUGMENT_PRESETS, AugmentConfig, Section  # noqa: F401 (AUGMENT_PRESETS: re-exported)
from .consistency import check_across_sections
from .validation import describe_validation_error, one_of
from .yamlfiles import apply_override, parse_override, read_yaml

DATASETS = tuple(sources.DATASETS)  # the data.dataset names, from the registry in data/sources.py

# train.tta: the test-time augmentations evaluation.tta_views knows (export offers the same)
TTA_MODES = ("none", "flip", "flip-shift")

PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class DataConfig(Section):
    dataset: str = "cifar10"  # a name in data/sources.py DATASETS
    # A directory holding the dataset (or its official sub-folder), a local .tar.gz, or empty:
    # then the cache ($CIFARLAB_DATA, default ~/.cache/cifarlab) and the system locations are searched.
    root: Optional[str] = None
    format: Literal["auto", "python", "binary"] = "auto"  # CIFAR-10 layout; auto prefers python
    labels: Literal["fine", "coarse"] = "fine"  # CIFAR-100 only
    download: bool = False  # fetch into the cache when nothing is found locally
    image_size: Optional[Union[int, tuple[int, int]]] = None  # folder: resize to this (H = W, or [H, W]); None: most common
    test_size: float = Field(0.2, gt=0, lt=1)  # folder with one tree of classes: the test fraction (seeded, stratified)
    val_size: float = Field(0.1, ge=0)  # fraction of the training set if < 1, else a count
    stratify: bool = True
    # per-channel mean/std of the raw training split unless mean/std given (Keras featurewise_center +
    # featurewise_std_normalization); center: the mean only (featurewise_center alone); false: neither
    normalize: Union[bool, Literal["center"]] = True
    # per image, before normalize (Keras samplewise_center; std: samplewise_std_normalization, centering too)
    samplewise: Literal["none", "center", "std"] = "none"
    zca: bool = False  # ZCA whitening fitted on the training split, after normalization (Keras zca_whitening)
    zca_epsilon: float = Field(1e-6, gt=0)
    mean: Optional[list[float]] = None  # in [0, 1] units, one per channel
    std: Optional[list[float]] = None
    train_limit: Optional[int] = Field(None, gt=0)  # keep only the first N training images
    test_limit: Optional[int] = Field(None, gt=0)  # keep only the first N test images

    @field_validator("dataset", mode="before")
    @classmethod
    def _known_dataset(cls, name: Any) -> Any:
        return one_of(sources.DATASETS, name)

    @field_validator("normalize", mode="before")
    @classmethod
    def _normalize_mode(cls, value: Any) -> Any:  # one message, not one per member of the union
        if value == "center":
            return value
        try:
            return TypeAdapter(bool).validate_python(value)  # what the plain bool key accepted
        except ValidationError:
            raise ValueError("must be true, false or center (the training mean only: Keras featurewise_center)") from None

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise ValueError(f"data.val_size={self.val_size}: use a fraction below 1 or a whole count")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both data.mean and data.std, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"data.std={self.std}: every value must be > 0")
        return self


# The framework flavors of the top-level `defaults` key (see train/formulas.py FLAVOR_OPTIM_DEFAULTS and
# models/build.py FLAVOR_LAYER_DEFAULTS): whose defaults fill the keys a config leaves out, and whose
# update rules the optimizers follow.
Flavor = Literal["torch", "keras", "tf1"]


class ModelConfig(BaseModel):
    """`preset` names a file in models/presets; extra keys set that preset's parameters.
    `layers` gives the network inline instead (see models/layers.py for the layer kinds)."""

    model_config = ConfigDict(extra="allow")

    preset: Optional[str] = "cnn3-avg"
    layers: Optional[list[Any]] = None
    module: Optional[str] = None  # your nn.Module: "package.module:Factory" or "file.py:Factory" (imports it)
    args: dict[str, Any] = {}  # keyword arguments of model.module's factory
    given: Optional[str] = None  # recorded: a model passed to fit(model=) that cannot be imported again
    defaults: Optional[Flavor] = None  # layer defaults (init, BatchNorm) of a framework; None: the top-level `defaults`

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        from .models.build import check_model_config

        if self.layers is not None or self.module is not None or self.given is not None:
            if "preset" in self.model_fields_set and self.preset is not None:
                raise ValueError("give one of model.preset, model.layers or model.module")
            object.__setattr__(self, "preset", None)
        module = check_model_config(self.preset, self.layers, dict(self.model_extra or {}), self.module,
                                    self.args, self.given)
        object.__setattr__(self, "module", module)
        return self

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def name(self) -> str:
        """The preset's name, your factory's name (model.module), or "custom" (model.layers)."""
        own = (self.module or self.given or "").replace(":", ".").split(".")[-1].split()
        name = own[-1] if own else ""
        return self.preset or (name if PLAIN_NAME.fullmatch(name) else "custom")


class OptimConfig(Section):
    """Keys left out take the framework flavor's defaults (`defaults`, else the top-level `defaults`:
    train/formulas.py FLAVOR_OPTIM_DEFAULTS); keys given always win."""

    defaults: Optional[Flavor] = None  # update rules and defaults of a framework; None: the top-level `defaults`
    name: str = "adam"  # a name in train/optim.py OPTIMIZERS
    lr: float = Field(1e-3, gt=0)  # keras flavor: sgd 0.01; tf1: sgd, adagrad, rmsprop, proximal-adagrad need one
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd, rmsprop
    nesterov: bool = False  # sgd, needs momentum > 0
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    eps: Optional[float] = Field(None, ge=0)  # adam(w), adagrad, rmsprop, adadelta; default: the flavor's
    alpha: float = Field(0.99, gt=0, lt=1)  # rmsprop smoothing (Keras rho; keras / tf1 flavors 0.9)
    rho: float = Field(0.9, gt=0, lt=1)  # adadelta (keras / tf1 flavors 0.95)
    initial_accumulator: Optional[float] = Field(None, ge=0)  # adagrad 0 (keras / tf1 0.1), rmsprop (tf1 1), prox 0.1
    prox_l1: float = Field(0.0, ge=0)  # proximal-adagrad l1_regularization_strength
    prox_l2: float = Field(0.0, ge=0)  # proximal-adagrad l2_regularization_strength
    weight_decay: float = Field(0.0, ge=0)  # inside the optimizer step (torch semantics; decoupled for adamw; keras adamw 0.004)
    l2: float = Field(0.0, ge=0)  # Keras kernel_regularizer: loss += l2 * sum(w**2) over conv/dense kernels
    l2_layers: Optional[list[str]] = None  # only these layers' kernels (e.g. [conv1, fc1]); default all
    clip_norm: Optional[float] = Field(None, gt=0)  # clip the global gradient norm to this
    # biases (every parameter named *.bias) at this x lr, with weight_decay / this (airbench: 64)
    bias_lr_scale: float = Field(1.0, gt=0)
    muon_lr: float = Field(0.05, gt=0)  # muon: the learning rate of the 4-D conv filters (optim.lr: the rest)

    @field_validator("name", mode="before")
    @classmethod
    def _known_optimizer(cls, name: Any) -> Any:
        from .train.optim import OPTIMIZERS  # here, not at the top: torch is slow to import

        return one_of(OPTIMIZERS, name)

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.nesterov and (self.name not in ("sgd", "muon") or self.momentum == 0):
            raise ValueError("optim.nesterov=true needs optim.name=sgd (or muon) and optim.momentum > 0")
        if (self.prox_l1 or self.prox_l2) and self.name != "proximal-adagrad":
            raise ValueError("optim.prox_l1 / prox_l2 need optim.name=proximal-adagrad (for Keras L2 use optim.l2)")
        self.apply_flavor()
        return self

    def apply_flavor(self) -> None:
        """Fill the keys the config left out with the flavor's values for this optimizer (torch: none, so
        torch's own defaults stay), then refuse what the framework refuses."""
        from .train.formulas import flavor_optim_values, missing_required

        if self.defaults not in (None, "torch"):
            missing = missing_required(self.defaults, self.name, self.model_fields_set)
            if missing:
                raise ValueError(missing)
            for key, value in flavor_optim_values(self.defaults, self.name).items():
                if key not in self.model_fields_set:
                    object.__setattr__(self, key, value)
        if self.name == "proximal-adagrad" and self.initial_accumulator == 0:
            raise ValueError("optim.initial_accumulator=0: proximal-adagrad needs a value > 0 "
                             "(TensorFlow refuses 0; its default is 0.1)")
        if self.name == "adagrad" and self.defaults == "tf1" and self.eps == 0 and self.initial_accumulator == 0:
            raise ValueError("optim.initial_accumulator=0: TensorFlow 1's Adagrad has no epsilon and refuses 0 "
                             "(its default is 0.1)")


class ScheduleConfig(Section):
    """Learning rate per step = optim.lr x the schedule's factor (see train/schedules.py LRSchedule)."""

    name: str = "constant"  # a name in train/schedules.py SCHEDULES
    step_size: int = Field(10, gt=0)  # step: epochs between decays
    milestones: list[int] = Field(default_factory=lambda: [30, 60])  # multistep: epochs where lr decays
    gamma: float = Field(0.1, gt=0)  # step, multistep, exponential: decay factor
    min_lr: float = Field(0.0, ge=0)  # cosine: final learning rate
    pct_start: float = Field(0.3, gt=0, lt=1)  # onecycle: fraction of training spent rising
    div_factor: float = Field(25.0, gt=1)  # onecycle: start lr = lr / div_factor
    final_div_factor: float = Field(1e4, gt=1)  # onecycle: end lr = start lr / final_div_factor
    warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up from 0, before any schedule
    monitor: Literal["val_acc", "val_loss", "train_acc", "train_loss", "test_acc", "test_loss"] = "val_loss"
    factor: float = Field(0.1, gt=0, lt=1)  # plateau: lr multiplier
    patience: int = Field(2, ge=0)  # plateau: epochs without improvement before reducing
    threshold: float = Field(0.0, ge=0)  # plateau: an improvement must exceed this

    @field_validator("name", mode="before")
    @classmethod
    def _known_schedule(cls, name: Any) -> Any:
        from .train.schedules import SCHEDULES  # here, not at the top: torch is slow to import

        return one_of(SCHEDULES, name)


class DivergenceConfig(Section):
    """Report 000's rule: after `warmup` epochs, stop once validation loss rose while training loss
    fell for `epochs` consecutive epochs."""

    enabled: bool = False
    warmup: int = Field(5, ge=0)
    epochs: int = Field(3, gt=0)


class TargetConfig(Section):
    """Stop when a metric reaches a value (report 004: train_acc 0.995)."""

    metric: Optional[Literal["val_acc", "val_loss", "train_acc", "train_loss", "test_acc", "test_loss"]] = None
    value: float = 0.995


class EarlyStoppingConfig(Section):
    enabled: bool = True
    monitor: Literal["val_acc", "val_loss", "train_acc", "train_loss"] = "val_acc"  # also picks best.pt
    patience: int = Field(5, ge=0)  # epochs without improvement before stopping (report 001: 5)
    min_delta: float = Field(0.0, ge=0)  # an improvement must beat the best by more than this
    restore_best: bool = True  # with train.test_weights=auto: test the best epoch's weights, not the last


class LookaheadConfig(Section):
    """airbench's lookahead of the weights towards their moving average (train/callbacks.py Lookahead)."""

    every: int = Field(0, ge=0)  # steps between updates; 0: off (airbench: 5)
    decay: float = Field(0.95 ** 5, ge=0, le=1)  # the average's decay at the last step (airbench: 0.95^5)
    power: float = Field(3.0, ge=0)  # decay at step s: decay x (s / total steps)^power


class TrainConfig(Section):
    epochs: int = Field(10, gt=0)
    batch_size: int = Field(64, gt=0)
    eval_batch_size: int = Field(1024, gt=0)
    log_every: int = Field(200, gt=0)  # steps between running loss/accuracy lines (report 003)
    out_dir: str = "runs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    channels_last: bool = True
    # torch.compile of the training forward; auto: when the run is long enough for compiling to pay
    # (train/trainer.py compile_pays). Compiled graphs are kept in the cache folder's compile/ for later runs.
    compile: Union[bool, Literal["auto"]] = False
    threads: Optional[int] = Field(None, gt=0)  # CPU threads; default: every core (shared by the local ranks)
    # data-parallel processes (DDP): batch_size stays the global batch, each rank takes a 1/N slice of it
    devices: int = Field(1, ge=1)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    # test-time augmentation of val/test scoring (evaluation.py tta_views): flip averages the mirrored
    # logits in; flip-shift also those of both views shifted 2 pixels down-right and up-left
    tta: Literal[TTA_MODES] = "none"
    # autocast: auto = bf16 on GPUs with native bf16, fp16 + GradScaler on older GPUs (T4, V100), float32 on CPU
    precision: Literal["auto", "float32", "bf16", "fp16"] = "auto"
    evaluate: list[Literal["val", "test"]] = Field(default_factory=lambda: ["val"])  # splits scored every epoch
    # the weights the test split scores, and eval / predict / viz / export use: best (best.pt, the best
    # monitored epoch), last (the final epoch); auto: Keras' rule, best only when early stopping restores it
    test_weights: Literal["auto", "best", "last"] = "auto"
    max_time_s: Optional[float] = Field(None, gt=0)  # stop after the epoch that passes this much training time
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    lookahead: LookaheadConfig = Field(default_factory=LookaheadConfig)
    # experiment loggers (train/loggers.py LOGGERS): csv, tensorboard, mlflow, wandb; callbacks after the metrics log
    loggers: list[str] = Field(default_factory=list)
    histogram_every: int = Field(5, ge=0)  # tensorboard: weight histograms at epochs 1, 1 + N, ...; 0: none
    mlflow_uri: Optional[str] = None  # mlflow tracking URI; default: a file store in RUN/mlruns
    wandb_mode: Literal["offline", "online"] = "offline"  # wandb: offline unless asked (`wandb sync` uploads later)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.lookahead.every and self.devices > 1:
            raise ValueError("train.lookahead.every needs train.devices=1 (it moves the weights from a callback, "
                             "and callbacks run on rank 0 only)")
        return self

    def tested_weights(self) -> str:
        """best | last: which weights a run tests (test_weights, with auto resolved)."""
        stopping = self.early_stopping
        if self.test_weights == "auto":
            return "best" if stopping.enabled and stopping.restore_best else "last"
        return self.test_weights

    @field_validator("loggers", mode="before")
    @classmethod
    def _known_loggers(cls, names: Any) -> Any:
        from .train.loggers import LOGGERS  # here, not at the top: torch is slow to import

        if isinstance(names, str):  # train.loggers=csv means [csv]
            names = [names]
        if not isinstance(names, list):
            return names  # pydantic's own error for a non-list
        if len(set(map(str, names))) != len(names):
            raise ValueError(f"names a logger twice ({names})")
        for name in names:
            try:
                one_of(LOGGERS, name)
            except ValueError as e:  # the list is not shown with the error: name the entry
                raise ValueError(f"{e} (got {name!r})") from None
        return names


class TsneConfig(Section):
    """Latent space over training (reports 000 and 001): features of these layers are captured at
    these epochs and saved; the embeddings are PCA-50 + openTSNE."""

    layers: list[str] = Field(default_factory=list)  # e.g. [flatten, fc1]; empty: off
    split: Literal["train", "val", "test"] = "train"
    samples: Optional[int] = Field(5000, gt=0)  # null: the whole split
    epochs: Optional[list[int]] = None  # default: 0 (before the first step), the middle and the last epoch
    embed: bool = True  # compute the embeddings (and their figures) when training ends


class AnalysisConfig(Section):
    report: bool = True  # write plots/ and report.html when training ends
    featuremaps: int = Field(4, ge=0)  # feature maps of the first N layers for one test image, in the report
    tsne: TsneConfig = Field(default_factory=TsneConfig)


class Config(Section):
    """A resolved run config: one section per part of a run; every key has a default. Build one with
    `load_config` (YAML path, dict or Config, then overrides); `to_dict()` gives the YAML tree."""

    name: Optional[str] = None  # run name; default "<preset>-<dataset>"; a plain name, never a path
    seed: int = 0
    # framework flavor: whose defaults fill the optimizer and layer keys left out, and whose optimizer
    # formulas run (torch, keras = Keras 3, tf1 = TensorFlow 1); model.defaults / optim.defaults override it
    defaults: Flavor = "torch"
    data: DataConfig = Field(default_factory=DataConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    analysis: AnalysisConfig = Field(default_factory=AnalysisConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: Optional[str]) -> Optional[str]:
        if name is not None and not PLAIN_NAME.fullmatch(name):
            raise ValueError("must be a plain name (letters, digits, '.', '_', '-'; not starting with '.' or '-'), "
                             "because it names the run folder inside train.out_dir")
        return name

    @model_validator(mode="after")
    def _check(self) -> "Config":
        if self.defaults != "torch":  # torch leaves the sections' defaults unset (None means torch)
            if self.model.defaults is None:
                object.__setattr__(self.model, "defaults", self.defaults)
            if self.optim.defaults is None:
                object.__setattr__(self.optim, "defaults", self.defaults)
                self.optim.apply_flavor()
        check_across_sections(self)
        return self

    def run_name(self) -> str:
        return self.name or f"{self.model.name()}-{self.data.dataset}"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


ConfigSource = Union["Config", dict, str, Path, None]
Overrides = Union[list[str], dict[str, Any], None]


STUDY_MARKS = {"base", "axes", "variants", "repeats", "search"}  # keys of a study file (studies/spec.py), not a config


def load_config(config: ConfigSource = None, overrides: Overrides = None, *, source: Optional[str] = None) -> Config:
    """The resolved config: defaults, then `config` (a YAML path, a dict of sections or a Config),
    then `overrides` (`key.path=value` strings, or a dict of key.path -> value), in that order.
    Errors name `source` (default: the file, or "config")."""
    if isinstance(config, Config):
        tree = config.to_dict()
    elif isinstance(config, dict):
        tree = json.loads(json.dumps(config))  # a deep copy of plain data: overrides must not change the caller's dict
    elif config is not None:
        tree = read_yaml(config)
        source = source or str(config)
        if STUDY_MARKS & set(tree):
            command = "tune" if "search" in tree else "sweep"
            raise ConfigError(f"{config}: a study file, not a run's config: run it with `cifarlab {command} {config}`")
    else:
        tree = {}
    if isinstance(overrides, dict):
        for key, value in overrides.items():
            apply_override(tree, key.split("."), value)
    else:
        for text in overrides or []:
            apply_override(tree, *parse_override(text))
    return config_from_dict(tree, source=source or "config")


def config_from_dict(tree: dict[str, Any], source: str = "config") -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"{source}: {describe_validation_error(e, Config)}") from None


def write_config(config: Config, path: Path) -> None:
    atomic_write(path, config_yaml(config))


def config_diff(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) of every setting that differs, in key order."""
    first, second = flat_settings(a.to_dict()), flat_settings(b.to_dict())
    return [(k, first.get(k), second.get(k)) for k in sorted(set(first) | set(second)) if first.get(k) != second.get(k)]


def config_yaml(config: Config) -> str:
    """The resolved config as the YAML that config.yaml holds."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
