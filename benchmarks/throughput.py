"""Training and evaluation images per second of cifarlab's own path (fit() end to end) for
cnn3-avg on real CIFAR-10 images, at several batch sizes. Prints one JSON object.

    python benchmarks/throughput.py [--root ../shared/data/cifar10-head] [--batches 64 128 256]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cifarlab import runs
from cifarlab.config import load_config
from cifarlab.train.trainer import eval_loader, evaluate, fit, prepare_data, select_device
from cifarlab.models.build import build_model

DEFAULT_ROOT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-head"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="CIFAR-10 folder (default: cifar10-head)")
    parser.add_argument("--preset", default="cnn3-avg")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--epochs", type=int, default=3, help="the first epoch is warm-up and not counted")
    args = parser.parse_args()
    data = [f"data.root={args.root}"] if Path(args.root).exists() else ["data.dataset=synthetic"]
    results = []
    with tempfile.TemporaryDirectory() as out:
        for batch in args.batches:
            config = load_config(overrides=[*data, f"model.preset={args.preset}", "augment.preset=crop-flip",
                                            f"train.batch_size={batch}", f"train.epochs={args.epochs}",
                                            "train.early_stopping.enabled=false", f"train.out_dir={out}"])
            run = fit(config)
            epochs = [r for r in runs.read_jsonl(run / runs.METRICS) if r["kind"] == "epoch"][1:]
            rates = [r["time"]["img_per_s"] for r in epochs]
            results.append({"batch_size": batch, "train_img_per_s": round(sum(rates) / len(rates), 1),
                            "train_img_per_s_per_epoch": rates})
        eval_rate = measure_eval(config)
    print(json.dumps({
        "benchmark": "throughput", "model": args.preset, "data": data[0], "augment": "crop-flip",
        "device": str(select_device("auto")), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "train": results, "eval_img_per_s": eval_rate,
    }, indent=2))


def measure_eval(config, repeats: int = 3) -> float:
    device = select_device(config.train.device)
    splits = prepare_data(config)
    model = build_model(config.model, splits.dataset.image_shape, len(splits.dataset.classes)).to(device)
    model = model.to(memory_format=torch.channels_last)
    loader = eval_loader(splits.test, splits, config, device)
    evaluate(model, loader)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        evaluate(model, loader)
    return round(repeats * len(splits.test[1]) / (time.perf_counter() - start), 1)


if __name__ == "__main__":
    main()
