"""Batched augmentations on device tensors: every sample draws its own parameters from one
torch.Generator, and no Python runs per sample.

Images enter as uint8 (N, C, H, W) and leave as float in [0, 1]. Crop and flips are index
operations; shift, rotation, shear and zoom are one grid_sample call per batch, with the Keras
(scipy.ndimage) fill modes nearest, constant (cval), reflect and wrap; Keras' channel shift follows
the warp, as in its apply_transform. Mixup and cutmix act later, on the
normalized batch and its labels (see `mix_batch`), because they change the targets too.

The per-sample steps are the AUGMENTATIONS registry, in application order: a new one is one entry there
(and its keys in config.AugmentConfig).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .loader import Augment

# grid_sample padding per fill mode; constant and wrap sample inside the image (warp decides the rest)
GRID_PADDING = {"nearest": "border", "constant": "border", "reflect": "reflection", "wrap": "border"}
PAD_MODE = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device) -> torch.Tensor:
    return (torch.rand(n, generator=generator, device=generator.device) * (high - low) + low).to(device)


def _integers(n: int, low: int, high: int, generator: torch.Generator, device) -> torch.Tensor:
    """Uniform integers in [low, high], inclusive."""
    return torch.randint(low, high + 1, (n,), generator=generator, device=generator.device).to(device)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator, fill: str = "constant") -> torch.Tensor:
    """Pad by `padding` (zeros, reflect or edge) and crop back to the input size at a random offset
    per sample (torchvision RandomCrop(size, padding) semantics). One gather for the whole batch."""
    n, c, h, w = images.shape
    mode = PAD_MODE[fill]
    source = images if mode == "constant" else images.float()
    padded = F.pad(source, (padding, padding, padding, padding), mode=mode).to(images.dtype)
    dy = _integers(n, 0, 2 * padding, generator, images.device)
    dx = _integers(n, 0, 2 * padding, generator, images.device)
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    chans = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator, dim: int = 3, p: float = 0.5) -> torch.Tensor:
    """Flip each sample with probability p: dim 3 is horizontal, dim 2 vertical."""
    flip = torch.rand(len(images), generator=generator, device=generator.device).to(images.device) < p
    return torch.where(flip[:, None, None, None], images.flip(dim), images)


def _matmul3(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) products summed left to right in plain float64 operations: the same rounding on every device
    (a BLAS or GPU matmul may fuse multiply-adds), which decides points that land exactly on the border."""
    return torch.stack([torch.stack([a[:, i, 0] * b[:, 0, j] + a[:, i, 1] * b[:, 1, j] + a[:, i, 2] * b[:, 2, j]
                                     for j in range(3)], -1) for i in range(3)], -2)


