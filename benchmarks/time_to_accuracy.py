"""Time to accuracy on real CIFAR-10 images (cifar10-head by default), all in one process on the
same split:
  1. reference: report 001's recipe (cnn3-avg, Adam 1e-3, batch 64, crop+flip, at most 100 epochs,
     patience 5 on validation accuracy, best weights restored) trained the way the reports train
     (benchmarks/reference.py: per-sample numpy augmentation in a DataLoader);
  2. the same recipe through cifarlab (configs/quickstart.yaml with 100 epochs);
  3. cifarlab's best 3-conv-layer recipe, configs/cnn3-fast.yaml.
Wall time counts everything from reading the data to the test accuracy. Prints one JSON object.

    python benchmarks/time_to_accuracy.py [--root ../shared/data/cifar10-head] [--skip-reference]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import reference
import torch

import cifarlab
from cifarlab.config import load_config
from cifarlab.data.prepare import prepare_data
from cifarlab.models.build import build_model
from cifarlab.train.callbacks import EarlyStopping

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "cifar10-head"


def reference_run(data: list[str], max_epochs: int = 100, patience: int = 5) -> dict:
    start = time.perf_counter()
    config = load_config(REPO / "configs" / "quickstart.yaml", data)
    torch.set_num_threads(os.cpu_count() or 1)  # as the Trainer does
    splits = prepare_data(config)
    torch.manual_seed(config.seed)
    model = build_model(config.model, splits.dataset.image_shape, len(splits.dataset.classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = reference.train_loader(splits, 64)
    stopper = EarlyStopping("val_acc", patience)  # the rule cifarlab's runs use
    best_state, epoch = None, 0
    for epoch in range(1, max_epochs + 1):
        reference.train_epoch(model, optimizer, loader)
        if stopper.update(epoch, {"val_acc": reference.accuracy(model, splits.val, splits.mean, splits.std)}):
            best_state = copy.deepcopy(model.state_dict())
        if stopper.stop_reason():
            break
    model.load_state_dict(best_state)
    test = reference.accuracy(model, splits.test, splits.mean, splits.std)
    return {"recipe": "report 001 (cnn3-avg, Adam 1e-3, batch 64, crop+flip, patience 5)",
            "pipeline": "reference (per-sample DataLoader)", "test_acc": round(test, 4),
            "best_val_acc": round(stopper.best, 4), "best_epoch": stopper.best_epoch, "epochs_run": epoch,
            "wall_s": round(time.perf_counter() - start, 1)}


def cifarlab_run(recipe: str, path: Path, overrides: list[str], out_dir: str) -> dict:
    start = time.perf_counter()
    summary = cifarlab.fit(path, overrides=[*overrides, f"train.out_dir={out_dir}", "analysis.report=false",
                                            "analysis.tsne.layers=[]"], progress=False).summary
    return {"recipe": recipe, "pipeline": "cifarlab", "config": str(path.relative_to(REPO)),
            "test_acc": round(summary["test_acc"], 4), "best_val_acc": round(summary["best_value"], 4),
            "best_epoch": summary["best_epoch"], "epochs_run": summary["epochs_run"],
            "train_s": summary["train_time_s"], "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="CIFAR-10 folder (default: cifar10-head)")
    parser.add_argument("--skip-reference", action="store_true", help="only the two cifarlab runs")
    args = parser.parse_args()
    data = [f"data.root={args.root}"]
    results = []
    if not args.skip_reference:
        results.append(reference_run(data))
    with tempfile.TemporaryDirectory() as out_dir:
        results.append(cifarlab_run("report 001 (same as reference)", REPO / "configs" / "quickstart.yaml",
                                    [*data, "train.epochs=100"], out_dir))
        results.append(cifarlab_run("cnn3-fast", REPO / "configs" / "cnn3-fast.yaml", data, out_dir))
    print(json.dumps({"benchmark": "time_to_accuracy", "data": Path(args.root).name, "threads": torch.get_num_threads(),
                      "torch": torch.__version__, "results": results}, indent=2))


if __name__ == "__main__":
    main()
