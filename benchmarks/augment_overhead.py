"""What augmentation costs on the training path: training images per second of cnn3-avg (batch 64)
with no augmentation, crop-flip and keras-affine, in one process on the same data, epochs of the
three taken in turn (median of 5); and the aten ops
one augmentation call launches at several batch sizes (per-step Python work must not grow with the
batch). Prints one JSON object.

    python benchmarks/augment_overhead.py [--root ../shared/data/cifar10-head]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from cifarlab.config import load_config
from cifarlab.data.augment import build_augment
from cifarlab.train.trainer import Trainer

DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-head"
PRESETS = ["none", "crop-flip", "keras-affine"]


def epoch_rate(trainer: Trainer) -> float:
    """Images per second of one training epoch (the trainer's own batches and train_step)."""
    seen = 0
    start = time.perf_counter()
    for images, labels, targets in trainer.batches():
        trainer.train_step(images, targets)
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def interleaved_rates(data: list[str], rounds: int) -> dict[str, float]:
    """Median img/s per preset over `rounds` epochs, taking the presets in turn each round so that
    the machine's drift affects them alike (one warm-up epoch each first)."""
    trainers = {p: Trainer(load_config(overrides=[*data, "model.preset=cnn3-avg", f"augment.preset={p}",
                                                  "analysis.report=false"])) for p in PRESETS}
    for trainer in trainers.values():
        epoch_rate(trainer)
    rates: dict[str, list[float]] = {p: [] for p in PRESETS}
    for _ in range(rounds):
        for preset, trainer in trainers.items():
            rates[preset].append(epoch_rate(trainer))
    return {p: statistics.median(r) for p, r in rates.items()}


def ops_per_call(preset: str, batch: int) -> dict[str, float]:
    augment = build_augment(load_config(overrides=[f"augment.preset={preset}"]).augment, [0.5, 0.5, 0.5])
    images = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    augment(images, generator)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        augment(images, generator)
    ops = sum(1 for e in prof.events() if e.name.startswith("aten::"))
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        augment(images, generator)
    seconds = (time.perf_counter() - start) / repeats
    return {"batch": batch, "aten_ops": ops, "ms_per_call": round(1000 * seconds, 3),
            "us_per_image": round(1e6 * seconds / batch, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--rounds", type=int, default=5, help="epochs per preset, taken in turn")
    args = parser.parse_args()
    data = [f"data.root={args.root}"] if Path(args.root).exists() else ["data.dataset=synthetic"]
    rates = {p: round(r, 1) for p, r in interleaved_rates(data, args.rounds).items()}
    print(json.dumps({
        "benchmark": "augment_overhead", "model": "cnn3-avg", "batch_size": 64, "data": data[0],
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "train_img_per_s_median": rates,
        "slowdown_vs_none": {p: round(1 - rates[p] / rates["none"], 4) for p in PRESETS if p != "none"},
        "per_call": {p: [ops_per_call(p, b) for b in (64, 256, 1024)] for p in PRESETS if p != "none"},
    }, indent=2))


if __name__ == "__main__":
    main()
