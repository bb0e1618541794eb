"""Where a study's runs execute: on this machine (LocalExecutor) or on a Dask cluster
(DaskExecutor: a local cluster on 127.0.0.1, an existing scheduler, or Slurm jobs through
dask-jobqueue); `run_jobs` runs what of a study is not finished yet.

The engine only places runs. What a run needs is decided when it starts, on the machine that runs
it, by cifarlab's own run state (`Job.command`): a completed run is not trained again, a run with a
last.pt is resumed, anything else starts fresh. A task's result is the training process' exit code
and nothing else, each training process runs in its own process group that dies with its task, and
the run lock keeps two processes from ever writing one run.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

from .. import processes, runs
from ..config import write_config
from ..errors import ConfigError, first_line
from .reach import connect_timeout, reach_scheduler, slurm_reachable
from .slurm import check_slurm, slurm_cluster, slurm_cores, slurm_jobs
from .spec import Study
from .warm import Starters, WarmStarter, thread_starter

IN_USE = 75  # exit code of a job whose run another process kept writing (EX_TEMPFAIL)
EXECUTORS = ("local", "dask", "slurm")
# a run stopped by the machine it ran on (scancel, a Slurm job's time limit, preemption: SIGTERM, then SIGKILL)
# is placed again, up to PLACES times in all: it resumes from its last.pt
STOPPED = {128 + signal.SIGTERM, -signal.SIGTERM, -signal.SIGKILL}
PLACES = 3


def run_state(run_dir: Path) -> str:
    """completed | resumable | fresh: what a rerun of the study does with this folder."""
    if (run_dir / runs.SUMMARY).is_file():
        status = runs.read_summary(run_dir).get("status")
        if status == "completed":
            return "completed"
        if status == "diverged":
            return "fresh"
    return "resumable" if (run_dir / runs.CHECKPOINTS / "last.pt").is_file() else "fresh"


@dataclass
class Job:
    """One run of a study: its folder, the config to start it from, and the settings its process adds."""

    id: str
    run_dir: Path
    config_path: Path
    log: Path
    settings: list[str] = field(default_factory=list)  # key=value added to a fresh start (train.threads)
    device: str = "auto"  # the run's train.device
    warm: bool = True  # may be forked from a warm process (studies/warm.py) that read config_path's data

    def wants_gpu(self, gpus_exist: bool) -> bool:
        """Whether the run takes a GPU (Dask resource GPU=1) where `gpus_exist`."""
        return self.device == "cuda" or (self.device == "auto" and gpus_exist)

    def command(self) -> Optional[list[str]]:
        """The training command for the run's state now (None: it is completed)."""
        state = run_state(self.run_dir) if self.run_dir.exists() else "fresh"
        if state == "completed":
            return None
        base = [sys.executable, "-m", "cifarlab.cli", "train", "--quiet"]
        if state == "resumable":
            return base + ["--resume", str(self.run_dir)]
        shutil.rmtree(self.run_dir, ignore_errors=True)
        return base + ["-c", str(self.config_path), "--run-dir", str(self.run_dir), *self.settings]


def run_job(job: Job, gpu: Optional[str] = None, cancelled: Callable[[], bool] = lambda: False,
            lock_wait_s: float = 120.0, starter: Optional[WarmStarter] = None) -> int:
    """Train `job` in its own process group on this machine (on `gpu` if given), forked from `starter`'s
    warm process if given, and return the exit code. A run still locked by a process that is going away
    (a worker killed a moment ago) is waited for up to `lock_wait_s`; a training process whose task is
    `cancelled()` is stopped."""
    deadline = time.monotonic() + lock_wait_s
    while job.run_dir.exists() and runs.lock_holder(job.run_dir) is not None:
        if time.monotonic() > deadline:
            return IN_USE
        time.sleep(0.2)
    command = job.command()
    if command is None:
        return 0
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()}"
                  f"{f' GPU {gpu}' if gpu is not None else ''}: {' '.join(command)}\n")
        log.flush()
        started = time.perf_counter()
        if starter is not None and job.warm:
            process = starter.start(command, env, log, job.config_path)
        else:
            process = processes.start(command, env, log)
        try:
            code = watch(process, cancelled)
        except BaseException:
            processes.stop(process)
            raise
        log.write(f"# exit {code} after {time.perf_counter() - started:.3f} s\n")
        return code


def watch(process, cancelled: Callable[[], bool]) -> int:
    """Wait for `process`; stop it (and return its code) as soon as `cancelled()` says so."""
    while True:
        try:
            return process.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            if cancelled():
                return processes.stop(process)


