"""Every CUDA path of cifarlab in one script (issue 25, item 4), for a machine with a GPU; under 5
minutes on one. Each check runs on its own and records its error instead of stopping the others:

  peak        bf16 / fp16 / float32 (TF32 off) matmul GFLOP/s of the GPU, measured here
  precision   bf16 and fp16 (+ GradScaler) training of cnn3-fast, and resume: 2 epochs straight against
              1 epoch, stopped, resumed to 2 (metrics and weights compared; cuDNN may choose
              non-deterministic kernels, so `bit_exact` is reported, not asserted)
  compile     train.compile in fresh processes: a cold inductor cache, then warm on what it filled
  ranks       train.devices = the visible GPUs (NCCL), when there are at least 2
  recipes     configs/cnn3-fast.yaml and configs/fmnist-fast.yaml: img/s after the first epoch and the
              model FLOP utilization against the measured bf16 peak (training = 3 x forward FLOPs)
  tsne        configs/quickstart.yaml with t-SNE of two layers: capture on the GPU, then the analysis phase

Data: cifar10-head (--root) and Fashion-MNIST where found, else the synthetic dataset (said per check).
Prints one JSON object.

    python benchmarks/gpu_check.py [--root ../shared/data/cifar10-head] [--epochs 3] [--only peak,recipes]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import cifarlab
from cifarlab import runs
from cifarlab.config import load_config
from cifarlab.models.build import build_model

from measure import later_rate, train_process
from throughput import forward_flops

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "cifar10-head"
CHECKS = ("peak", "precision", "compile", "ranks", "recipes", "tsne")


def cuda_peak(dtype: torch.dtype, size: int = 8192, repeats: int = 10) -> float:
    """GFLOP/s of a square matmul on the GPU, best of `repeats` (CUDA events)."""
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * size ** 3 / best / 1e9


def check_peak(ctx: dict) -> dict:
    torch.backends.cuda.matmul.allow_tf32 = False
    peaks = {"bf16": cuda_peak(torch.bfloat16), "fp16": cuda_peak(torch.float16), "float32": cuda_peak(torch.float32)}
    ctx["peak_bf16"] = peaks["bf16"]
    return {name: round(value, 1) for name, value in peaks.items()}


class StopAfter(cifarlab.Callback):
    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_epoch_end(self, trainer, record):
        if record["epoch"] == self.epoch:
            trainer.stop("gpu_check: stop for resume")


def epoch_rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time"} for r in runs.read_jsonl(run / "metrics.jsonl")
            if r["kind"] == "epoch"]


def check_precision(ctx: dict) -> dict:
    out = {}
    for precision in ("bf16", "fp16"):
        overrides = [*ctx["cifar"], f"train.precision={precision}", "train.epochs=2", "data.train_limit=2048",
                     "model.preset=cnn3-fast", "optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9",
                     "augment.preset=crop-flip", "train.early_stopping.enabled=false", *ctx["quiet"]]
        straight = cifarlab.fit(None, overrides=[*overrides, f"train.out_dir={ctx['tmp']}/{precision}-a"],
                                progress=False).path
        half = cifarlab.fit(None, overrides=[*overrides, f"train.out_dir={ctx['tmp']}/{precision}-b"],
                            callbacks=[StopAfter(1)], progress=False).path
        resumed = cifarlab.resume(half, progress=False).path
        a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
        b = torch.load(resumed / "checkpoints" / "last.pt", weights_only=True)
        diff = max((a["model"][k].float() - b["model"][k].float()).abs().max().item() for k in a["model"]
                   if a["model"][k].is_floating_point())
        summary = runs.read_summary(straight)
        out[precision] = {"test_acc": summary["test_acc"], "img_per_s": summary["train_img_per_s"],
                          "scaler_in_last_pt": bool(a.get("scaler")), "resume_bit_exact": diff == 0
                          and epoch_rows(straight) == epoch_rows(resumed), "resume_max_weight_diff": diff}
    return out


def check_compile(ctx: dict) -> dict:
    cache = Path(ctx["tmp"]) / "inductor"
    rows = {}
    for name in ("cold", "warm"):
        run, wall = train_process(REPO / "configs" / "cnn3-fast.yaml", [*ctx["cifar"], "train.epochs=2",
                                                                          "train.compile=true"],
                                  Path(tempfile.mkdtemp(dir=ctx["tmp"])), env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
        rows[name] = {"wall_s": round(wall, 1), "first_epoch_s": run.history[0]["time"]["epoch_s"],
                      "later_img_per_s": later_rate(run), "test_acc": run.summary["test_acc"]}
    return rows


def check_ranks(ctx: dict) -> dict:
    gpus = torch.cuda.device_count()
    if gpus < 2:
        return {"skipped": f"{gpus} GPU visible; data-parallel ranks need at least 2"}
    run, wall = train_process(REPO / "configs" / "cnn3-fast.yaml", [*ctx["cifar"], "train.epochs=2",
                                                                      f"train.devices={gpus}"],
                              Path(tempfile.mkdtemp(dir=ctx["tmp"])))
    return {"devices": gpus, "wall_s": round(wall, 1), "later_img_per_s": later_rate(run),
            "test_acc": run.summary["test_acc"]}


def recipe_rate(ctx: dict, config: str, data: list[str]) -> dict:
    run, wall = train_process(REPO / "configs" / config, [*data, f"train.epochs={ctx['epochs']}", "train.device=cuda"],
                              Path(tempfile.mkdtemp(dir=ctx["tmp"])))
    shape = run.loaded.input_shape
    flops = forward_flops(build_model(run.loaded.config.model, shape, len(run.loaded.classes)), shape)
    rate = later_rate(run)
    row = {"wall_s": round(wall, 1), "later_img_per_s": rate, "forward_mflops": round(flops / 1e6, 1),
           "test_acc": run.summary["test_acc"], "epochs": ctx["epochs"]}
    if ctx.get("peak_bf16"):
        row["mfu_of_bf16_peak"] = round(3 * flops * rate / (ctx["peak_bf16"] * 1e9), 4)
    return row


def check_recipes(ctx: dict) -> dict:
    return {"cnn3-fast": recipe_rate(ctx, "cnn3-fast.yaml", ctx["cifar"]),
            "fmnist-fast": recipe_rate(ctx, "fmnist-fast.yaml", ctx["fmnist"])}


def check_tsne(ctx: dict) -> dict:
    start = time.perf_counter()
    run = cifarlab.fit(REPO / "configs" / "quickstart.yaml",
                       overrides=[*ctx["cifar"], "train.epochs=2", "train.device=cuda", "analysis.tsne.layers=[flatten,fc1]",
                                  "analysis.tsne.samples=1000", f"train.out_dir={ctx['tmp']}/tsne"], progress=False)
    summary = run.summary
    return {"wall_s": round(time.perf_counter() - start, 1), "train_s": summary["train_time_s"],
            "analysis": summary.get("analysis"), "test_acc": summary["test_acc"]}


def data_overrides(root: str) -> tuple[list[str], list[str], dict]:
    """(cifar overrides, fashion-mnist overrides, what was found)."""
    found = {}
    if (Path(root) / "cifar-10-batches-py").is_dir():
        cifar, found["cifar10"] = [f"data.root={root}"], root
    else:
        cifar, found["cifar10"] = ["data.dataset=synthetic"], "synthetic (cifar10-head not found)"
    try:
        load = load_config(None, ["data.dataset=fashion-mnist"])
        from cifarlab.data.sources import dataset_from_config

        dataset_from_config(load.data, 0)
        fmnist, found["fashion-mnist"] = [], "found"
    except Exception:  # noqa: BLE001 - any reason it cannot be read: fall back and say so
        fmnist, found["fashion-mnist"] = ["data.dataset=synthetic"], "synthetic (Fashion-MNIST not found)"
    return cifar, fmnist, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="CIFAR-10 folder (default: cifar10-head)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the recipes' throughput runs")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated checks of {', '.join(CHECKS)}")
    args = parser.parse_args()
    result: dict = {"cuda": torch.cuda.is_available()}
    if not torch.cuda.is_available():
        result["error"] = "no CUDA device: this script checks the GPU paths; run it where the device tool lends a GPU"
        print(json.dumps(result, indent=2))
        sys.exit(1)
    props = torch.cuda.get_device_properties(0)
    result["gpu"] = {"name": props.name, "count": torch.cuda.device_count(), "memory_gib": round(props.total_memory / 2**30, 1),
                     "bf16": torch.cuda.is_bf16_supported(), "torch": torch.__version__, "cuda": torch.version.cuda}
    cifar, fmnist, result["data"] = data_overrides(args.root)
    with tempfile.TemporaryDirectory() as tmp:
        ctx = {"tmp": tmp, "cifar": cifar, "fmnist": fmnist, "epochs": args.epochs,
               "quiet": ["analysis.report=false", "analysis.tsne.layers=[]"]}
        os.environ.setdefault("CIFARLAB_DATA", str(Path(tmp) / "cache"))
        for name in [n for n in args.only.split(",") if n]:
            if name not in CHECKS:
                parser.error(f"--only {name}: not a check (checks: {', '.join(CHECKS)})")
            start = time.perf_counter()
            try:
                result[name] = globals()[f"check_{name}"](ctx)
            except (Exception, subprocess.CalledProcessError) as e:  # noqa: BLE001 - record it, run the rest
                result[name] = {"error": f"{type(e).__name__}: {e}", "where": traceback.format_exc().splitlines()[-3:]}
            result.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
