import csv
import os
import signal
import subprocess
from pathlib import Path

import pytest

from cifarlab import runs
from cifarlab.errors import ConfigError
from cifarlab.studies.executors import run_jobs
from cifarlab.studies.results import curve_series, summarize_study
from cifarlab.studies.spec import load_study
from cifarlab.api import fit
from helpers import cli_command, wait_for

STUDIES = sorted((Path(__file__).resolve().parent.parent / "configs" / "studies").glob("*.yaml"))
TIMING = {"train_time_s", "train_img_per_s", "train_time_s_std", "train_img_per_s_std"}


def write_study(folder: Path, text: str) -> Path:
    path = folder / "study.yaml"
    path.write_text(text)
    return path


GRID = """
name: grid
base:
  data: {{root: {root}, train_limit: 400, test_limit: 200}}
  model: {{preset: lab-m1}}
  train: {{epochs: 2, log_every: 5}}
  analysis: {{report: false}}
axes:
  optim.name: [adam, sgd]
  model.batchnorm: [true, false]
"""


def results(folder: Path) -> list[dict]:
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_grid_study_end_to_end_and_repeatable(cifar10_head, tmp_path):
    study = load_study(write_study(tmp_path, GRID.format(root=cifar10_head)))
    assert [r.id for r in study.runs] == [
        "optim.name-adam_model.batchnorm-true_seed0", "optim.name-adam_model.batchnorm-false_seed0",
        "optim.name-sgd_model.batchnorm-true_seed0", "optim.name-sgd_model.batchnorm-false_seed0"]
    first, second = tmp_path / "one", tmp_path / "two"
    outcome = run_jobs(study, first, workers=2)
    assert set(outcome.values()) == {"completed"}
    run_jobs(study, second, workers=1)  # one worker, the runs in another order of starts: the same results
    rows = summarize_study(study, first)
    assert [(r["optim.name"], r["model.batchnorm"]) for r in rows] == [
        ("adam", "true"), ("adam", "false"), ("sgd", "true"), ("sgd", "false")]
    csv_rows = results(first)
    assert len(csv_rows) == 4 and all(r["status"] == "completed" for r in csv_rows)
    assert max(float(r["test_acc"]) for r in csv_rows) > 0.18  # adam learns in 2 epochs (chance: 0.10)
    for row in csv_rows:  # the variant's settings really reached the run
        config = runs.read_run_config(first / row_id(row))
        assert config.optim.name == row["optim.name"]
        assert str(config.model.params()["batchnorm"]).lower() == row["model.batchnorm"]
    summarize_study(study, second)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(results(first)) == strip(results(second))
    assert (first / "results.md").read_text().count("| base |") == 4
    html = (first / "report.html").read_text()
    assert "<table" in html and html.count("data:image/png;base64,") == 2  # curves by each axis


def row_id(row: dict) -> str:
    return f"optim.name-{row['optim.name']}_model.batchnorm-{row['model.batchnorm']}_seed0"


@pytest.mark.slow
def test_a_diverging_variant_fails_and_the_rest_go_on(cifar10_head, tmp_path):
    text = f"""
name: diverge
base:
  data: {{root: {cifar10_head}, train_limit: 500, test_limit: 200}}
  model: {{preset: lab-m2}}
  train: {{epochs: 1}}
  analysis: {{report: false}}
variants:
  - {{name: fine, set: {{optim.name: adam}}}}
  - {{name: explodes, set: {{optim.name: sgd, optim.lr: 1.0e+6}}}}
repeats: 2
"""
    study = load_study(write_study(tmp_path, text))
    assert len(study.runs) == 4 and {r.seed for r in study.runs} == {0, 1}
    outcome = run_jobs(study, tmp_path / "out", workers=2)  # a failing run next to a running one
    assert outcome["fine_seed0"] == outcome["fine_seed1"] == "completed"
    assert outcome["explodes_seed0"].startswith("failed (exit 1")
    rows = {r["variant"]: r for r in summarize_study(study, tmp_path / "out")}
    assert rows["fine"]["status"] == "completed" and rows["fine"]["completed"] == 2
    assert rows["fine"]["test_acc_std"] is not None
    assert rows["explodes"]["status"].startswith("diverged: diverged: training loss became nan")
    assert "± " in (tmp_path / "out" / "results.md").read_text()