class Executor(Protocol):
    """Runs jobs and returns each one's exit code (or a failure message)."""

    run_threads: Optional[int]  # CPU threads each training process gets (None: all the machine's cores)

    def reach(self) -> None:
        """Fail (ConfigError) when what the jobs run on cannot be reached: called before the study folder is written."""

    def run(self, jobs: list[Job], done: Optional[Callable[[str, Any], None]] = None) -> dict[str, Any]:
        """Each job's exit code (or failure message) by its id; `done(id, result)` as each one ends."""


@dataclass
class LocalExecutor:
    """Runs jobs as processes on this machine, `workers` at a time; with GPUs, each job takes the
    first free GPU from a queue and gives it back when it ends; with `warm`, each worker forks its jobs
    from a warm process of its own."""

    workers: int = 1
    gpus: list[str] = field(default_factory=list)
    warm: bool = True

    @property
    def run_threads(self) -> Optional[int]:
        """CPU threads per training process: this machine's cores split between the workers."""
        return processes.cores_per(self.workers)

    def reach(self) -> None:
        """This machine is always there."""

    def run(self, jobs: list[Job], done: Optional[Callable[[str, Any], None]] = None) -> dict[str, Any]:
        free: "queue.Queue[str]" = queue.Queue()
        for gpu in self.gpus:
            free.put(gpu)

        def one(job: Job) -> tuple[str, int]:
            gpu = free.get() if job.wants_gpu(bool(self.gpus)) else None
            starter = starters.take() if job.warm else None
            try:
                code = run_job(job, gpu, starter=starter)
            finally:
                starters.give(starter)
                if gpu is not None:
                    free.put(gpu)
            if done is not None:
                done(job.id, code)
            return job.id, code

        warm = min(self.workers, sum(job.warm for job in jobs)) if self.warm else 0
        with Starters(warm, jobs[0].log.parent if jobs else Path()) as starters:
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                return dict(pool.map(one, jobs))


def dask_task(job: Job, session: Optional[str] = None) -> int:
    """What a Dask worker runs: the job (forked from this thread's warm process for the sweep `session`,
    if given), stopped if the scheduler drops the task (the sweep went away)."""
    from distributed import get_worker

    worker = get_worker()
    key = worker.get_current_task()

    def cancelled() -> bool:
        task = worker.state.tasks.get(key)
        return task is None or task.state in ("cancelled", "released", "forgotten")

    return run_job(job, cancelled=cancelled, starter=thread_starter(session) if session else None)


def _dask():
    try:
        import distributed
    except ImportError:
        raise ConfigError("the dask and slurm executors need the cluster extra: pip install 'cifarlab[cluster]'") from None
    return distributed