def _matrix(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    return torch.stack([torch.stack(row, -1) for row in rows], -2)


def affine_matrices(height: int, width: int, angle: torch.Tensor, shear: torch.Tensor, zoom_x: torch.Tensor,
                    zoom_y: torch.Tensor, shift_x: torch.Tensor, shift_y: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) float64 matrices mapping an output pixel, in pixel units about the image center (x right,
    y down), to the input pixel it samples, composed as Keras' apply_affine_transform composes them:

        input = R(angle) (Sh(shear) Z(zoom) output - shift)

    Angles are degrees, positive counter-clockwise as displayed (Keras). Zoom < 1 enlarges the
    content (Keras). Without rotation a shift (dx, dy) moves the content right and down; with one,
    the shift is applied before the rotation, as in Keras (its tx, ty are -dx, -dy). Computed in float64
    from the parameters, as Keras does (cos 90 degrees is 6e-17 there, not float32's -4e-8)."""
    angle, shear, zoom_x, zoom_y, shift_x, shift_y = (t.to(torch.float64) for t in
                                                      (angle, shear, zoom_x, zoom_y, shift_x, shift_y))
    a, s = torch.deg2rad(angle), torch.deg2rad(shear)
    cos, sin = torch.cos(a), torch.sin(a)
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    # Sampling input R(a) @ out with y pointing down turns the content counter-clockwise on screen.
    rotate = _matrix([[cos, -sin, zero], [sin, cos, zero], [zero, zero, one]])
    shear_m = _matrix([[one, -torch.sin(s), zero], [zero, torch.cos(s), zero], [zero, zero, one]])
    zoom_m = _matrix([[zoom_x, zero, zero], [zero, zoom_y, zero], [zero, zero, one]])
    shift_m = _matrix([[one, zero, -shift_x], [zero, one, -shift_y], [zero, zero, one]])
    return _matmul3(_matmul3(_matmul3(rotate, shift_m), shear_m), zoom_m)


def sample_points(height: int, width: int, matrices: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y), each (N, H, W) float64: the input column and row (0 = the first pixel's center) that each
    output pixel samples, computed as Keras (transform_matrix_offset_center) and scipy.ndimage.affine_transform
    compute them: T = offset @ M @ reset, then (T[., 2] + row * T[., 1]) + column * T[., 0], in that order,
    so that a point landing on the border in exact arithmetic (a rotation by 90 degrees) rounds to the same side.
    (Keras centers the column on (height - 1) / 2; the two agree on square images, and cifarlab uses the
    image's own center.)"""
    m = matrices.to(device=device, dtype=torch.float64)
    n = len(m)
    zero, one = torch.zeros(n, dtype=m.dtype, device=device), torch.ones(n, dtype=m.dtype, device=device)
    ox, oy = zero + (width / 2 - 0.5), zero + (height / 2 - 0.5)
    offset = _matrix([[one, zero, ox], [zero, one, oy], [zero, zero, one]])
    reset = _matrix([[one, zero, -ox], [zero, one, -oy], [zero, zero, one]])
    t = _matmul3(_matmul3(offset, m), reset)[:, :2, :, None, None]  # (N, 2, 3, 1, 1)
    rows = torch.arange(height, dtype=m.dtype, device=device)[:, None]
    cols = torch.arange(width, dtype=m.dtype, device=device)[None, :]
    x = (t[:, 0, 2] + rows * t[:, 0, 1]) + cols * t[:, 0, 0]
    y = (t[:, 1, 2] + rows * t[:, 1, 1]) + cols * t[:, 1, 0]
    return x, y


def wrap_coordinates(coord: torch.Tensor, size: int) -> torch.Tensor:
    """scipy.ndimage's mode "wrap" (the mode Keras' fill_mode="wrap" passes on): a coordinate outside
    [0, size - 1] moves by whole periods of size - 1 (not size: the first and last pixel centers meet)."""
    if size <= 1:
        return torch.zeros_like(coord)
    period = size - 1
    below = coord + period * (torch.trunc(-coord / period) + 1)
    above = coord - period * torch.trunc(coord / period)
    return torch.where(coord < 0, below, torch.where(coord > period, above, coord))


def warp(images: torch.Tensor, matrices: torch.Tensor, fill: str = "nearest", cval: float = 0.0) -> torch.Tensor:
    """Resample float images through pixel-space matrices (see affine_matrices), bilinear, with the
    fill modes of scipy.ndimage (which Keras' ImageDataGenerator uses): nearest repeats the edge pixel,
    reflect mirrors about the border (d c b a | a b c d | d c b a), wrap repeats with period size - 1,
    and constant gives `cval` to every sample point outside the outermost pixel centers (exactly, as
    scipy decides it) while points inside interpolate inside pixels only (no blend of the image into the
    fill color). Sample points are computed in float64 (sample_points)."""
    n, _, h, w = images.shape
    x, y = sample_points(h, w, matrices, images.device)
    if fill == "wrap":
        x, y = wrap_coordinates(x, w), wrap_coordinates(y, h)
    # normalized coordinates of grid_sample(align_corners=False): -1 and 1 are the outer pixel edges
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], -1).to(images.dtype)
    padding = GRID_PADDING.get(fill, "border")
    sampled = F.grid_sample(images, grid, mode="bilinear", padding_mode=padding, align_corners=False)
    if fill == "constant":
        inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
        return sampled.masked_fill(~inside.view(n, 1, h, w), cval)
    return sampled


def draw_shift(n: int, limit, size: int, generator: torch.Generator, device) -> torch.Tensor:
    """Per-sample shifts in pixels by Keras ImageDataGenerator's rule for width_shift_range /
    height_shift_range: a float below 1 is a fraction of the size (uniform over [-limit * size,
    limit * size]); a float of 1 or more is pixels from the continuous interval [-limit, limit]; an int
    is whole pixels: a magnitude from {0, ..., limit - 1} and a random sign (so 2 gives -1, 0 or +1,
    and 0 comes twice as often as each other value, exactly as Keras draws them)."""
    if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
        magnitude = _integers(n, 0, limit - 1, generator, device)
        sign = _integers(n, 0, 1, generator, device) * 2 - 1
        return (magnitude * sign).float()
    if limit >= 1:
        return _uniform(n, -limit, limit, generator, device)
    return _uniform(n, -limit * size, limit * size, generator, device)


def zoom_bounds(zoom) -> tuple[float, float]:
    """Keras' zoom_range rule: a number z is the interval [1 - z, 1 + z], a pair [lo, hi] is taken as is."""
    if isinstance(zoom, (list, tuple)):
        return float(zoom[0]), float(zoom[1])
    return 1 - zoom, 1 + zoom


def draw_affine(n: int, height: int, width: int, c, generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Per-sample affine parameters from an AugmentConfig's ranges (Keras ImageDataGenerator rules:
    shifts per draw_shift; each axis's zoom from zoom_bounds; rotation and shear from [-r, r])."""
    low, high = zoom_bounds(c.zoom)
    return {
        "angle": _uniform(n, -c.rotation, c.rotation, generator, device),
        "shear": _uniform(n, -c.shear, c.shear, generator, device),
        "zoom_x": _uniform(n, low, high, generator, device),
        "zoom_y": _uniform(n, low, high, generator, device),
        "shift_x": draw_shift(n, c.width_shift, width, generator, device),
        "shift_y": draw_shift(n, c.height_shift, height, generator, device),
    }


def shift_channels(images: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
    """Keras' apply_channel_shift per sample: intensity[i] (in the images' units) added to every channel of
    image i, the result clipped to that image's own minimum and maximum over all its channels and pixels."""
    n = len(images)
    flat = images.reshape(n, -1)
    low, high = flat.amin(1).view(n, 1, 1, 1), flat.amax(1).view(n, 1, 1, 1)
    shifted = images + intensity.to(images.dtype).view(n, 1, 1, 1)
    return torch.minimum(torch.maximum(shifted, low), high)


def channel_shift(images: torch.Tensor, limit: float, generator: torch.Generator) -> torch.Tensor:
    """Keras' channel_shift_range: shift_channels by an intensity from [-limit, limit] per sample."""
    return shift_channels(images, _uniform(len(images), -limit, limit, generator, images.device))


def jitter_color(images: torch.Tensor, generator: torch.Generator, brightness: float, contrast: float,
                 saturation: float) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation factors from [1-x, 1+x] (torchvision ColorJitter
    formulas, applied in that order) on float images in [0, 1]."""
    n, device = len(images), images.device
    view = (n, 1, 1, 1)
    if brightness:
        images = images * _uniform(n, 1 - brightness, 1 + brightness, generator, device).view(view)
    if contrast:
        gray = _gray(images).mean(dim=(1, 2, 3), keepdim=True)
        factor = _uniform(n, 1 - contrast, 1 + contrast, generator, device).view(view)
        images = gray + factor * (images - gray)
    if saturation and images.shape[1] == 3:
        gray = _gray(images)
        factor = _uniform(n, 1 - saturation, 1 + saturation, generator, device).view(view)
        images = gray + factor * (images - gray)
    return images.clamp(0, 1)


def _gray(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] != 3:
        return images.mean(dim=1, keepdim=True)
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def box_masks(height: int, width: int, top: torch.Tensor, left: torch.Tensor, box_h: torch.Tensor,
              box_w: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) boolean masks, True inside each sample's box (clipped to the image)."""
    rows = torch.arange(height, device=top.device)[None, :, None]
    cols = torch.arange(width, device=top.device)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None]) &
              (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
    return inside[:, None]


def cutout(images: torch.Tensor, size: int, generator: torch.Generator, fill: torch.Tensor) -> torch.Tensor:
    """A size x size square per sample, centered anywhere in the image (clipped at the edges), set to `fill`."""
    n, _, h, w = images.shape
    cy = _integers(n, 0, h - 1, generator, images.device)
    cx = _integers(n, 0, w - 1, generator, images.device)
    side = torch.full((n,), size, device=images.device)
    mask = box_masks(h, w, cy - size // 2, cx - size // 2, side, side)
    return torch.where(mask, fill.view(1, -1, 1, 1), images)


def random_erasing(images: torch.Tensor, p: float, generator: torch.Generator, fill: torch.Tensor,
                   scale: tuple[float, float] = (0.02, 0.33), ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2017; torchvision defaults): with probability p per sample, a box
    of scale x area and aspect ratio in `ratio` (log-uniform) is set to `fill`."""
    n, _, h, w = images.shape
    device = images.device
    area = _uniform(n, *scale, generator, device) * h * w
    aspect = torch.exp(_uniform(n, math.log(ratio[0]), math.log(ratio[1]), generator, device))
    box_h = torch.sqrt(area * aspect).round().clamp(1, h).long()
    box_w = torch.sqrt(area / aspect).round().clamp(1, w).long()
    top = (_uniform(n, 0, 1, generator, device) * (h - box_h + 1)).long()
    left = (_uniform(n, 0, 1, generator, device) * (w - box_w + 1)).long()
    chosen = _uniform(n, 0, 1, generator, device) < p
    mask = box_masks(h, w, top, left, box_h, box_w) & chosen[:, None, None, None]
    return torch.where(mask, fill.view(1, -1, 1, 1), images)


def _affine_enabled(c) -> bool:
    return bool(c.rotation or c.shear or zoom_bounds(c.zoom) != (1, 1) or c.width_shift or c.height_shift)


def _affine(x: torch.Tensor, c, generator: torch.Generator, fill: torch.Tensor, at: "Batch") -> torch.Tensor:
    n, _, h, w = x.shape
    params = draw_affine(n, h, w, c, generator, x.device)
    return warp(x, affine_matrices(h, w, **params), c.fill_mode, c.cval / 255.0)


@dataclass(frozen=True)
class Batch:
    """Where a batch's images come from: their indices in the training split, the epoch (1-based) and
    the run's seed (for steps decided per image rather than drawn: the alternating flip)."""

    index: torch.Tensor
    epoch: int
    seed: int


def flip_phase(index: torch.Tensor, seed: int) -> torch.Tensor:
    """A fixed pseudo-random bit (0 / 1, int64) per image index and seed: an LCG's bit 16, in integers
    small enough for int64 on any device (index < 2**31), so that every device and resume agree."""
    mixed = (index.long() + (seed % 65536) * 65537) % 2**31
    return ((mixed * 1103515245 + 12345) % 2**31 >> 16) & 1


def alternate_flip(images: torch.Tensor, at: Batch) -> torch.Tensor:
    """airbench's alternating flip: image i is mirrored in the epochs where epoch + its phase is odd, so
    it is seen mirrored every other epoch (half of the images in each epoch) and no flip is left to chance."""
    flip = (flip_phase(at.index, at.seed) + at.epoch) % 2 == 1
    return torch.where(flip.to(images.device)[:, None, None, None], images.flip(3), images)


def _flip(x: torch.Tensor, c, generator: torch.Generator, fill: torch.Tensor, at: Batch) -> torch.Tensor:
    return alternate_flip(x, at) if c.flip == "alternate" else random_flip(x, generator, dim=3)


@dataclass(frozen=True)
class Augmentation:
    """One step of the training augmentation: whether an AugmentConfig turns it on, and the step itself
    (float images in [0, 1], the config, the generator, the per-channel erase fill, the Batch) -> images."""

    enabled: Callable[[Any], bool]
    apply: Callable[[torch.Tensor, Any, torch.Generator, torch.Tensor, Batch], torch.Tensor]


# The steps in the order they run, which fixes the order of the generator's draws: reordering them or
# inserting one before others changes every augmented batch (and the resume of a run in progress).
AUGMENTATIONS: dict[str, Augmentation] = {
    "crop": Augmentation(lambda c: bool(c.crop), lambda x, c, g, fill, at: random_crop(x, c.crop, g, c.crop_fill)),
    # true: random, p = 0.5 (one draw per image); alternate: per image on alternate epochs (no draw)
    "flip": Augmentation(lambda c: bool(c.flip), _flip),
    "vflip": Augmentation(lambda c: bool(c.vflip), lambda x, c, g, fill, at: random_flip(x, g, dim=2)),
    "affine": Augmentation(_affine_enabled, _affine),
    # after the affine warp, as Keras' apply_transform (flips commute with it: the clip bounds are the image's)
    "channel_shift": Augmentation(lambda c: bool(c.channel_shift),
                                  lambda x, c, g, fill, at: channel_shift(x, c.channel_shift / 255.0, g)),
    "color": Augmentation(lambda c: bool(c.brightness or c.contrast or c.saturation),
                          lambda x, c, g, fill, at: jitter_color(x, g, c.brightness, c.contrast, c.saturation)),
    "cutout": Augmentation(lambda c: bool(c.cutout), lambda x, c, g, fill, at: cutout(x, c.cutout, g, fill)),
    "erasing": Augmentation(lambda c: bool(c.erasing), lambda x, c, g, fill, at: random_erasing(x, c.erasing, g, fill)),
}


def build_augment(c, mean: Optional[list[float]] = None, seed: int = 0) -> Optional[Augment]:
    """The training-time augmentation an AugmentConfig describes (uint8 in, float [0, 1] out): its
    enabled AUGMENTATIONS in their order, or None when none is. Erased pixels take the channel mean:
    zero after normalization. The loader passes each batch's indices in its split and the epoch
    (default: 0..N-1 and epoch 1)."""
    steps = [step.apply for step in AUGMENTATIONS.values() if step.enabled(c)]
    if not steps:
        return None

    def apply(images: torch.Tensor, generator: torch.Generator, index: Optional[torch.Tensor] = None,
              epoch: int = 1) -> torch.Tensor:
        x = images.float().div_(255)
        fill = torch.tensor(mean if mean is not None else [0.0] * x.shape[1], device=x.device, dtype=x.dtype)
        at = Batch(torch.arange(len(x), device=x.device) if index is None else index, epoch, seed)
        for step in steps:
            x = step(x, c, generator, fill, at)
        return x

    return apply


def mix_batch(images: torch.Tensor, labels: torch.Tensor, classes: int, generator: torch.Generator,
              mixup: float = 0.0, cutmix: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) or cutmix (Yun et al. 2019) with a per-sample ratio drawn from
    Beta(alpha, alpha); each sample is mixed with a random partner from the batch. Returns the images
    and soft targets (each row sums to 1). With both on, each batch uses one of them at random."""
    n, _, h, w = images.shape
    device = images.device
    use_cutmix = cutmix > 0 and (mixup == 0 or bool(torch.rand(1, generator=generator, device=generator.device) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
    lam = torch.from_numpy(np.random.default_rng(seed).beta(alpha, alpha, size=n)).float().to(device)
    partner = torch.randperm(n, generator=generator, device=generator.device).to(device)
    if use_cutmix:
        cut = torch.sqrt(1 - lam)
        box_h, box_w = (cut * h).round().long(), (cut * w).round().long()
        cy = _integers(n, 0, h - 1, generator, device)
        cx = _integers(n, 0, w - 1, generator, device)
        top, left = (cy - box_h // 2).clamp(0, h), (cx - box_w // 2).clamp(0, w)
        bottom, right = (cy + (box_h + 1) // 2).clamp(0, h), (cx + (box_w + 1) // 2).clamp(0, w)
        mask = box_masks(h, w, top, left, bottom - top, right - left)
        images = torch.where(mask, images[partner], images)
        lam = 1 - ((bottom - top) * (right - left)).float() / (h * w)  # the area actually pasted
    else:
        weight = lam.view(n, 1, 1, 1).to(images.dtype)
        images = weight * images + (1 - weight) * images[partner]
    one_hot = F.one_hot(labels, classes).float()
    targets = lam[:, None] * one_hot + (1 - lam[:, None]) * one_hot[partner]
    return images, targets


def augment_examples(images: np.ndarray, c, draws: int, seed: int = 0,
                     mean: Optional[list[float]] = None) -> np.ndarray:
    """(N, draws, C, H, W) float images in [0, 1]: each uint8 image under `draws` independent draws
    of the training augmentation (mixup / cutmix excluded: they need a batch and its labels)."""
    augment = build_augment(c, mean)
    batch = torch.from_numpy(np.ascontiguousarray(images)).repeat_interleave(draws, dim=0)
    generator = torch.Generator().manual_seed(seed)
    out = augment(batch, generator) if augment is not None else batch.float() / 255
    return out.view(len(images), draws, *images.shape[1:]).numpy()
