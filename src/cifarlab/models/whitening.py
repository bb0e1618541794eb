"""The `whiten` layer kind: a frozen patch-whitening first convolution fitted on the training split
(airbench's first layer: Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU").

Its filters are the eigenvectors of the covariance of the training images' k x k patches (as the
network sees them: after the run's normalization), each scaled by 1 / sqrt(eigenvalue + eps), and
the same filters negated: 2 * C * k * k output channels, no padding. The filters are a buffer, not a
parameter: no optimizer moves them, and they live in the model's state dict, so best.pt, last.pt,
eval, predict, the feature maps and every export carry exactly the filters training used. The bias is
a parameter that trains for `bias_epochs` epochs and is then frozen (the optimizer gives its group a
zero learning rate from then on: train/optim.py parameter_groups, train/schedules.py).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

# Images of the training split the covariance is estimated from (airbench: 5,000), in chunks of this many.
CHUNK = 500


class PatchWhitening(nn.Module):
    """x -> conv2d(x, whitening filters, bias), valid padding; fit() computes the filters."""

    def __init__(self, channels: int, kernel: int, eps: float, samples: int, bias_epochs: Optional[int]):
        super().__init__()
        width = 2 * channels * kernel * kernel
        self.kernel, self.eps, self.samples = kernel, eps, samples
        self.bias_epochs = bias_epochs  # train/optim.py freezes the bias after this many epochs (None: never)
        # until fit(): the filters of white patches (covariance I): each pixel of the patch, and its negative
        eye = torch.eye(width // 2).view(-1, channels, kernel, kernel)
        self.register_buffer("weight", torch.cat([eye, -eye]))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kernel={self.kernel}, eps={self.eps}, "
                f"bias_epochs={self.bias_epochs}")

    @torch.no_grad()
    def fit(self, images: torch.Tensor) -> None:
        """Set the filters from normalized float images (N, C, H, W)."""
        self.weight.copy_(whitening_filters(images, self.kernel, self.eps).to(self.weight))


def patch_covariance(images: torch.Tensor, kernel: int) -> torch.Tensor:
    """(C k k, C k k) float64: the mean outer product of every k x k patch (stride 1) with itself,
    the patch flattened channel-major (the layout of a conv filter)."""
    c = images.shape[1]
    total = torch.zeros(c * kernel * kernel, c * kernel * kernel, dtype=torch.float64, device=images.device)
    count = 0
    for chunk in images.split(CHUNK):
        patches = chunk.double().unfold(2, kernel, 1).unfold(3, kernel, 1)  # (N, C, H', W', k, k)
        flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, c * kernel * kernel)
        total += flat.T @ flat
        count += len(flat)
    return total / count


def whitening_filters(images: torch.Tensor, kernel: int, eps: float) -> torch.Tensor:
    """(2 C k k, C, k, k) float64 filters: the patch covariance's eigenvectors, largest eigenvalue first,
    each divided by sqrt(eigenvalue + eps), then the same filters negated."""
    c = images.shape[1]
    values, vectors = torch.linalg.eigh(patch_covariance(images, kernel))
    values, vectors = values.flip(0), vectors.flip(1)
    filters = (vectors.T / torch.sqrt(values.clamp(min=0) + eps)[:, None]).reshape(-1, c, kernel, kernel)
    return torch.cat([filters, -filters])


def fit_whitening(model: nn.Module, loader) -> None:
    """Fit every PatchWhitening of `model` on the first `samples` images of `loader`'s split (a
    DeviceLoader: its uint8 images, normalized as training normalizes them). A resumed run fits them
    too, and last.pt's filters (the same) then replace them."""
    for layer in [m for m in model.modules() if isinstance(m, PatchWhitening)]:
        images = loader.images[:layer.samples]
        layer.fit(torch.cat([loader.normalize(chunk).float() for chunk in images.split(CHUNK)]))


def build_whitening(a: dict[str, Any], shape: tuple, where: str) -> tuple[nn.Module, tuple]:
    kernel = a["kernel"]
    h, w = shape[1] - kernel + 1, shape[2] - kernel + 1
    if h < 1 or w < 1:
        raise ConfigError(f"{where}: kernel {kernel} does not fit a {shape[1]}x{shape[2]} input")
    module = PatchWhitening(shape[0], kernel, float(a["eps"]), a["samples"], a["bias_epochs"])
    return module, (module.weight.shape[0], h, w)


def check_whitening(a: dict[str, Any], where: str) -> None:
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    if not whole(a["kernel"]) or a["kernel"] < 1:
        raise ConfigError(f"{where}: whiten kernel={a['kernel']!r} must be a whole number >= 1")
    if isinstance(a["eps"], bool) or not isinstance(a["eps"], (int, float)) or a["eps"] <= 0:
        raise ConfigError(f"{where}: whiten eps={a['eps']!r} must be a number > 0")
    if not whole(a["samples"]) or a["samples"] < 1:
        raise ConfigError(f"{where}: whiten samples={a['samples']!r} must be a whole number >= 1")
    if a["bias_epochs"] is not None and (not whole(a["bias_epochs"]) or a["bias_epochs"] < 0):
        raise ConfigError(f"{where}: whiten bias_epochs={a['bias_epochs']!r} must be a whole number >= 0 "
                          "(or null: never frozen)")