@dataclass
class DaskExecutor:
    """Runs jobs as tasks of a Dask cluster: the one at `address` or `scheduler_file`, one that
    `make_cluster()` returns (Slurm), or else a local cluster on 127.0.0.1 with one worker per GPU
    (pinned with CUDA_VISIBLE_DEVICES, resource GPU=1) or `workers` CPU workers. At most as many
    runs are in flight as the cluster has slots; the next is submitted when one ends."""

    workers: int = 1
    gpus: list[str] = field(default_factory=list)
    address: Optional[str] = None
    scheduler_file: Optional[str] = None
    make_cluster: Optional[Callable[[], Any]] = None
    threads: Optional[int] = None  # CPU threads per run on the cluster's machines (None: theirs to choose)
    gpu_workers: bool = False  # the cluster's workers will have GPUs (Slurm with gpus_per_run)
    retries_s: float = 600.0  # how long to wait for a first worker
    check_cluster: Optional[Callable[[], None]] = None  # raises when make_cluster's machines cannot be reached
    jobs: int = 0  # workers make_cluster's cluster keeps (Slurm: a job that ended early is replaced)
    warm: bool = True  # each worker thread forks the sweep's runs from a warm process of its own

    @property
    def run_threads(self) -> Optional[int]:
        """CPU threads per training process: the cores split between local workers, `threads` on a cluster."""
        if self.address or self.scheduler_file or self.make_cluster:
            return self.threads
        return processes.cores_per(self.workers)

    def reach(self) -> None:
        """The scheduler at `address` / `scheduler_file` answers, or the Slurm controller does, within
        connect_timeout(); else a ConfigError."""
        if self.address or self.scheduler_file:
            reach_scheduler(self.address, self.scheduler_file, connect_timeout())
        elif self.check_cluster is not None:
            self.check_cluster()

    def connect(self):
        distributed = _dask()
        if self.address or self.scheduler_file:
            address = reach_scheduler(self.address, self.scheduler_file, connect_timeout())
            return distributed.Client(address, timeout=f"{connect_timeout()}s"), None
        if self.check_cluster is not None:
            self.check_cluster()
        cluster = self.make_cluster() if self.make_cluster else local_cluster(self.workers, self.gpus)
        return distributed.Client(cluster), cluster

    def run(self, jobs: list[Job], done: Optional[Callable[[str, Any], None]] = None) -> dict[str, Any]:
        if not jobs:
            return {}
        distributed = _dask()
        client, cluster = self.connect()
        results: dict[str, Any] = {}
        session = os.urandom(8).hex() if self.warm else None
        try:
            client.wait_for_workers(1, timeout=self.retries_s)
            pending, running, placed = list(jobs), {}, {job.id: 0 for job in jobs}
            gpus_exist = self.gpu_workers or bool(self.gpus)
            while pending or running:
                if cluster is not None and self.jobs:  # a cancelled or timed-out job is submitted again
                    cluster.scale(jobs=self.jobs)
                gpu_slots, cpu_slots = slots(client)
                gpus_exist = gpus_exist or gpu_slots > 0
                for job in list(pending):
                    gpu = job.wants_gpu(gpus_exist)
                    busy = sum(1 for j in running.values() if j.wants_gpu(gpus_exist) == gpu)
                    if busy >= (gpu_slots if gpu else cpu_slots):
                        continue
                    pending.remove(job)
                    placed[job.id] += 1
                    future = client.submit(dask_task, job, session, key=f"cifarlab-{job.id}-{os.urandom(4).hex()}",
                                           pure=False, resources={"GPU": 1} if gpu else None)
                    running[future] = job
                if not running:
                    if gpu_slots == 0 and not self.jobs and any(j.wants_gpu(gpus_exist) for j in pending):
                        raise ConfigError("the Dask cluster has no worker with the GPU resource for the GPU runs "
                                          "(start workers with --resources GPU=1)")
                    time.sleep(1.0)
                    continue
                try:  # the timeout lets new slots (workers that joined) take pending runs
                    ended, _ = distributed.wait(list(running), timeout=2.0, return_when="FIRST_COMPLETED")
                except TimeoutError:
                    continue
                for future in ended:
                    job = running.pop(future)
                    try:
                        result = future.result()
                    except Exception as e:  # KilledWorker: the task's workers died too often
                        result = f"failed ({type(e).__name__}: {first_line(e)})"
                    future.release()  # a finished run's result must not be recomputed if its worker dies
                    if result in STOPPED and placed[job.id] < PLACES:  # its machine stopped it: elsewhere, resumed
                        pending.append(job)
                        continue
                    results[job.id] = result
                    if done is not None:
                        done(job.id, results[job.id])
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        return results


def slots(client) -> tuple[int, int]:
    """(GPU slots, CPU slots) of the cluster now: workers with the GPU resource, and all threads."""
    info = client.scheduler_info()["workers"]
    gpus = sum(int(w.get("resources", {}).get("GPU", 0)) for w in info.values())
    threads = sum(int(w.get("nthreads", 1)) for w in info.values())
    return gpus, threads


def local_cluster(workers: int, gpus: list[str]):
    """A Dask cluster of this machine, every listener on 127.0.0.1 and no dashboard: one worker per
    GPU (CUDA_VISIBLE_DEVICES=that GPU, resource GPU=1), or `workers` single-thread CPU workers."""
    distributed = _dask()
    from distributed.deploy.spec import SpecCluster

    quiet = logging.WARNING
    options = {"nthreads": 1, "host": "127.0.0.1", "dashboard": False, "dashboard_address": "127.0.0.1:0",
               "memory_limit": 0, "silence_logs": quiet}
    if gpus:
        spec = {f"gpu{g}": {"cls": distributed.Nanny, "options": {**options, "env": {"CUDA_VISIBLE_DEVICES": g},
                                                                   "resources": {"GPU": 1}}} for g in gpus}
    else:
        spec = {f"cpu{i}": {"cls": distributed.Nanny, "options": dict(options)} for i in range(workers)}
    scheduler = {"cls": distributed.Scheduler, "options": {"host": "127.0.0.1", "dashboard": False,
                                                           "dashboard_address": "127.0.0.1:0"}}
    return SpecCluster(workers=spec, scheduler=scheduler, silence_logs=quiet, name="cifarlab")


