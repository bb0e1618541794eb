"""The text of config validation errors: a registry-backed choice worded like pydantic's own, and
pydantic's errors as one line that names each key (and, for an unknown key, the allowed ones). A refused
key or value that is a Keras / TensorFlow name, or close to an allowed one, gets a "did you mean" with the
cifarlab name (`suggestion`)."""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Optional

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
            allowed = allowed_keys(root, item["loc"][:-1])
            section = "".join(f"{p}." for p in item["loc"][:-1])
            hint = suggestion(str(item["loc"][-1]), [section + name for name in allowed], FRAMEWORK_KEYS, section)
            problems.append(f"{key}: unknown key{hint} (allowed: {', '.join(allowed)})")
        else:
            message = item["msg"].removeprefix("Value error, ")
            where = f"{key}: " if key and not message.startswith(key) else ""
            shown = item.get("input")
            value = f" (got {shown!r})" if key and not isinstance(shown, (dict, list)) else ""
            hint = ""
            if key and isinstance(shown, str) and message.startswith("Input should be '"):
                hint = suggestion(shown, re.findall(r"'([^']*)'", message), FRAMEWORK_VALUES.get(key, {}), quote=True)
            problems.append(f"{where}{message}{value}{hint}")
    return "; ".join(problems)


# ---------------------------------------------------------------- Keras / TensorFlow names

# A refused key's last part -> the cifarlab key (and value) that does what the Keras / TensorFlow name did.
FRAMEWORK_KEYS = {
    # ImageDataGenerator
    "horizontal_flip": "augment.flip", "vertical_flip": "augment.vflip",
    "width_shift_range": "augment.width_shift", "height_shift_range": "augment.height_shift",
    "rotation_range": "augment.rotation", "shear_range": "augment.shear", "zoom_range": "augment.zoom",
    "channel_shift_range": "augment.channel_shift", "brightness_range": "augment.brightness",
    "featurewise_center": "data.normalize=center", "featurewise_std_normalization": "data.normalize=true",
    "samplewise_center": "data.samplewise=center", "samplewise_std_normalization": "data.samplewise=std",
    "zca_whitening": "data.zca", "validation_split": "data.val_size",
    # optimizers (keras.optimizers, tf.train)
    "learning_rate": "optim.lr", "epsilon": "optim.eps", "beta_1": "optim.betas", "beta_2": "optim.betas",
    "beta1": "optim.betas", "beta2": "optim.betas", "initial_accumulator_value": "optim.initial_accumulator",
    "use_nesterov": "optim.nesterov", "l1_regularization_strength": "optim.prox_l1",
    "l2_regularization_strength": "optim.prox_l2", "clipnorm": "optim.clip_norm", "global_clipnorm": "optim.clip_norm",
    "kernel_regularizer": "optim.l2",
    # callbacks
    "restore_best_weights": "train.early_stopping.restore_best",
}

# key -> {a refused value, lower case without punctuation or an "optimizer" suffix -> the cifarlab value}
FRAMEWORK_VALUES = {
    "optim.name": {"gd": "sgd", "gradientdescent": "sgd", "momentum": "sgd", "nesterov": "sgd"},
    "schedule.name": {"reducelronplateau": "plateau", "cosinedecay": "cosine", "cosineannealinglr": "cosine",
                      "exponentialdecay": "exponential", "exponentiallr": "exponential", "steplr": "step",
                      "multisteplr": "multistep", "piecewiseconstantdecay": "multistep", "onecyclelr": "onecycle"},
    "augment.crop_fill": {"zeros": "constant", "replicate": "edge", "reflection": "reflect"},
    "data.samplewise": {"samplewisecenter": "center", "samplewisestdnormalization": "std", "standardize": "std"},
}

# layer items (models/layers.py): Keras / torch layer classes -> layer kinds, their arguments -> cifarlab's
LAYER_NAMES = {"conv2d": "conv", "linear": "dense", "batchnormalization": "batchnorm", "batchnorm1d": "batchnorm",
               "batchnorm2d": "batchnorm", "maxpooling2d": "maxpool", "maxpool2d": "maxpool",
               "averagepooling2d": "avgpool", "avgpool2d": "avgpool", "globalaveragepooling2d": "global_avgpool",
               "adaptiveavgpool2d": "global_avgpool", "globalmaxpooling2d": "global_maxpool",
               "adaptivemaxpool2d": "global_maxpool", "spatialdropout2d": "dropout2d", "rescaling": "scale",
               "add": "residual"}
LAYER_ARGUMENTS = {"kernel_size": "kernel", "strides": "stride", "pool_size": "size", "use_bias": "bias",
                   "kernel_initializer": "init", "rate": "p", "negative_slope": "slope", "alpha": "slope",
                   "epsilon": "eps", "out_channels": "filters", "out_features": "units"}


def _plain(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower()).removesuffix("optimizer")


def suggestion(given: str, allowed: Iterable[str], names: Optional[dict[str, str]] = None, prefix: str = "",
               quote: bool = False) -> str:
    """", did you mean X?" for a refused name, or "": X is what `names` (Keras / TensorFlow names) maps
    `given` to, else the allowed name equal to it but for case and punctuation (RMSprop, cifar-10), else
    the closest allowed name (difflib). `prefix` goes before a name from `allowed`' own (a key's section)."""
    allowed = list(allowed)
    names = names or {}
    bare = [name[len(prefix):] for name in allowed]
    found = names.get(given, names.get(_plain(given)))
    if found is None:
        same = [name for name in bare if _plain(name) == _plain(given)]
        close = same or difflib.get_close_matches(given, bare, n=1, cutoff=0.7)
        found = prefix + close[0] if close else None
    if found is None:
        return ""
    return f", did you mean {found!r}?" if quote else f", did you mean {found}?"


def allowed_keys(root: type[BaseModel], loc: tuple) -> list[str]:
    """The keys of the section of `root` at `loc` (a key path); none when `loc` names no section."""
    model: Any = root
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))
