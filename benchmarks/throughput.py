"""Training and evaluation images per second of cnn3-avg on real CIFAR-10 images: cifarlab's path
(the Trainer's own batches and train step: uint8 on the device, batched crop+flip, channels_last)
against a reference pipeline written the way the seed reports train (a torch DataLoader over a
Dataset that crops and flips each sample in numpy, NCHW float tensors, Adam), both in this process
on the same data. Also measures this machine's float32 matmul peak and prints model FLOP
utilization (model FLOPs x images/s / peak; training counted as 3x the forward FLOPs), cifarlab's
rate with bf16 autocast against the bf16 matmul peak, and cifarlab's rate with train.compile=true at
the first batch size (with the compile warm-up). Every rate is measured --repeats times, each round
with its own peak (this machine drifts by 15 % and more); min / median / max are reported.
Prints one JSON object.

    python benchmarks/throughput.py [--root ../shared/data/cifar10-head] [--batches 64 128 256] [--repeats 3]
                                    [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import reference
import torch
from torch import nn

from cifarlab.config import load_config
from cifarlab.models.build import build_model
from cifarlab.evaluation import evaluate
from cifarlab.train.trainer import Trainer

from measure import spread

DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-head"


def forward_flops(model: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Multiply-adds x 2 of the conv and dense layers for one image."""
    total = 0
    hooks = []

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += 2 * k * output.numel() // output.shape[0]
        elif isinstance(module, nn.Linear):
            total += 2 * module.in_features * module.out_features

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(count))
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, *input_shape))
    for h in hooks:
        h.remove()
    return total


def matmul_peak(size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """GFLOP/s of a square `dtype` matmul, best of `repeats`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def reference_rate(trainer: Trainer, batch: int, epochs: int) -> float:
    """Median img/s per epoch of the reference pipeline (after one warm-up epoch)."""
    torch.manual_seed(0)
    model = build_model(trainer.config.model, trainer.input_shape, len(trainer.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = reference.train_loader(trainer.splits, batch)
    rates = []
    for _ in range(epochs + 1):
        start = time.perf_counter()
        seen = reference.train_epoch(model, optimizer, loader)
        rates.append(seen / (time.perf_counter() - start))
    return statistics.median(rates[1:])


def cifarlab_rate(trainer: Trainer, epochs: int) -> tuple[float, float]:
    """(median img/s per epoch after the first, seconds the first epoch took beyond that rate: warm-up)."""
    rates, times = [], []
    for _ in range(epochs + 1):
        seen, start = 0, time.perf_counter()
        for images, labels, targets in trainer.batches():
            trainer.train_step(images, targets)
            seen += len(labels)
        times.append(time.perf_counter() - start)
        rates.append(seen / times[-1])
    rate = statistics.median(rates[1:])
    return rate, times[0] - seen / rate


def eval_rate(trainer: Trainer, repeats: int = 3) -> float:
    loader = trainer.eval_loaders["val"]
    evaluate(trainer.model, loader)
    start = time.perf_counter()
    for _ in range(repeats):
        evaluate(trainer.model, loader)
    return repeats * len(loader.labels) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="CIFAR-10 folder (default: cifar10-head)")
    parser.add_argument("--preset", default="cnn3-avg")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--epochs", type=int, default=2, help="measured epochs per setting, after one warm-up")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per setting (this machine drifts)")
    parser.add_argument("--no-compile", action="store_true", help="skip the train.compile=true measurement")
    args = parser.parse_args()
    data = [f"data.root={args.root}"] if Path(args.root).exists() else ["data.dataset=synthetic"]

    def trainer_for(batch: int, *extra: str) -> Trainer:
        return Trainer(load_config(overrides=[*data, f"model.preset={args.preset}", "augment.preset=crop-flip",
                                              f"train.batch_size={batch}", "analysis.report=false", *extra]))

    results = []
    peaks: dict[str, list[float]] = {"float32": [], "bf16": []}
    for batch in args.batches:
        trainer = trainer_for(batch)
        flops = forward_flops(build_model(trainer.config.model, trainer.input_shape, 10), trainer.input_shape)
        rounds: dict[str, list[float]] = {key: [] for key in ("ours", "theirs", "mfu", "ref_mfu", "bf16", "bf16_mfu")}
        bf16 = trainer_for(batch, "train.precision=bf16")
        for _ in range(args.repeats):  # each round: its own peak, so drift moves rate and peak alike
            peak, peak_bf16 = matmul_peak(), matmul_peak(dtype=torch.bfloat16)
            peaks["float32"].append(peak)
            peaks["bf16"].append(peak_bf16)
            ours, _ = cifarlab_rate(trainer, args.epochs)
            theirs = reference_rate(trainer, batch, args.epochs)
            ours_bf16, _ = cifarlab_rate(bf16, args.epochs)
            rounds["ours"].append(ours)
            rounds["theirs"].append(theirs)
            rounds["bf16"].append(ours_bf16)
            rounds["mfu"].append(3 * flops * ours / (peak * 1e9))
            rounds["ref_mfu"].append(3 * flops * theirs / (peak * 1e9))
            rounds["bf16_mfu"].append(3 * flops * ours_bf16 / (peak_bf16 * 1e9))
        results.append({
            "batch_size": batch, "cifarlab_train_img_per_s": spread(rounds["ours"]),
            "reference_train_img_per_s": spread(rounds["theirs"]),
            "speedup": round(statistics.median(rounds["ours"]) / statistics.median(rounds["theirs"]), 2),
            "cifarlab_train_mfu": spread(rounds["mfu"], 3), "reference_train_mfu": spread(rounds["ref_mfu"], 3),
            "cifarlab_bf16_train_img_per_s": spread(rounds["bf16"]),
            "cifarlab_bf16_train_mfu_of_bf16_peak": spread(rounds["bf16_mfu"], 3),
            "cifarlab_eval_img_per_s": round(eval_rate(trainer), 1),
            "model_gflop_per_image_forward": round(flops / 1e9, 4)})
    compiled = None
    if not args.no_compile:
        batch = args.batches[0]
        rate, warmup = cifarlab_rate(trainer_for(batch, "train.compile=true"), args.epochs)
        compiled = {"batch_size": batch, "train_img_per_s": round(rate, 1), "warmup_s": round(warmup, 1),
                    "train_mfu": round(3 * flops * rate / (statistics.median(peaks["float32"]) * 1e9), 3)}
    print(json.dumps({
        "benchmark": "throughput", "model": args.preset, "data": data[0].split("=")[-1].split("/")[-1],
        "augment": "crop-flip", "device": str(trainer.device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "repeats": args.repeats, "mfu_target_batch_64": 0.75,
        "matmul_peak_gflop_per_s": {name: spread(values) for name, values in peaks.items()},
        "results": results, "cifarlab_compiled": compiled,
    }, indent=2))


if __name__ == "__main__":
    main()