def make_executor(name: str, *, workers: int = 1, gpus: Optional[list[str]] = None, address: Optional[str] = None,
                  scheduler_file: Optional[str] = None, slurm: Optional[dict[str, Any]] = None,
                  logs: Optional[Path] = None, warm: bool = True) -> Executor:
    """The executor a study asks for: local | dask | slurm (the Slurm jobs' output in `logs`); `warm`:
    runs are forked from warm processes (studies/warm.py), else each starts a new interpreter."""
    gpus = list(gpus or [])
    if name not in EXECUTORS:
        raise ConfigError(f"unknown executor {name!r} (choose from: {', '.join(EXECUTORS)})")
    if name == "local":
        if address or scheduler_file:
            raise ConfigError("--address and --scheduler-file need --executor dask")
        return LocalExecutor(workers=len(gpus) if gpus and workers == 1 else workers, gpus=gpus, warm=warm)
    if name == "dask":
        address = address or (None if scheduler_file else os.environ.get("DASK_SCHEDULER_ADDRESS"))
        return DaskExecutor(workers=workers, gpus=gpus, address=address, scheduler_file=scheduler_file, warm=warm)
    slurm = slurm or {}
    check_slurm(slurm)
    return DaskExecutor(make_cluster=lambda: slurm_cluster(slurm, logs), threads=slurm_cores(slurm),
                        gpu_workers=int(slurm.get("gpus_per_run", 0)) > 0, jobs=slurm_jobs(slurm),
                        check_cluster=lambda: slurm_reachable(connect_timeout()), warm=warm)


# ---------------------------------------------------------------- a study's jobs


def plan_jobs(study: Study, out: Path, threads: Optional[int] = None) -> tuple[dict[str, str], list[Job]]:
    """What a run of the study does now: the runs it skips (completed, or being written by another
    process) and a job for every other one (its config written to out/configs/RUN.yaml); CPU runs
    that do not set train.threads get `threads`."""
    out.mkdir(parents=True, exist_ok=True)
    outcome, jobs = {}, []
    for run in study.runs:
        run_dir = out / run.id
        holder = runs.lock_holder(run_dir) if run_dir.exists() else None
        if holder is not None:  # another sweep (or a train --resume) is writing it: leave it alone
            outcome[run.id] = f"skipped (process {holder} is writing it)"
            continue
        if run_dir.exists() and run_state(run_dir) == "completed":
            outcome[run.id] = "skipped (completed before)"
            continue
        config_path = out / "configs" / f"{run.id}.yaml"
        config_path.parent.mkdir(exist_ok=True)
        write_config(run.config, config_path)
        settings = [] if threads is None or run.config.train.threads is not None else [f"train.threads={threads}"]
        jobs.append(Job(run.id, run_dir, config_path, out / "logs" / f"{run.id}.log", settings, run.config.train.device))
    return outcome, jobs


def run_jobs(study: Study, out: Path, executor: Optional[Executor] = None, workers: int = 1,
             on_run: Optional[Callable[[str, str], None]] = None) -> dict[str, str]:
    """Run what is not finished yet; returns run id -> what happened (skipped, completed, failed ...),
    and tells `on_run(run id, what happened)` as each run is skipped or ends."""
    executor = executor or make_executor("local", workers=workers, gpus=local_gpus())
    executor.reach()  # a cluster that cannot be reached: one error, before anything is written to `out`
    outcome, jobs = plan_jobs(study, out, executor.run_threads)
    for job_id, what in list(outcome.items()):
        if on_run is not None:
            on_run(job_id, what)

    def finished(job_id: str, code: Any) -> None:
        outcome[job_id] = describe_exit(job_id, code)
        if on_run is not None:
            on_run(job_id, outcome[job_id])

    for job_id, code in executor.run(jobs, finished).items():
        outcome[job_id] = describe_exit(job_id, code)
    return outcome


def describe_exit(job_id: str, code: Any) -> str:
    """What a job's exit code (or failure message) means for its run."""
    if isinstance(code, str):
        return code
    if code == IN_USE:
        return "skipped (another process kept writing it)"
    return "completed" if code == 0 else f"failed (exit {code}, see logs/{job_id}.log)"


def study_executor(study: Study, name: Optional[str] = None, workers: Optional[int] = None,
                   address: Optional[str] = None, scheduler_file: Optional[Any] = None,
                   folder: Optional[Path] = None) -> tuple[str, Executor, int]:
    """The executor's name, the executor and the worker count for `study` (Slurm jobs write their output
    to `folder`/logs/slurm): the arguments, else the study's `executor:` block, else local with one worker."""
    settings = study.executor
    name = name or settings.get("name") or ("dask" if address or scheduler_file else "local")
    workers = int(workers or settings.get("workers") or 1)
    if workers < 1:
        raise ConfigError(f"{study.path}: executor workers must be >= 1")
    scheduler_file = scheduler_file or settings.get("scheduler_file")
    if name == "slurm":
        check_slurm(study.slurm, str(study.path))
    executor = make_executor(name, workers=workers, gpus=local_gpus(), address=address or settings.get("address"),
                             scheduler_file=str(scheduler_file) if scheduler_file else None, slurm=study.slurm,
                             logs=folder / "logs" / "slurm" if folder is not None else None,
                             warm=settings.get("warm", True))
    return name, executor, workers


def local_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES values (those already visible, if set)."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    names = [v.strip() for v in visible.split(",") if v.strip()] if visible else []
    return names[:torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]
