"""Config sections kept out of config.py (which holds the others and loads the whole config): the base
`Section` every section derives from, and the `augment` section with its presets.

The augment keys that carry a Keras ImageDataGenerator name have its semantics (data/augment.py implements
them; tests/test_keras_parity.py checks them against Keras itself).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

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


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# An int or a float, each kept as its own type (pydantic would turn 3 into 3.0 for a float field);
# AugmentConfig._shift_range checks it first, so a bad value gets one message.
ShiftRange = Union[Annotated[int, Strict()], Annotated[float, Strict()]]

# Keras' zoom_range: a number z (scales from [1 - z, 1 + z]) or a pair [lo, hi] taken as is.
ZoomRange = Union[float, tuple[float, float]]


class AugmentConfig(Section):
    """Training-time augmentation. A preset fills the keys you leave out; keys you give win."""

    preset: Literal["none", "crop-flip", "shift-flip", "keras-affine"] = "none"
    crop: Optional[int] = Field(None, ge=0)  # pad this many pixels, then crop back at a random offset
    crop_fill: Optional[Literal["constant", "reflect", "edge"]] = None  # how the crop padding is filled
    # horizontal flip: true = random, p = 0.5; alternate = each image on alternate epochs (airbench)
    flip: Optional[Union[bool, Literal["alternate"]]] = None
    vflip: Optional[bool] = None  # random vertical flip, p = 0.5
    # Keras' width_shift_range / height_shift_range rule (data/augment.py draw_shift): a float < 1 is a
    # fraction of the size, a float >= 1 pixels from [-r, r], an int whole pixels from {-(r-1), ..., r-1}.
    # A YAML int (3) stays an int and a YAML float (3.0) a float: the union is tried in that order, strictly.
    width_shift: Optional[ShiftRange] = None
    height_shift: Optional[ShiftRange] = None
    rotation: Optional[float] = Field(None, ge=0, le=180)  # degrees, drawn from [-r, r]
    shear: Optional[float] = Field(None, ge=0, lt=90)  # degrees (Keras shear_range), from [-s, s]
    # Keras zoom_range: each axis's scale from [1 - z, 1 + z], or from [lo, hi]; a scale above 1 zooms out
    zoom: Optional[ZoomRange] = None
    # outside pixels after an affine, scipy.ndimage's modes as Keras uses them (wrap: period size - 1)
    fill_mode: Optional[Literal["nearest", "constant", "reflect", "wrap"]] = None
    cval: Optional[float] = Field(None, ge=0, le=255)  # fill value for fill_mode constant, in pixel units
    # Keras channel_shift_range, in pixel units: one value from [-r, r] per image added to every channel,
    # clipped to the image's own min and max
    channel_shift: Optional[float] = Field(None, ge=0, le=255)
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
        if value is None or (_number(value) and value >= 0):
            return value
        raise ValueError("must be a number >= 0: an int for whole pixels, a float below 1 for a fraction "
                         "of the size, a float of 1 or more for pixels from a continuous range")

    @field_validator("flip", mode="before")
    @classmethod
    def _flip_mode(cls, value: Any) -> Any:  # one message, not one per member of the union
        if value is None or isinstance(value, bool) or value == "alternate":
            return value
        if value in ("true", "false"):
            return value == "true"
        raise ValueError("must be true (random, p = 0.5), false or alternate (each image on alternate epochs)")

    @field_validator("zoom", mode="before")
    @classmethod
    def _zoom_range(cls, value: Any) -> Any:
        if value is None or (_number(value) and 0 <= value < 1):
            return value
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(_number, value)) \
                and 0 < value[0] <= value[1]:
            return value
        raise ValueError("must be a number z in [0, 1) (scales from [1 - z, 1 + z]) or a pair [lo, hi] "
                         "with 0 < lo <= hi (Keras zoom_range)")

    @model_validator(mode="after")
    def _fill_from_preset(self) -> "AugmentConfig":
        defaults = {"crop": 0, "crop_fill": "constant", "flip": False, "vflip": False, "width_shift": 0.0,
                    "height_shift": 0.0, "rotation": 0.0, "shear": 0.0, "zoom": 0.0, "fill_mode": "nearest",
                    "cval": 0.0, "channel_shift": 0.0, "brightness": 0.0, "contrast": 0.0, "saturation": 0.0,
                    "cutout": 0, "erasing": 0.0, "mixup": 0.0, "cutmix": 0.0}
        for key, value in {**defaults, **AUGMENT_PRESETS[self.preset]}.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        return self


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
