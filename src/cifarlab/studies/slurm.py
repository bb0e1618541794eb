"""A study's Dask cluster as Slurm jobs (dask-jobqueue's SLURMCluster), from the study file's `slurm:` block:

    slurm: {partition: gpu, time: '04:00:00', memory: 32GB, cores: 8, gpus_per_run: 1, jobs: 4,
            interface: ib0, setup: ['module load cuda']}

Each job runs one single-thread `dask worker` (one run, or one search worker, at a time) with the job's
`cores` for that run's threads. The scheduler runs in the process that started the study (the login
node) and listens on `interface` (the address of that network interface; every address when not set),
and so does each worker on its compute node. The workers' own HTTP servers (metrics, health) listen on
127.0.0.1 only, and so does the scheduler's: nothing of a study is served to the network beyond what
the workers and the scheduler need to talk to each other. Worker logs go to STUDY/logs/slurm.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError

SLURM_KEYS = {"partition", "time", "memory", "cores", "gpus_per_run", "jobs", "account", "interface", "python",
              "job_extra", "setup"}
LOCAL_ONLY = "127.0.0.1:0"  # an HTTP server nobody outside this machine needs: loopback, any free port


def slurm_number(settings: dict[str, Any], key: str, default: int, least: int, source: str = "study") -> int:
    """The integer `slurm.KEY` (>= `least`), or a one-line ConfigError naming the key and the value."""
    value = settings.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"{source}: slurm.{key} must be an integer >= {least}, got {value!r}")
    return value


def check_slurm(settings: dict[str, Any], source: str = "study") -> None:
    """Refuse an unknown key or a count that is not a whole number (one line, exit code 2)."""
    unknown = set(settings) - SLURM_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown slurm key {sorted(unknown)[0]!r} (allowed: {', '.join(sorted(SLURM_KEYS))})")
    for key, default, least in (("cores", 4, 1), ("jobs", 1, 1), ("gpus_per_run", 0, 0)):
        slurm_number(settings, key, default, least, source)
    for key in ("job_extra", "setup"):
        if not isinstance(settings.get(key, []), list):
            raise ConfigError(f"{source}: slurm.{key} must be a list of lines, got {settings[key]!r}")


def slurm_options(settings: dict[str, Any], source: str = "study", logs: Optional[Path] = None) -> dict[str, Any]:
    """dask-jobqueue keyword arguments from a study's `slurm:` block: one Slurm job per worker,
    one run at a time per worker, `gpus_per_run` GPUs per job; the jobs' output in `logs`."""
    check_slurm(settings, source)
    gpus = slurm_number(settings, "gpus_per_run", 0, 0, source)
    directives = [str(line) for line in settings.get("job_extra", [])]
    if gpus:
        directives.append(f"--gres=gpu:{gpus}")
    # one single-thread worker per job (one run at a time), the job's `cores` for that run's threads; the
    # worker's HTTP server on loopback (`--no-dashboard` alone still listens on every address)
    worker_args = ["--dashboard-address", LOCAL_ONLY] + (["--resources", "GPU=1"] if gpus else [])
    options = {"queue": settings.get("partition"), "walltime": str(settings.get("time", "01:00:00")),
               "memory": str(settings.get("memory", "16GB")), "cores": 1, "job_cpu": slurm_cores(settings),
               "processes": 1, "job_extra_directives": directives, "job_name": "cifarlab",
               "worker_extra_args": worker_args, "python": settings.get("python", sys.executable),
               "job_script_prologue": [str(line) for line in settings.get("setup", [])],
               "account": settings.get("account"), "log_directory": str(logs) if logs else None}
    if settings.get("interface"):
        options["interface"] = str(settings["interface"])
    return {k: v for k, v in options.items() if v is not None}


def slurm_cores(settings: dict[str, Any]) -> int:
    """CPU cores of each job: the threads of the run it trains."""
    return slurm_number(settings, "cores", 4, 1)


def slurm_jobs(settings: dict[str, Any]) -> int:
    """How many Slurm jobs (workers) the study keeps: a job that ends early (scancel, time limit) is replaced."""
    return slurm_number(settings, "jobs", 1, 1)


def slurm_job_script(settings: dict[str, Any], scheduler: str = "tcp://SCHEDULER:8786") -> str:
    """The batch script each Slurm job of the study runs (what `sbatch` gets)."""
    from dask_jobqueue.slurm import SLURMJob

    options = slurm_options(settings)
    options.pop("interface", None)
    return SLURMJob(scheduler=scheduler, name="cifarlab-worker", **options).job_script()


def slurm_cluster(settings: dict[str, Any], logs: Optional[Path] = None):
    """A SLURMCluster scaled to the study's `jobs`: its scheduler on `interface`, its HTTP server on
    loopback; the jobs' output in `logs`."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ConfigError("the slurm executor needs the cluster extra: pip install 'cifarlab[cluster]'") from None
    if logs is not None:
        logs.mkdir(parents=True, exist_ok=True)
    cluster = SLURMCluster(**slurm_options(settings, logs=logs),
                           scheduler_options={"dashboard": False, "dashboard_address": LOCAL_ONLY})
    cluster.scale(jobs=slurm_jobs(settings))
    return cluster
