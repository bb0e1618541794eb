"""Studies on real engines: a Dask cluster on 127.0.0.1 (in-process LocalCluster, and the `dask
scheduler` / `dask worker` CLI), killed workers, GPU placement from a free queue, Slurm job scripts."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifarlab import runs
from cifarlab.errors import ConfigError
from cifarlab.studies.executors import IN_USE, DaskExecutor, Job, LocalExecutor, local_cluster, run_job, run_jobs
from cifarlab.studies.slurm import slurm_job_script
from cifarlab.studies.results import summarize_study
from cifarlab.studies.spec import load_study
from helpers import assert_error, cli_command, descendants, invoke, listening, parent_of, wait_for

pytest.importorskip("distributed")

STUDY = """
name: grid
base:
  data: {{root: {root}, train_limit: {limit}, test_limit: 300}}
  model: {{preset: lab-m1}}
  train: {{epochs: {epochs}, log_every: 5}}
  analysis: {{report: false}}
axes:
  optim.name: [adam, sgd]
repeats: {repeats}
"""
TIMING = {"train_time_s", "train_img_per_s", "train_time_s_std", "train_img_per_s_std"}


def write_study(folder: Path, root: Path, limit: int = 600, epochs: int = 2, repeats: int = 1, extra: str = "") -> Path:
    path = folder / "study.yaml"
    path.write_text(STUDY.format(root=root, limit=limit, epochs=epochs, repeats=repeats) + extra)
    return path


def table(folder: Path) -> list[dict]:
    with open(folder / "results.csv") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_dask_local_cluster_gives_the_local_results_and_a_rerun_starts_nothing(cifar10_head, tmp_path):
    study = load_study(write_study(tmp_path, cifar10_head, limit=300))
    run_jobs(study, tmp_path / "local", workers=1)  # the worker count changes no result (test_sweep's grid study)
    summarize_study(study, tmp_path / "local")
    outcome = run_jobs(study, tmp_path / "dask", executor=DaskExecutor(workers=2))
    assert set(outcome.values()) == {"completed"}
    summarize_study(study, tmp_path / "dask")
    assert table(tmp_path / "dask") == table(tmp_path / "local")  # same accuracies, epochs, stops
    assert float(table(tmp_path / "dask")[0]["test_acc"]) > 0.15  # adam: 0.18 on 270 images in 2 epochs
    mtimes = {r.id: (tmp_path / "dask" / r.id / runs.SUMMARY).stat().st_mtime_ns for r in study.runs}
    again = invoke("sweep", study.path, "--executor", "dask", "--workers", "2", "--out", tmp_path / "dask")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped (completed before)") == 2 and "on Dask" in again.stdout
    assert {r.id: (tmp_path / "dask" / r.id / runs.SUMMARY).stat().st_mtime_ns for r in study.runs} == mtimes


def test_local_dask_cluster_listens_on_127_0_0_1_only():
    from distributed import Client

    with local_cluster(2, []) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        pids = {os.getpid()} | descendants(os.getpid())
        addresses = listening(pids)
        assert len(addresses) >= 3  # the scheduler, and each worker and nanny
        assert all(a.startswith(("127.0.0.1:", "::1:")) for a in addresses), addresses


class Recorded(Job):
    """A job whose process records the GPU it was given; the `hold` job keeps its GPU until the
    others are all done, so a queue that gave a busy GPU away would never finish."""

    def __init__(self, id: str, folder: Path, hold: bool):
        super().__init__(id, folder / id, folder / "unused.yaml", folder / "logs" / f"{id}.log", device="cuda")
        self.folder, self.hold = folder, hold

    def command(self):
        script = ("import os, pathlib, sys, time\n"
                  "folder, me, hold = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3] == '1'\n"
                  "(folder / f'{me}.start').write_text(os.environ['CUDA_VISIBLE_DEVICES'])\n"
                  "deadline = time.monotonic() + 120\n"
                  "while hold and len(list(folder.glob('short*.done'))) < 4 and time.monotonic() < deadline:\n"
                  "    time.sleep(0.02)\n"
                  "(folder / f'{me}.done').write_text(os.environ['CUDA_VISIBLE_DEVICES'])\n")
        return [sys.executable, "-c", script, str(self.folder), self.id, "1" if self.hold else "0"]


@pytest.mark.parametrize("engine", ["local", "dask"])
def test_two_pretend_gpus_are_handed_out_from_a_free_queue(engine, tmp_path):
    jobs = [Recorded("long", tmp_path, hold=True)] + [Recorded(f"short{i}", tmp_path, hold=False) for i in range(4)]
    executor = LocalExecutor(workers=2, gpus=["0", "1"]) if engine == "local" else DaskExecutor(gpus=["0", "1"])
    assert executor.run(jobs) == {job.id: 0 for job in jobs}
    given = {job.id: (tmp_path / f"{job.id}.start").read_text() for job in jobs}
    # the long job kept its GPU busy until every short job had finished: all four ran on the other one
    # (job i on GPU i mod 2 would have queued short1 and short3 behind the long job, which waits for them)
    assert {given[f"short{i}"] for i in range(4)} == {"01".replace(given["long"], "")}
    assert all((tmp_path / f"{job.id}.done").read_text() == given[job.id] for job in jobs)


def start_cli_cluster(folder: Path) -> tuple[Path, list[subprocess.Popen]]:
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1, each in its own process group."""
    dask = Path(sys.executable).parent / "dask"
    scheduler_file = folder / "scheduler.json"
    logs = open(folder / "cluster.log", "w")
    common = dict(stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
    procs = [subprocess.Popen([str(dask), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                               "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)], **common)]
    deadline = time.monotonic() + 60
    while not scheduler_file.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    for name in ("w1", "w2"):
        procs.append(subprocess.Popen([str(dask), "worker", "--scheduler-file", str(scheduler_file), "--nthreads", "1",
                                       "--host", "127.0.0.1", "--no-dashboard", "--dashboard-address", "127.0.0.1:0",
                                       "--name", name, "--memory-limit", "0"], **common))
    return scheduler_file, procs


def stop_all(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("kill", ["worker", "worker-group"])
def test_a_killed_dask_worker_redoes_its_run_and_leaves_no_orphan(kill, cifar10_head, tmp_path):
    path = write_study(tmp_path, cifar10_head, limit=300, epochs=4, repeats=2)
    study = load_study(path)
    out = tmp_path / "out"
    scheduler_file, cluster = start_cli_cluster(tmp_path)
    try:
        sweep = subprocess.Popen(cli_command("sweep", path, "--executor", "dask", "--scheduler-file", scheduler_file,
                                             "--out", out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        cluster.append(sweep)

        def finished(run_id: str) -> bool:  # summary.json written and the run's lock let go (its analysis is over)
            return (out / run_id / runs.SUMMARY).is_file() and runs.lock_holder(out / run_id) is None

        def training_with_an_epoch_done():  # once a run is finished: a run past its first epoch (with a last.pt)
            if not any(finished(r.id) for r in study.runs):
                return None
            for run in study.runs:
                holder = runs.lock_holder(out / run.id) if (out / run.id).is_dir() else None
                metrics = out / run.id / runs.METRICS
                epochs = [r for r in runs.read_jsonl(metrics) if r["kind"] == "epoch"] if metrics.is_file() else []
                if holder and 1 <= len(epochs) <= 2 and (out / run.id / runs.CHECKPOINTS / "last.pt").is_file():
                    return run.id, int(holder)
            return None

        victim, trainer_pid = wait_for(training_with_an_epoch_done, "a run to finish an epoch", timeout=120)
        warm_pid = parent_of(trainer_pid)  # the worker's warm process (studies/warm.py) forked the run
        assert "cifarlab.studies.warm" in Path(f"/proc/{warm_pid}/cmdline").read_bytes().decode()
        worker_pid = parent_of(warm_pid)
        assert parent_of(worker_pid) in {p.pid for p in cluster[1:3]}  # a worker process of a `dask worker`
        finished_before = {r.id: (out / r.id / runs.SUMMARY).stat().st_mtime_ns for r in study.runs if finished(r.id)}
        assert finished_before
        if kill == "worker":  # the worker process alone: its nanny starts a new one
            os.kill(worker_pid, signal.SIGKILL)
        else:  # the `dask worker` command with its nanny and worker: the other worker takes over
            os.killpg(os.getpgid(worker_pid), signal.SIGKILL)
        wait_for(lambda: all(not Path(f"/proc/{pid}").exists() or
                             Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
                             for pid in (trainer_pid, warm_pid)),
                 "the killed worker's warm process and training process to die", timeout=30)
        output, _ = sweep.communicate(timeout=300)
        assert sweep.returncode == 0, output
    finally:
        stop_all(cluster)
    for run in study.runs:
        summary = runs.read_summary(out / run.id)
        assert summary["status"] == "completed", (run.id, summary)
        epochs = [r["epoch"] for r in runs.read_jsonl(out / run.id / runs.METRICS) if r["kind"] == "epoch"]
        assert epochs == [1, 2, 3, 4], (run.id, epochs)  # no epoch written twice
    for run_id, mtime in finished_before.items():
        assert (out / run_id / runs.SUMMARY).stat().st_mtime_ns == mtime  # not trained again
    assert (out / "logs" / f"{victim}.log").read_text().count("-m cifarlab.cli train") == 2  # started, then redone
    # no training process outlived the sweep; the workers' warm processes die with the stopped cluster
    wait_for(lambda: processes_naming(out) == [], "every process holding a file of the study to end", timeout=30)


def processes_naming(folder: Path) -> list[int]:
    """Processes whose command line names `folder`, or that hold a file in it open (a run forked from a
    warm process has the warm process' command line, and its log as stdout)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if str(folder) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(pid))
                continue
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(str(folder)):
                    found.append(int(pid))
                    break
        except OSError:
            continue
    return found


def test_slurm_job_script_of_a_study(tmp_path, cifar10_head):
    slurm = ("executor: slurm\nslurm: {partition: gpu, time: '02:00:00', memory: 32GB, cores: 8, gpus_per_run: 1, "
             "jobs: 4, setup: ['module load cuda']}\n")
    path = write_study(tmp_path, cifar10_head, extra=slurm)
    result = invoke("sweep", path, "--dry-run")
    assert result.returncode == 0, result.stderr
    script = result.stdout[result.stdout.index("#!/usr/bin/env bash"):]
    for line in ("#SBATCH -p gpu", "#SBATCH -t 02:00:00", "#SBATCH --cpus-per-task=8", "#SBATCH --gres=gpu:1",
                 "module load cuda"):
        assert line in script.splitlines(), line
    worker = script.strip().splitlines()[-1]
    assert worker.startswith(f"{sys.executable} -m distributed.cli.dask_worker tcp://")
    assert "--nthreads 1" in worker and "--resources GPU=1" in worker and "--nanny" in worker
    assert slurm_job_script({"partition": "cpu", "cores": 2}).count("--gres") == 0
    with pytest.raises(ConfigError, match="unknown slurm key 'gpus'"):
        slurm_job_script({"gpus": 2})


def test_executor_mistakes_are_one_line(tmp_path, cifar10_head):
    path = write_study(tmp_path, cifar10_head)
    result = invoke("sweep", path, "--executor", "ray")
    assert result.returncode == 2 and "unknown executor 'ray' (choose from: local, dask, slurm)" in result.stderr
    result = invoke("sweep", path, "--address", "tcp://127.0.0.1:1", "--executor", "local")
    assert result.returncode == 2 and "need --executor dask" in result.stderr
    text = path.read_text()
    path.write_text(text + "executor: {name: dask, nodes: 3}\n")
    result = invoke("sweep", path, "--dry-run")
    assert result.returncode == 2 and "executor is a name" in result.stderr
    for slurm, fragment in [("{cores: many}", "slurm.cores must be an integer >= 1, got 'many'"),
                            ("{jobs: 0}", "slurm.jobs must be an integer >= 1, got 0"),
                            ("{gpus_per_run: 1.5}", "slurm.gpus_per_run must be an integer >= 0, got 1.5"),
                            ("{setup: module load cuda}", "slurm.setup must be a list of lines"),
                            ("{gpus: 2}", "unknown slurm key 'gpus'")]:
        path.write_text(text + f"executor: slurm\nslurm: {slurm}\n")
        assert_error(invoke("sweep", path, "--dry-run"), 2, str(path), fragment)


def test_a_run_locked_by_another_process_is_not_started(cifar10_head, tmp_path):
    run = load_study(write_study(tmp_path, cifar10_head)).runs[0]
    out = tmp_path / "out"
    (out / run.id).mkdir(parents=True)
    lock = runs.RunLock(out / run.id).acquire()
    try:
        job = Job(run.id, out / run.id, tmp_path / "x.yaml", out / "logs" / "x.log")
        assert run_job(job, lock_wait_s=0.3) == IN_USE
        assert not (out / "logs" / "x.log").exists()  # nothing started
    finally:
        lock.release()


def test_a_run_killed_between_its_last_epoch_and_its_summary_is_finished_not_refused(cifar10_head, tmp_path):
    import cifarlab

    run = cifarlab.fit({"data": {"root": str(cifar10_head), "train_limit": 500, "test_limit": 200},
                        "model": {"preset": "lab-m1"}, "train": {"epochs": 2}, "analysis": {"report": False}},
                       run_dir=tmp_path / "run", progress=False)
    before = run.summary
    (run.path / runs.SUMMARY).unlink()  # what a SIGKILL after the last epoch's last.pt leaves
    job = Job("run", run.path, tmp_path / "unused.yaml", tmp_path / "run.log")
    assert job.command()[-2:] == ["--resume", str(run.path)]
    assert run_job(job) == 0
    after = runs.read_summary(run.path)
    assert after["status"] == "completed" and after["epochs_run"] == 2 and after["test_acc"] == before["test_acc"]
    with pytest.raises(ConfigError, match="already trained 2 of train.epochs=2"):  # a finished run still needs more epochs
        cifarlab.resume(run, progress=False)
