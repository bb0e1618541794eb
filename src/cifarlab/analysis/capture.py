"""Activations of named layers, captured with forward hooks; and the callback that saves the
t-SNE layers' features of a fixed sample at chosen epochs (reports 000 and 001)."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from ..config import TsneConfig
from ..models.build import check_layer_names
from ..errors import ConfigError
from ..evaluation import eval_mode
from ..files import atomic_write, save_array
from ..hooks import Callback, TrainerView

FEATURES = "features"


def check_layers(model: nn.Module, layers: list[str]) -> None:
    check_layer_names(model, layers)


@contextmanager
def recording(model: nn.Module, layers: list[str]) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Within the block, every forward pass appends each named layer's output to the dict."""
    check_layers(model, layers)
    found: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    modules = dict(model.named_modules())
    def keep(layer: str, out: Any) -> None:
        if not isinstance(out, torch.Tensor):  # a module returning a tuple (an LSTM, an attention block)
            raise ConfigError(f"analysis.tsne.layers: layer {layer!r} gives a {type(out).__name__}, not a tensor")
        found[layer].append(out.detach().clone())  # a copy: an in-place activation called next must not change it

    hooks = [modules[layer].register_forward_hook(lambda m, i, out, layer=layer: keep(layer, out)) for layer in layers]
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


@torch.inference_mode()
def capture(model: nn.Module, loader, layers: list[str]) -> dict[str, np.ndarray]:
    """{layer: (N, D) float16 features} of every example of an (unshuffled) loader, in eval mode."""
    with eval_mode(model), recording(model, layers) as found:
        batches = 0
        for images, _ in loader:
            model(images)
            batches += 1
    for layer, outs in found.items():
        if len(outs) != batches:  # a module the forward calls several times (one ReLU reused after each conv)
            raise ConfigError(f"analysis.tsne.layers: layer {layer!r} runs {len(outs) // max(batches, 1)} times in "
                              "one forward pass; name a layer that runs once")
    return {layer: torch.cat([t.flatten(1).float() for t in outs]).cpu().numpy().astype(np.float16)
            for layer, outs in found.items()}


@torch.inference_mode()
def activations_of(model: nn.Module, image: torch.Tensor, layers: list[str]) -> dict[str, np.ndarray]:
    """{layer: (C, H, W) or (D,) float32} for one normalized image (1, C, H, W)."""
    with eval_mode(model), recording(model, layers) as found:
        model(image)
    return {layer: outs[0][0].float().cpu().numpy() for layer, outs in found.items()}


class FeatureCapture(Callback):
    """A training callback: features/<layer>-epochNNN.npy (float16) of `settings.samples` images of
    `settings.split` (a seeded pick, the same every epoch) with features/labels.npy, at the chosen
    epochs (default: the beginning, middle and end: 0, the network before its first step, the middle
    and the last epoch) and at the last epoch of a run that stopped early."""

    state_key = "FeatureCapture"

    def __init__(self, settings: TsneConfig):
        self.settings = settings

    def on_fit_start(self, trainer: TrainerView) -> None:
        s, config = self.settings, trainer.config
        check_layers(trainer.model, s.layers)
        images, labels = getattr(trainer.splits, s.split)
        pick = np.sort(np.random.default_rng(config.seed).permutation(len(labels))[:s.samples])
        self.loader = trainer.loader(s.split, (images[pick], labels[pick]))
        last = config.train.epochs
        self.epochs = set(s.epochs if s.epochs is not None else [0, (last + 1) // 2, last])
        if 0 in self.epochs and trainer.epoch == 0 and not trainer.resuming:  # the untrained network
            self.save(trainer, 0)

    def save(self, trainer: TrainerView, epoch: int) -> None:
        folder = Path(trainer.run_dir) / FEATURES
        folder.mkdir(exist_ok=True)
        atomic_write(folder / "labels.npy", lambda tmp: save_array(tmp, self.loader.labels.cpu().numpy()))
        for layer, values in capture(trainer.model, self.loader, self.settings.layers).items():
            atomic_write(folder / f"{layer}-epoch{epoch:03d}.npy", lambda tmp, v=values: save_array(tmp, v))

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        if record["epoch"] in self.epochs:
            self.save(trainer, record["epoch"])

    def on_train_end(self, trainer: TrainerView) -> None:
        if trainer.epoch not in self.epochs:  # training stopped early: its last epoch is the "end"
            self.save(trainer, trainer.epoch)
