"""Train-step time of networks whose ReLU sits before a max-pool: cifarlab's Layers (the pool first, then
the ReLU on a quarter of the elements: the same values and gradients) against nn.Sequential running the
same modules in their written order. Synthetic 32x32 batches in channels_last, SGD with momentum; bf16
autocast and float32. The two are alternated, --repeats rounds of --steps steps each, so the machine's
drift falls on both. Prints one JSON object: ms per step (min / median / max) and the speed-up of the medians.

    python benchmarks/relu_pool.py [--presets cnn3 cnn3-fast] [--batches 64 128] [--repeats 5] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import OrderedDict

import torch
from torch import nn

from cifarlab.config import load_config
from cifarlab.models.build import build_model

from measure import spread


def step_ms(model: nn.Module, batch: int, steps: int, dtype) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,))

    def step():
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cnn3", "cnn3-fast"])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    rows = []
    for preset in args.presets:
        for batch in args.batches:
            for precision, dtype in (("bf16", torch.bfloat16), ("float32", None)):
                model = build_model(load_config(overrides=[f"model.preset={preset}"]).model, (3, 32, 32), 10)
                model = model.to(memory_format=torch.channels_last).train()
                written = nn.Sequential(OrderedDict(model.named_children()))
                times = {"layers": [], "written_order": []}
                for _ in range(args.repeats):
                    times["layers"].append(step_ms(model, batch, args.steps, dtype))
                    times["written_order"].append(step_ms(written, batch, args.steps, dtype))
                rows.append({"preset": preset, "batch": batch, "precision": precision,
                             "ms_per_step": {k: spread(v, 2) for k, v in times.items()},
                             "speedup": round(statistics.median(times["written_order"]) /
                                              statistics.median(times["layers"]), 3)})
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"threads": torch.get_num_threads(), "rows": rows}))


if __name__ == "__main__":
    main()
