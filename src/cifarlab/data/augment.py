"""Batched augmentations on device tensors: every sample draws its own parameters from one
torch.Generator, and no Python runs per sample.

Images enter as uint8 (N, C, H, W) and leave as float in [0, 1]. Crop and flips are index
operations; shift, rotation, shear and zoom are one affine_grid + grid_sample call per batch, with
the Keras (scipy.ndimage) fill modes nearest, constant (cval) and reflect. Mixup and cutmix act later, on the
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

GRID_PADDING = {"nearest": "border", "constant": "zeros", "reflect": "reflection"}
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


def affine_matrices(height: int, width: int, angle: torch.Tensor, shear: torch.Tensor, zoom_x: torch.Tensor,
                    zoom_y: torch.Tensor, shift_x: torch.Tensor, shift_y: torch.Tensor) -> torch.Tensor:
    """(N, 3, 3) matrices mapping an output pixel, in pixel units about the image center (x right,
    y down), to the input pixel it samples, composed as Keras' apply_affine_transform composes them:

        input = R(angle) (Sh(shear) Z(zoom) output - shift)

    Angles are degrees, positive counter-clockwise as displayed (Keras). Zoom < 1 enlarges the
    content (Keras). Without rotation a shift (dx, dy) moves the content right and down; with one,
    the shift is applied before the rotation, as in Keras (its tx, ty are -dx, -dy)."""
    a, s = torch.deg2rad(angle), torch.deg2rad(shear)
    cos, sin = torch.cos(a), torch.sin(a)
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    # Sampling input R(a) @ out with y pointing down turns the content counter-clockwise on screen.
    rotate = torch.stack([torch.stack([cos, -sin, zero], -1), torch.stack([sin, cos, zero], -1),
                          torch.stack([zero, zero, one], -1)], -2)
    shear_m = torch.stack([torch.stack([one, -torch.sin(s), zero], -1), torch.stack([zero, torch.cos(s), zero], -1),
                           torch.stack([zero, zero, one], -1)], -2)
    zoom_m = torch.stack([torch.stack([zoom_x, zero, zero], -1), torch.stack([zero, zoom_y, zero], -1),
                          torch.stack([zero, zero, one], -1)], -2)
    shift_m = torch.stack([torch.stack([one, zero, -shift_x], -1), torch.stack([zero, one, -shift_y], -1),
                           torch.stack([zero, zero, one], -1)], -2)
    return rotate @ shift_m @ shear_m @ zoom_m


# A sample point counts as inside the image (fill_mode constant) up to this far past the outermost pixel
# centers: float rounding of an exact border position must not turn an edge pixel into the fill.
INSIDE_TOLERANCE = 1e-6


def warp(images: torch.Tensor, matrices: torch.Tensor, fill: str = "nearest", cval: float = 0.0) -> torch.Tensor:
    """Resample float images through pixel-space matrices (see affine_matrices), bilinear, with the
    fill modes of scipy.ndimage (which Keras' ImageDataGenerator uses): nearest repeats the edge pixel,
    reflect mirrors about the border (d c b a | a b c d | d c b a), and constant gives `cval` to every
    sample point outside the outermost pixel centers while points inside interpolate inside pixels
    only (no blend of the image into the fill color). Sample points are computed in float64."""
    n, _, h, w = images.shape
    device = images.device
    m = matrices.to(device=device, dtype=torch.float64)
    ys = torch.arange(h, device=device, dtype=torch.float64) + 0.5 - h / 2
    xs = torch.arange(w, device=device, dtype=torch.float64) + 0.5 - w / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    points = torch.stack([gx, gy, torch.ones_like(gx)], -1).reshape(-1, 3)  # (H*W, 3) output pixels
    source = points @ m[:, :2, :].transpose(1, 2)  # (N, H*W, 2): input pixel about the center
    x = source[..., 0] + (w / 2 - 0.5)  # input pixel index (column), 0 = the first pixel's center
    y = source[..., 1] + (h / 2 - 0.5)
    # normalized coordinates of grid_sample(align_corners=False): -1 and 1 are the outer pixel edges
    grid = torch.stack([(2 * x + 1) / w - 1, (2 * y + 1) / h - 1], -1).view(n, h, w, 2).to(images.dtype)
    if fill == "constant":
        tol = INSIDE_TOLERANCE
        inside = (x >= -tol) & (x <= w - 1 + tol) & (y >= -tol) & (y <= h - 1 + tol)
        sampled = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return sampled.masked_fill(~inside.view(n, 1, h, w), cval)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=GRID_PADDING[fill], align_corners=False)


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


def draw_affine(n: int, height: int, width: int, c, generator: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Per-sample affine parameters from an AugmentConfig's ranges (Keras ImageDataGenerator rules:
    shifts per draw_shift; zoom z draws each axis from [1-z, 1+z]; rotation and shear from [-r, r])."""
    return {
        "angle": _uniform(n, -c.rotation, c.rotation, generator, device),
        "shear": _uniform(n, -c.shear, c.shear, generator, device),
        "zoom_x": _uniform(n, 1 - c.zoom, 1 + c.zoom, generator, device),
        "zoom_y": _uniform(n, 1 - c.zoom, 1 + c.zoom, generator, device),
        "shift_x": draw_shift(n, c.width_shift, width, generator, device),
        "shift_y": draw_shift(n, c.height_shift, height, generator, device),
    }


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
    return bool(c.rotation or c.shear or c.zoom or c.width_shift or c.height_shift)


def _affine(x: torch.Tensor, c, generator: torch.Generator, fill: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    params = draw_affine(n, h, w, c, generator, x.device)
    return warp(x, affine_matrices(h, w, **params), c.fill_mode, c.cval / 255.0)


@dataclass(frozen=True)
class Augmentation:
    """One step of the training augmentation: whether an AugmentConfig turns it on, and the step itself
    (float images in [0, 1], the config, the generator, the per-channel erase fill) -> images."""

    enabled: Callable[[Any], bool]
    apply: Callable[[torch.Tensor, Any, torch.Generator, torch.Tensor], torch.Tensor]


# The steps in the order they run, which fixes the order of the generator's draws: reordering them or
# inserting one before others changes every augmented batch (and the resume of a run in progress).
AUGMENTATIONS: dict[str, Augmentation] = {
    "crop": Augmentation(lambda c: bool(c.crop), lambda x, c, g, fill: random_crop(x, c.crop, g, c.crop_fill)),
    "flip": Augmentation(lambda c: bool(c.flip), lambda x, c, g, fill: random_flip(x, g, dim=3)),
    "vflip": Augmentation(lambda c: bool(c.vflip), lambda x, c, g, fill: random_flip(x, g, dim=2)),
    "affine": Augmentation(_affine_enabled, _affine),
    "color": Augmentation(lambda c: bool(c.brightness or c.contrast or c.saturation),
                          lambda x, c, g, fill: jitter_color(x, g, c.brightness, c.contrast, c.saturation)),
    "cutout": Augmentation(lambda c: bool(c.cutout), lambda x, c, g, fill: cutout(x, c.cutout, g, fill)),
    "erasing": Augmentation(lambda c: bool(c.erasing), lambda x, c, g, fill: random_erasing(x, c.erasing, g, fill)),
}


def build_augment(c, mean: Optional[list[float]] = None) -> Optional[Augment]:
    """The training-time augmentation an AugmentConfig describes (uint8 in, float [0, 1] out): its
    enabled AUGMENTATIONS in their order, or None when none is. Erased pixels take the channel mean:
    zero after normalization."""
    steps = [step.apply for step in AUGMENTATIONS.values() if step.enabled(c)]
    if not steps:
        return None

    def apply(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        x = images.float().div_(255)
        fill = torch.tensor(mean if mean is not None else [0.0] * x.shape[1], device=x.device, dtype=x.dtype)
        for step in steps:
            x = step(x, c, generator, fill)
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
