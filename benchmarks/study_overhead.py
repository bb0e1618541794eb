"""What a study pays per run beyond training, cold and warm, and what a second worker buys: a study of
20 tiny runs (a grid over optim.lr with one seed, so every run reads the same data: a synthetic
256-image training set, or the CIFAR-10 folder given by --root; one epoch of lab-m1) with the local
and the Dask executor, each with 1 and 2 workers, each run either a fresh `cifarlab train` process
(cold: executor.warm=false) or forked from a warm process per worker (warm: the default,
studies/warm.py). Cold and warm studies alternate in one run of this script, since this machine's
speed drifts. Per run (from the job log and summary.json):

- overhead_s: everything but training, the job's wall time minus the training epochs (what the
  issue's target is about: at most 0.5 s median warm, with 2 workers);
- process_s: the job's wall time minus the run's own wall time (process start or fork, Python and
  torch imports, config parsing, and the writes after the summary);
- setup_s: the run's wall time minus its training time (data load, model build, evaluation);
- train_s: the training epochs.

A worker's first warm run also starts its warm process (imports, the data read once). For the Dask
executor the study wall time includes starting and stopping the local cluster. Prints one JSON object:
min / median / max over every run of every repeat.

    python benchmarks/study_overhead.py [--runs 20] [--repeats 1] [--workers 1,2] [--modes cold,warm] [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path

from cifarlab import runs
from cifarlab.studies.executors import make_executor, run_jobs
from cifarlab.studies.spec import load_study

STUDY = """
name: overhead
base:
  data: {data}
  model: {{preset: lab-m1}}
  train: {{epochs: 1, batch_size: 64}}
  analysis: {{report: false}}
axes:
  optim.lr: {rates}
"""


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def one_study(folder: Path, data: str, runs_count: int, executor: str, workers: int, warm: bool) -> dict:
    path = folder / "study.yaml"
    path.write_text(STUDY.format(data=data, rates=json.dumps([round(0.001 * (i + 1), 4) for i in range(runs_count)])))
    study = load_study(path)
    out = folder / f"{executor}-{workers}-{'warm' if warm else 'cold'}"
    started = time.perf_counter()
    outcome = run_jobs(study, out, make_executor(executor, workers=workers, warm=warm))
    wall = time.perf_counter() - started
    if set(outcome.values()) != {"completed"}:
        raise SystemExit(f"{executor} x{workers}: not every run completed: {outcome}")
    per_run = []
    for run in study.runs:
        summary = runs.read_summary(out / run.id)
        job_s = float(re.findall(r"# exit 0 after ([0-9.]+) s", (out / "logs" / f"{run.id}.log").read_text())[-1])
        per_run.append({"job_s": job_s, "overhead_s": job_s - summary["train_time_s"],
                        "process_s": job_s - summary["wall_time_s"],
                        "setup_s": summary["wall_time_s"] - summary["train_time_s"], "train_s": summary["train_time_s"]})
    return {"wall_s": wall, "per_run": per_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", default="1,2", help="worker counts, comma-separated")
    parser.add_argument("--modes", default="cold,warm", help="cold and / or warm, comma-separated (alternated)")
    parser.add_argument("--executors", default="local,dask", help="local and / or dask, comma-separated")
    parser.add_argument("--root", default=None, help="a CIFAR-10 folder to train on (default: synthetic data)")
    args = parser.parse_args()
    worker_counts = [int(w) for w in args.workers.split(",")]
    modes, executors = args.modes.split(","), args.executors.split(",")
    data = (f"{{root: {json.dumps(str(Path(args.root).resolve()))}, train_limit: 256, test_limit: 128}}" if args.root
            else "{dataset: synthetic, train_limit: 256, test_limit: 128}")
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cifarlab-overhead-") as tmp:
        for repeat in range(args.repeats):
            for executor in executors:
                for workers in worker_counts:
                    for mode in modes:
                        folder = Path(tmp) / f"r{repeat}"
                        folder.mkdir(exist_ok=True)
                        measured = one_study(folder, data, args.runs, executor, workers, mode == "warm")
                        entry = results.setdefault(f"{executor}_{workers}_workers_{mode}", {"wall_s": [], "per_run": []})
                        entry["wall_s"].append(measured["wall_s"])
                        entry["per_run"] += measured["per_run"]
    report = {"runs_per_study": args.runs, "repeats": args.repeats, "cpu_count": os.cpu_count(),
              "data": args.root and "CIFAR-10 folder" or "synthetic", "studies": {}}
    for name, entry in results.items():
        report["studies"][name] = {
            "study_wall_s": spread(entry["wall_s"]),
            **{key: spread([r[key] for r in entry["per_run"]])
               for key in ("job_s", "overhead_s", "process_s", "setup_s", "train_s")},
        }
    for executor in executors:
        for mode in modes:
            if {1, 2} <= set(worker_counts):
                one, two = (statistics.median(results[f"{executor}_{w}_workers_{mode}"]["wall_s"]) for w in (1, 2))
                report[f"{executor}_{mode}_speedup_2_workers"] = round(one / two, 3)
        if {"cold", "warm"} <= set(modes):
            for workers in worker_counts:
                cold, warm = (report["studies"][f"{executor}_{workers}_workers_{m}"]["overhead_s"]["median"]
                              for m in ("cold", "warm"))
                report[f"{executor}_{workers}_workers_overhead_median_s"] = {"cold": cold, "warm": warm}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
