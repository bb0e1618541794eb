"""What a study pays per run beyond training, and what a second worker buys: a study of 20 tiny runs
(synthetic 256-image training set, one epoch of lab-m1) with the local and the Dask executor, each
with 1 and 2 workers, every run a fresh `cifarlab train` process. Per run (from the job log and
summary.json):

- process_s: the job's wall time minus the run's own wall time (process start, Python and torch
  imports, config parsing, and the writes after the summary);
- setup_s: the run's wall time minus its training time (data load, model build, evaluation);
- train_s: the training epochs.

For the Dask executor the study wall time includes starting and stopping the local cluster.
Prints one JSON object (min / median / max over runs and repeats).

    python benchmarks/study_overhead.py [--runs 20] [--repeats 1]
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
  data: {{dataset: synthetic, train_limit: 256, test_limit: 128}}
  model: {{preset: lab-m1}}
  train: {{epochs: 1, batch_size: 64}}
  analysis: {{report: false}}
repeats: {runs}
"""


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def one_study(folder: Path, runs_count: int, executor: str, workers: int) -> dict:
    path = folder / "study.yaml"
    path.write_text(STUDY.format(runs=runs_count))
    study = load_study(path)
    out = folder / f"{executor}-{workers}"
    started = time.perf_counter()
    outcome = run_jobs(study, out, make_executor(executor, workers=workers))
    wall = time.perf_counter() - started
    if set(outcome.values()) != {"completed"}:
        raise SystemExit(f"{executor} x{workers}: not every run completed: {outcome}")
    per_run = []
    for run in study.runs:
        summary = runs.read_summary(out / run.id)
        job_s = float(re.findall(r"# exit 0 after ([0-9.]+) s", (out / "logs" / f"{run.id}.log").read_text())[-1])
        per_run.append({"job_s": job_s, "process_s": job_s - summary["wall_time_s"],
                        "setup_s": summary["wall_time_s"] - summary["train_time_s"], "train_s": summary["train_time_s"]})
    return {"wall_s": wall, "per_run": per_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="cifarlab-overhead-") as tmp:
        for repeat in range(args.repeats):
            for executor in ("local", "dask"):
                for workers in (1, 2):
                    folder = Path(tmp) / f"r{repeat}"
                    folder.mkdir(exist_ok=True)
                    measured = one_study(folder, args.runs, executor, workers)
                    entry = results.setdefault(f"{executor}_{workers}_workers", {"wall_s": [], "per_run": []})
                    entry["wall_s"].append(measured["wall_s"])
                    entry["per_run"] += measured["per_run"]
    report = {"runs_per_study": args.runs, "repeats": args.repeats, "cpu_count": os.cpu_count(), "studies": {}}
    for name, entry in results.items():
        report["studies"][name] = {
            "study_wall_s": spread(entry["wall_s"]),
            **{key: spread([r[key] for r in entry["per_run"]]) for key in ("job_s", "process_s", "setup_s", "train_s")},
        }
    for executor in ("local", "dask"):
        one, two = (statistics.median(results[f"{executor}_{w}_workers"]["wall_s"]) for w in (1, 2))
        report[f"{executor}_speedup_2_workers"] = round(one / two, 3)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
