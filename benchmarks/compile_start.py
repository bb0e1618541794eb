"""Cold and warm start of train.compile, each in a fresh `cifarlab train` process on the same run
(configs/cnn3-fast.yaml on cifar10-head, a few epochs): eager; compiled with an empty inductor cache
(cold: every graph is compiled); compiled again on the cache the cold run filled (warm: what the second
run of a study pays). Reports each process' wall time, its first epoch's time (where compiling happens)
and the later epochs' img/s, over --repeats rounds (a fresh cache each round). Prints one JSON object.

    python benchmarks/compile_start.py [--root ../shared/data/cifar10-head] [--epochs 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from measure import later_rate, spread, train_process

REPO = Path(__file__).resolve().parent.parent
DEFAULT_ROOT = REPO.parent / "shared" / "data" / "cifar10-head"


def one_process(args: argparse.Namespace, out: Path, cache: Path, compile_: bool) -> dict:
    run, wall = train_process(REPO / "configs" / "cnn3-fast.yaml",
                              [f"data.root={args.root}", f"train.epochs={args.epochs}",
                               f"train.compile={str(compile_).lower()}", *args.overrides],
                              out, env={"TORCHINDUCTOR_CACHE_DIR": str(cache)})
    return {"wall_s": wall, "first_epoch_s": run.history[0]["time"]["epoch_s"], "later_img_per_s": later_rate(run)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="CIFAR-10 folder (default: cifar10-head)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="more config overrides for every process")
    args = parser.parse_args()
    rows: dict[str, list[dict]] = {"eager": [], "compile_cold": [], "compile_warm": []}
    with tempfile.TemporaryDirectory() as folder:
        for round_ in range(args.repeats):
            cache = Path(folder) / f"cache-{round_}"
            for name, compile_ in (("eager", False), ("compile_cold", True), ("compile_warm", True)):
                out = Path(folder) / f"{name}-{round_}"
                out.mkdir()
                rows[name].append(one_process(args, out, cache, compile_))
    result = {name: {key: spread([r[key] for r in runs]) for key in runs[0]} for name, runs in rows.items()}
    eager_wall = result["eager"]["wall_s"]["median"]
    print(json.dumps({"benchmark": "compile_start", "data": Path(args.root).name, "epochs": args.epochs,
                      "repeats": args.repeats, "overrides": args.overrides, **result,
                      "cold_start_cost_s": round(result["compile_cold"]["wall_s"]["median"] - eager_wall, 1),
                      "warm_start_cost_s": round(result["compile_warm"]["wall_s"]["median"] - eager_wall, 1)},
                     indent=2))


if __name__ == "__main__":
    main()
