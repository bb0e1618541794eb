"""Warm run starts (studies/warm.py): a study's runs forked from a warm process per worker train exactly
as a cold `cifarlab train` does, stop and resume on SIGTERM, die with the sweep that started them,
keep their run lock, and start cold when the warm process cannot serve them."""

import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cifarlab import runs
from cifarlab.config import load_config
from cifarlab.data import sources
from cifarlab.studies import warm
from cifarlab.studies.executors import LocalExecutor, run_jobs, study_executor
from cifarlab.studies.spec import load_study
from helpers import assert_error, cli_command, invoke, parent_of, run_cli, wait_for

pytestmark = pytest.mark.skipif(not warm.available(), reason="warm starts need Linux (fork, PR_SET_PDEATHSIG)")

STUDY = """
name: warm
base:
  data: {{root: {root}, train_limit: {limit}, test_limit: 200}}
  model: {{preset: lab-m1}}
  train: {{epochs: {epochs}, log_every: 5}}
  analysis: {{report: false}}
axes:
  optim.lr: {rates}
"""
TIMES = {"time", "wall_time_s", "train_time_s", "train_img_per_s", "finished_at", "started_at"}


def write_study(folder: Path, root: Path, runs_count: int = 2, epochs: int = 2, limit: int = 300) -> Path:
    path = folder / "study.yaml"
    rates = [0.001 * (i + 1) for i in range(runs_count)]
    path.write_text(STUDY.format(root=root, limit=limit, epochs=epochs, rates=rates))
    return path


def without_times(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMES and "time" not in k}


def records(run_dir: Path) -> list[dict]:
    return [without_times(r) for r in runs.read_jsonl(run_dir / runs.METRICS)]


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").replace("\0", " ")


