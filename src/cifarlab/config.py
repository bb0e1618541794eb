"""The configuration: one pydantic model per section, loading (YAML, dict or Config, then overrides),
validation-error text, and writing and comparing configs. Reading YAML and parsing overrides is yamlfiles.py.

Every key has a default, so an empty config is a valid run. Unknown keys and bad values fail here,
before any work starts, with a message that names the key and what is allowed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, field_validator, model_validator

from .data import sources
from .errors import ConfigError
from .files import atomic_write
from .settings import flat_settings
from .validation import describe_validation_error, one_of
from .yamlfiles import apply_override, parse_override, read_yaml

DATASETS = tuple(sources.DATASETS)  # the data.dataset names, from the registry in data/sources.py

# train.tta: the test-time augmentations evaluation.tta_views knows (export offers the same)
TTA_MODES = ("none", "flip", "flip-shift")

AUGMENT_PRESETS = {
    "none": {},
    # report 001: RandomCrop(32, padding=4) + RandomHorizontalFlip()
    "crop-flip": {"crop": 4, "flip": True},
    # report 000: ImageDataGenerator(width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True)
    "shift-flip": {"width_shift": 0.1, "height_shift": 0.1, "flip": True, "fill_mode": "nearest"},
    # report 004: rotation 15, shifts 0.1, shear 0.2, zoom 0.2, horizontal flip, fill_mode nearest
    "keras-affine": {"rotation": 15.0, "width_shift": 0.1, "height_shift": 0.1, "shear": 0.2, "zoom": 0.2,
                     "flip": True, "fill_mode": "nearest"},
}


PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    normalize: bool = True  # per-channel mean/std; from the training split unless mean/std given
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

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        if self.val_size >= 1 and self.val_size != int(self.val_size):
            raise ValueError(f"data.val_size={self.val_size}: use a fraction below 1 or a whole count")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both data.mean and data.std, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"data.std={self.std}: every value must be > 0")
        return self


# An int or a float, each kept as its own type (pydantic would turn 3 into 3.0 for a float field);
# AugmentConfig._shift_range checks it first, so a bad value gets one message.
ShiftRange = Union[Annotated[int, Strict()], Annotated[float, Strict()]]

# The framework flavors of the top-level `defaults` key (see train/formulas.py FLAVOR_OPTIM_DEFAULTS and
# models/build.py FLAVOR_LAYER_DEFAULTS): whose defaults fill the keys a config leaves out, and whose
# update rules the optimizers follow.
Flavor = Literal["torch", "keras", "tf1"]


class AugmentConfig(Section):
    """Training-time augmentation. A preset fills the keys you leave out; keys you give win."""

    preset: Literal["none", "crop-flip", "shift-flip", "keras-affine"] = "none"
    crop: Optional[int] = Field(None, ge=0)  # pad this many pixels, then crop back at a random offset
    crop_fill: Optional[Literal["constant", "reflect", "edge"]] = None  # how the crop padding is filled
    flip: Optional[bool] = None  # random horizontal flip, p = 0.5
    vflip: Optional[bool] = None  # random vertical flip, p = 0.5
    # Keras' width_shift_range / height_shift_range rule (data/augment.py draw_shift): a float < 1 is a
    # fraction of the size, a float >= 1 pixels from [-r, r], an int whole pixels from {-(r-1), ..., r-1}.
    # A YAML int (3) stays an int and a YAML float (3.0) a float: the union is tried in that order, strictly.
    width_shift: Optional[ShiftRange] = None
    height_shift: Optional[ShiftRange] = None
    rotation: Optional[float] = Field(None, ge=0, le=180)  # degrees, drawn from [-r, r]
    shear: Optional[float] = Field(None, ge=0, lt=90)  # degrees (Keras shear_range), from [-s, s]
    zoom: Optional[float] = Field(None, ge=0, lt=1)  # scale drawn from [1 - z, 1 + z] per axis
    fill_mode: Optional[Literal["nearest", "constant", "reflect"]] = None  # outside pixels after an affine
    cval: Optional[float] = Field(None, ge=0, le=255)  # fill value for fill_mode constant, in pixel units
    brightness: Optional[float] = Field(None, ge=0, lt=1)  # factor from [1 - b, 1 + b]
    contrast: Optional[float] = Field(None, ge=0, lt=1)
    saturation: Optional[float] = Field(None, ge=0, lt=1)
    cutout: Optional[int] = Field(None, ge=0)  # side of a square set to the mean (0: off)
    erasing: Optional[float] = Field(None, ge=0, le=1)  # random-erasing probability per image
    mixup: Optional[float] = Field(None, ge=0)  # Beta(alpha, alpha) mixing; 0: off
    cutmix: Optional[float] = Field(None, ge=0)  # Beta(alpha, alpha) box pasting; 0: off

    @field_validator("width_shift", "height_shift", mode="before")
    @classmethod
    def _shift_range(cls, value: Any) -> Any:
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0):
            return value
        raise ValueError("must be a number >= 0: an int for whole pixels, a float below 1 for a fraction "
                         "of the size, a float of 1 or more for pixels from a continuous range")

    @model_validator(mode="after")
    def _fill_from_preset(self) -> "AugmentConfig":
        defaults = {"crop": 0, "crop_fill": "constant", "flip": False, "vflip": False, "width_shift": 0.0,
                    "height_shift": 0.0, "rotation": 0.0, "shear": 0.0, "zoom": 0.0, "fill_mode": "nearest",
                    "cval": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "cutout": 0,
                    "erasing": 0.0, "mixup": 0.0, "cutmix": 0.0}
        for key, value in {**defaults, **AUGMENT_PRESETS[self.preset]}.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        return self


class ModelConfig(BaseModel):
    """`preset` names a file in models/presets; extra keys set that preset's parameters.
    `layers` gives the network inline instead (see models/layers.py for the layer kinds)."""

    model_config = ConfigDict(extra="allow")

    preset: Optional[str] = "cnn3-avg"
    layers: Optional[list[Any]] = None
    defaults: Optional[Flavor] = None  # layer defaults (init, BatchNorm) of a framework; None: the top-level `defaults`

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
    """Keys left out take the framework flavor's defaults (`defaults`, else the top-level `defaults`:
    train/formulas.py FLAVOR_OPTIM_DEFAULTS); keys given always win."""

    defaults: Optional[Flavor] = None  # update rules and defaults of a framework; None: the top-level `defaults`
    name: str = "adam"  # a name in train/optim.py OPTIMIZERS
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd, rmsprop
    nesterov: bool = False  # sgd, needs momentum > 0
    betas: tuple[float, float] = (0.9, 0.999)  # adam, adamw
    eps: Optional[float] = Field(None, ge=0)  # adam(w), adagrad, rmsprop, adadelta; default: the flavor's
    alpha: float = Field(0.99, gt=0, lt=1)  # rmsprop smoothing (Keras rho; keras / tf1 flavors 0.9)
    rho: float = Field(0.9, gt=0, lt=1)  # adadelta (keras / tf1 flavors 0.95)
    initial_accumulator: Optional[float] = Field(None, ge=0)  # adagrad 0 (keras / tf1 0.1), rmsprop (tf1 1), prox 0.1
    prox_l1: float = Field(0.0, ge=0)  # proximal-adagrad l1_regularization_strength
    prox_l2: float = Field(0.0, ge=0)  # proximal-adagrad l2_regularization_strength
    weight_decay: float = Field(0.0, ge=0)  # inside the optimizer step (torch semantics; decoupled for adamw)
    l2: float = Field(0.0, ge=0)  # Keras kernel_regularizer: loss += l2 * sum(w**2) over conv/dense kernels
    l2_layers: Optional[list[str]] = None  # only these layers' kernels (e.g. [conv1, fc1]); default all
    clip_norm: Optional[float] = Field(None, gt=0)  # clip the global gradient norm to this

    @field_validator("name", mode="before")
    @classmethod
    def _known_optimizer(cls, name: Any) -> Any:
        from .train.optim import OPTIMIZERS  # here, not at the top: torch is slow to import

        return one_of(OPTIMIZERS, name)

    @model_validator(mode="after")
    def _check(self) -> "OptimConfig":
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("optim.nesterov=true needs optim.name=sgd and optim.momentum > 0")
        if (self.prox_l1 or self.prox_l2) and self.name != "proximal-adagrad":
            raise ValueError("optim.prox_l1 / prox_l2 need optim.name=proximal-adagrad (for Keras L2 use optim.l2)")
        self.apply_flavor()
        return self

    def apply_flavor(self) -> None:
        """Fill the keys the config left out with the flavor's values for this optimizer (torch: none, so
        torch's own defaults stay), then refuse what the framework refuses."""
        from .train.formulas import flavor_optim_values

        if self.defaults not in (None, "torch"):
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
    restore_best: bool = True  # evaluate the test split with the best epoch's weights, not the last


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
    max_time_s: Optional[float] = Field(None, gt=0)  # stop after the epoch that passes this much training time
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig)
    target: TargetConfig = Field(default_factory=TargetConfig)
    # experiment loggers (train/loggers.py LOGGERS): csv, tensorboard, mlflow, wandb; callbacks after the metrics log
    loggers: list[str] = Field(default_factory=list)
    histogram_every: int = Field(5, ge=0)  # tensorboard: weight histograms at epochs 1, 1 + N, ...; 0: none
    mlflow_uri: Optional[str] = None  # mlflow tracking URI; default: a file store in RUN/mlruns
    wandb_mode: Literal["offline", "online"] = "offline"  # wandb: offline unless asked (`wandb sync` uploads later)

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
    epochs: Optional[list[int]] = None  # default: the first, the middle and the last epoch
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
        if self.data.val_size == 0 and "val" in self.train.evaluate:
            object.__setattr__(self.train, "evaluate", [s for s in self.train.evaluate if s != "val"])
        measured = {"train_acc", "train_loss"} | {f"{s}_{m}" for s in self.train.evaluate for m in ("acc", "loss")}
        for key, metric in (("schedule.monitor", self.schedule.monitor if self.schedule.name == "plateau" else None),
                            ("train.target.metric", self.train.target.metric)):
            if metric is not None and metric not in measured:
                raise ValueError(f"{key}={metric} is not measured; add its split to train.evaluate "
                                 f"(now {self.train.evaluate})")
        if self.analysis.tsne.layers and self.analysis.tsne.split == "val" and self.data.val_size == 0:
            raise ValueError("analysis.tsne.split=val needs data.val_size > 0")
        if self.train.divergence.enabled and "val" not in self.train.evaluate:
            raise ValueError("train.divergence needs validation loss: data.val_size > 0 and val in train.evaluate")
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