def wait_until_unlocked(run_dirs, timeout: float = 60) -> None:
    """A killed process lets go of its run's lock as it exits, a moment after the kill."""
    wait_for(lambda: not any(runs.lock_holder(d) for d in run_dirs if d.is_dir()), "every run to be unlocked", timeout)


@pytest.mark.slow
def test_killing_a_sweep_and_rerunning_finishes_only_what_was_missing(cifar10_head, tmp_path):
    text = GRID.format(root=cifar10_head)
    path = write_study(tmp_path, text)
    out = tmp_path / "out"
    proc = subprocess.Popen(cli_command("sweep", path, "--out", out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    study = load_study(path)
    first, second = out / study.runs[0].id, out / study.runs[1].id
    try:
        # kill it once the second run has begun (runs go one at a time): whatever this machine's speed,
        # the first run is done and the last two have not started
        wait_for(lambda: (first / "summary.json").is_file() and (second / "config.yaml").is_file(),
                 "the first run to finish and the second to begin")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_until_unlocked([out / r.id for r in study.runs])  # its training process is gone too
    done_before = {r.id: (out / r.id / "summary.json").stat().st_mtime_ns for r in study.runs
                   if (out / r.id / "summary.json").is_file()}
    assert study.runs[0].id in done_before and len(done_before) < 4
    outcome = run_jobs(study, out)
    assert all(outcome[i] == "skipped (completed before)" for i in done_before)
    assert sum(v == "completed" for v in outcome.values()) == 4 - len(done_before)
    for run_id, mtime in done_before.items():
        assert (out / run_id / "summary.json").stat().st_mtime_ns == mtime
    assert all(runs.read_summary(out / r.id)["status"] == "completed" for r in study.runs)


@pytest.mark.parametrize("study_file", STUDIES, ids=[p.stem for p in STUDIES])
def test_report_studies_expand_and_run_shortened(study_file, cifar10_head, tmp_path):
    short = ["train.epochs=1", "analysis.report=false", "data.dataset=synthetic", "data.train_limit=300", "data.test_limit=100",
             "data.val_size=0.1", "train.target.metric=null", "train.divergence.enabled=false"]
    study = load_study(study_file, short)
    assert len(study.runs) >= 3 and study.reference
    assert all(r.config.data.dataset == "synthetic" and r.config.train.epochs == 1 for r in study.runs)
    run = study.runs[-1]  # the last variant, so that not only the base is exercised
    summary = runs.read_summary(fit(run.config, run_dir=tmp_path / run.id))
    assert summary["status"] == "completed"


def test_study_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown study key 'axis'"):
        load_study(write_study(tmp_path, "name: x\naxis: {optim.name: [adam]}\n"))
    with pytest.raises(ConfigError, match=r"optim.name: Input should be"):
        load_study(write_study(tmp_path, "name: x\naxes: {optim.name: [adam, adamx]}\n"))
    with pytest.raises(ConfigError, match="axes must map each key.path to a non-empty list"):
        load_study(write_study(tmp_path, "name: x\naxes: {optim.name: adam}\n"))


@pytest.mark.slow
def test_a_study_with_runs_without_validation_plots_training_accuracy(tmp_path):
    path = write_study(tmp_path, """
name: no-val
base:
  data: {dataset: synthetic, train_limit: 120, test_limit: 40, val_size: 0}
  model: {preset: lab-m1}
  train: {epochs: 2, early_stopping: {enabled: false}}
  analysis: {report: false}
variants:
  - {name: all-images, set: {}}
  - {name: val-split, set: {data.val_size: 0.25}}
""")
    study = load_study(path)
    out = tmp_path / "out"
    assert set(run_jobs(study, out).values()) == {"completed"}
    summarize_study(study, out)
    # one run has no validation curve: both are drawn (training panels), none is left out
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["curves.pdf", "curves.png", "test_acc.pdf",
                                                                 "test_acc.png"]
    series = curve_series(study, out)
    assert [label for label, *_ in series] == ["all-images", "val-split"]
    assert all(len([r for r in records if "train_acc" in r]) == 2 for *_, records in series)
    assert [any("val_acc" in r for r in records) for *_, records in series] == [False, True]
    assert "curves" in (out / "report.html").read_text()