def gone(pid: int) -> bool:
    """The process has ended (a zombie waiting for its reaper counts)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def training(run_dir: Path, epochs: int = 1):
    """The pid of the process writing `run_dir` once it has `epochs` epochs and a last.pt, else None."""
    holder = runs.lock_holder(run_dir) if run_dir.is_dir() else None
    metrics = run_dir / runs.METRICS
    done = [r for r in runs.read_jsonl(metrics) if r["kind"] == "epoch"] if metrics.is_file() else []
    if holder and len(done) >= epochs and (run_dir / runs.CHECKPOINTS / "last.pt").is_file():
        return int(holder)
    return None


@pytest.fixture
def kept_datasets():
    """The datasets a test reads into data.sources.KEPT go with the test."""
    yield sources.KEPT
    sources.KEPT.clear()


@pytest.mark.slow
def test_a_warm_run_trains_exactly_as_a_cold_one(cifar10_head, tmp_path):
    study = load_study(write_study(tmp_path, cifar10_head))
    # one worker: the second run is forked from the warm process that read the data for the first
    assert set(run_jobs(study, tmp_path / "warm", LocalExecutor(workers=1)).values()) == {"completed"}
    assert set(run_jobs(study, tmp_path / "cold", LocalExecutor(workers=1, warm=False)).values()) == {"completed"}
    for run in study.runs:
        warm_log = (tmp_path / "warm" / "logs" / f"{run.id}.log").read_text()
        assert "# warm start: process" in warm_log and "warm start failed" not in warm_log, warm_log
        assert "# warm start" not in (tmp_path / "cold" / "logs" / f"{run.id}.log").read_text()
        warm_records, cold_records = records(tmp_path / "warm" / run.id), records(tmp_path / "cold" / run.id)
        assert [r["epoch"] for r in warm_records if r["kind"] == "epoch"] == [1, 2]
        assert warm_records == cold_records  # every loss and accuracy, bit for bit
        summaries = [without_times(runs.read_summary(tmp_path / side / run.id)) for side in ("warm", "cold")]
        for summary in summaries:
            summary["analysis"].pop("seconds")
        assert summaries[0] == summaries[1] and summaries[0]["status"] == "completed"
    assert records(tmp_path / "warm" / study.runs[0].id) != records(tmp_path / "warm" / study.runs[1].id)


def test_a_dataset_kept_by_the_warm_process_is_shared_not_read_again(cifar10_head, kept_datasets):
    config = load_config(overrides=[f"data.root={cifar10_head}", "data.train_limit=100"])
    sources.keep_dataset(config.data, seed=0)
    (kept,) = kept_datasets.values()
    for seed in (0, 7):  # CIFAR-10's files do not depend on the seed
        got = sources.dataset_from_config(config.data, seed)
        assert len(got.x_train) == 100 and np.shares_memory(got.x_train, kept.x_train)
    synthetic = load_config(overrides=["data.dataset=synthetic", "data.train_limit=64"])
    sources.keep_dataset(synthetic.data, seed=1)
    assert np.shares_memory(sources.dataset_from_config(synthetic.data, 1).x_train,
                            kept_datasets[sources.dataset_key(synthetic.data, 1)].x_train)
    other_seed = sources.dataset_from_config(synthetic.data, 2)  # the seed draws other images: read anew
    assert not np.array_equal(other_seed.x_train, sources.dataset_from_config(synthetic.data, 1).x_train)


@pytest.mark.slow
def test_sigterm_to_a_warm_run_saves_it_and_the_study_resumes_it(cifar10_head, tmp_path):
    study = load_study(write_study(tmp_path, cifar10_head, runs_count=1, epochs=6, limit=600))
    out, run_dir = tmp_path / "out", tmp_path / "out" / study.runs[0].id
    sweep = subprocess.Popen(cli_command("sweep", study.path, "--out", out), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        trainer = wait_for(lambda: training(run_dir), "the run to finish an epoch", timeout=120)
        assert "-m cifarlab.studies.warm" in command_line(parent_of(trainer))  # forked from the warm process
        assert os.getpgid(trainer) == trainer and os.getsid(trainer) == trainer  # a session of its own
        os.kill(trainer, signal.SIGTERM)
        output, _ = sweep.communicate(timeout=120)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    assert "failed (exit 143" in output, output
    summary = runs.read_summary(run_dir)
    assert summary["status"] == "interrupted" and "SIGTERM" in summary["stop_reason"], summary
    stopped_at = summary["epochs_run"]
    assert 1 <= stopped_at < 6 and (run_dir / runs.CHECKPOINTS / "last.pt").is_file()
    assert run_jobs(study, out) == {study.runs[0].id: "completed"}
    log = (out / "logs" / f"{study.runs[0].id}.log").read_text()
    assert f"--resume {run_dir}" in log and log.count("# warm start: process") == 2, log
    assert [r["epoch"] for r in runs.read_jsonl(run_dir / runs.METRICS) if r["kind"] == "epoch"] == [1, 2, 3, 4, 5, 6]
    assert runs.read_summary(run_dir)["status"] == "completed"


@pytest.mark.slow
def test_killing_the_sweep_kills_its_warm_processes_and_runs_and_the_lock_holds_meanwhile(cifar10_head, tmp_path):
    study = load_study(write_study(tmp_path, cifar10_head, runs_count=2, epochs=50, limit=600))
    out = tmp_path / "out"
    sweep = subprocess.Popen(cli_command("sweep", study.path, "--out", out, "--workers", "2"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        trainers = wait_for(lambda: all(training(out / r.id) for r in study.runs) and
                            [training(out / r.id) for r in study.runs], "both runs to finish an epoch", timeout=120)
        starters = {parent_of(pid) for pid in trainers}
        assert len(starters) == 2 and all("-m cifarlab.studies.warm" in command_line(p) for p in starters)
        assert {parent_of(p) for p in starters} == {sweep.pid}
        # a second writer is refused while the forked run holds its lock
        second = run_cli("train", "--resume", out / study.runs[0].id, timeout=120)
        assert_error(second, 2, f"process {trainers[0]} is writing this run")
        os.kill(sweep.pid, signal.SIGKILL)
        sweep.wait()
        wait_for(lambda: all(gone(p) for p in [*trainers, *starters]), "the warm processes and their runs to die",
                 timeout=30)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
            sweep.wait()
    wait_for(lambda: not any(runs.lock_holder(out / r.id) for r in study.runs), "the runs' locks to go", timeout=30)


@pytest.mark.slow
def test_a_warm_process_that_cannot_start_leaves_the_runs_to_cold_starts(cifar10_head, tmp_path, monkeypatch):
    monkeypatch.setattr(warm, "PRELOAD", ("cifarlab.no_such_module", *warm.PRELOAD))
    study = load_study(write_study(tmp_path, cifar10_head, runs_count=2, epochs=1))
    assert set(run_jobs(study, tmp_path / "out", LocalExecutor(workers=1)).values()) == {"completed"}
    first, second = ((tmp_path / "out" / "logs" / f"{run.id}.log").read_text() for run in study.runs)
    assert "# warm start failed (the warm process ended: see warm.log); starting cold" in first, first
    # tried twice for the first run (a warm process that died is started again once), then not again
    assert "# warm starts off (the warm process ended: see warm.log); starting cold" in second, second
    assert (tmp_path / "out" / "logs" / "warm.log").read_text().count("No module named 'cifarlab.no_such_module'") == 2


def test_executor_warm_is_a_yes_or_no(cifar10_head, tmp_path):
    path = write_study(tmp_path, cifar10_head)
    path.write_text(path.read_text() + "executor: {name: local, warm: sometimes}\n")
    assert_error(invoke("sweep", path, "--dry-run"), 2, str(path), "executor.warm must be true or false, got 'sometimes'")
    path.write_text(path.read_text().replace("warm: sometimes", "warm: false"))
    result = invoke("sweep", path, "--dry-run")
    assert result.returncode == 0, result.stderr
    name, executor, _ = study_executor(load_study(path))
    assert (name, executor.warm) == ("local", False)
    assert study_executor(load_study(write_study(tmp_path, cifar10_head)))[1].warm  # warm unless told otherwise
