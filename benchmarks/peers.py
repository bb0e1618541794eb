"""cifarlab against the pipeline the reports used (`make bench-peers`): tf.keras `model.fit` over
`ImageDataGenerator.flow` (benchmarks/keras_peer.py, in its own venv with tensorflow-cpu and tf-keras,
made here on first use: never a cifarlab dependency) and cifarlab on the same network (report 000's
3-layer CNN, Keras defaults), augmentation (shift-flip, keras-affine), optimizer, batch, epochs and
data (cifar10-head, all training images, the same arrays and normalization). Rates are training
images per second over epochs 2.. (epoch 1 holds tracing and warm-up), the median over --repeats
alternating rounds with min / max; both pipelines' test accuracy after the same epochs. cifarlab runs
twice: float32 (Keras' precision) and bf16 autocast (configs' `train.precision: bf16`). Prints one JSON.

    python benchmarks/peers.py [--root ../shared/data/cifar10-head] [--epochs 10] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

import cifarlab
from cifarlab.config import load_config
from cifarlab.data.prepare import prepare_data

from measure import later_rate, spread

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "cifar10-head"
VENV = REPO / ".venv-peers"
KERAS = ["tensorflow-cpu==2.21.0", "tf-keras==2.21.0", "scipy"]


def keras_python() -> Path:
    """The peers venv's python, made (pip from the package registry) when missing."""
    python = VENV / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *KERAS], check=True)
    return python


def settings(args: argparse.Namespace, augment: str) -> dict:
    return {"defaults": "keras", "seed": 0,
            "data": {"dataset": "cifar10", "root": args.root, "val_size": 0},
            "augment": {"preset": augment}, "model": {"preset": "cnn3"},
            "optim": {"name": "adam", "lr": args.lr},
            "train": {"epochs": args.epochs, "batch_size": args.batch_size, "evaluate": [],
                      "early_stopping": {"enabled": False}},
            "analysis": {"report": False, "tsne": {"layers": []}}}


def keras_round(args: argparse.Namespace, data: Path, augment: str) -> dict:
    out = subprocess.run([str(keras_python()), str(REPO / "benchmarks" / "keras_peer.py"), str(data), "--augment",
                          augment, "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                          "--lr", str(args.lr)], check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {"img_per_s": result["images"] / statistics.median(result["epoch_s"][1:]), "test_acc": result["test_acc"],
            "version": result["tensorflow"]}


def cifarlab_round(args: argparse.Namespace, augment: str, precision: str, out_dir: str) -> dict:
    config = settings(args, augment)
    config["train"].update(precision=precision, out_dir=out_dir)
    run = cifarlab.fit(config, progress=False)
    return {"img_per_s": later_rate(run), "test_acc": run.summary["test_acc"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="CIFAR-10 folder (default: cifar10-head)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    splits = prepare_data(load_config(settings(args, "shift-flip")))
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data.npz"
        np.savez(data, x_train=splits.train[0], y_train=splits.train[1], x_test=splits.test[0], y_test=splits.test[1],
                 mean=np.asarray(splits.mean), std=np.asarray(splits.std), classes=len(splits.dataset.classes))
        for augment in ("shift-flip", "keras-affine"):
            rounds: dict[str, list[dict]] = {"keras": [], "cifarlab_float32": [], "cifarlab_bf16": []}
            for _ in range(args.repeats):  # alternating, so a drifting machine shifts both alike
                rounds["keras"].append(keras_round(args, data, augment))
                for precision in ("float32", "bf16"):
                    rounds[f"cifarlab_{precision}"].append(cifarlab_round(args, augment, precision, folder))
            row = {name: {"img_per_s": spread([r["img_per_s"] for r in runs], 0),
                          "test_acc": spread([r["test_acc"] for r in runs], 4)} for name, runs in rounds.items()}
            keras = row["keras"]["img_per_s"]["median"]
            for precision in ("float32", "bf16"):
                row[f"ratio_{precision}"] = round(row[f"cifarlab_{precision}"]["img_per_s"]["median"] / keras, 2)
            row["keras"]["tensorflow"] = rounds["keras"][0]["version"]
            results[augment] = row
    print(json.dumps({"benchmark": "peers", "data": Path(args.root).name, "images": len(splits.train[1]),
                      "network": "report 000 cnn3 (Keras defaults)", "optimizer": f"adam {args.lr}",
                      "batch_size": args.batch_size, "epochs": args.epochs, "repeats": args.repeats,
                      "threads": torch.get_num_threads(), "torch": torch.__version__, "target_ratio": 1.5,
                      "results": results}, indent=2))


if __name__ == "__main__":
    main()
