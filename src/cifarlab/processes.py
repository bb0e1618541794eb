"""Child processes that never outlive what started them.

A training process started by a study (or a rank started by the data-parallel launcher) runs in its
own process group, so that stopping it stops everything it started, and it asks Linux to SIGKILL it
when the thread that started it dies (PR_SET_PDEATHSIG): a SIGKILLed Dask worker or sweep leaves no
orphan training behind.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
from typing import IO, Any, Callable, Optional

PARENT_ENV = "CIFARLAB_PARENT_PID"  # set for a child: the pid it must not outlive
PR_SET_PDEATHSIG = 1


def cores() -> int:
    """CPU threads a cifarlab process uses when train.threads is not given: OMP_NUM_THREADS where it is set
    (torch's own rule), else the cores this process may run on, its affinity mask (what taskset, a
    container's cpuset or a Slurm job's binding allows), not every core of the machine."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:
        return int(given)
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cores_per(processes: int) -> int:
    """CPU threads for each of `processes` processes sharing this process' cores."""
    return max(1, cores() // max(1, processes))


def die_with_parent() -> None:
    """Called first thing in a cifarlab process: if a cifarlab parent started it (PARENT_ENV), be
    killed when that parent dies, and exit now if it already has."""
    expected = os.environ.pop(PARENT_ENV, None)
    if not expected:
        return
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != int(expected):  # the parent died before prctl took effect
        os._exit(1)


def start(command: list[str], env: dict[str, str], log: Optional[IO] = None, pass_fds: tuple[int, ...] = ()
          ) -> subprocess.Popen:
    """Start `command` in a new process group that dies with this process (and with the thread that
    starts it: PR_SET_PDEATHSIG); `pass_fds` stay open in it."""
    return subprocess.Popen(command, env={**env, PARENT_ENV: str(os.getpid())}, stdout=log,
                            stderr=subprocess.STDOUT if log is not None else None, start_new_session=True,
                            pass_fds=pass_fds)


def stop(process: subprocess.Popen, grace_s: float = 30.0) -> int:
    """SIGTERM the process group (a training run saves its place and exits), SIGKILL it after
    `grace_s`; returns the exit code."""
    for signum, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            break
        try:
            return process.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
    return process.wait()


def run_entry_point(main: Callable[[], Any]) -> None:
    """Run a command-line entry point (the `cifarlab` command) as a cifarlab process: it dies with
    its parent, and as one rank of a data-parallel run (WORLD_SIZE set) it leaves with os._exit after
    flushing: freeing the gloo process group while the interpreter shuts down can abort the process
    ("terminate called without an active exception") after the run was written in full."""
    die_with_parent()
    if "WORLD_SIZE" not in os.environ:
        main()
        return
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
