"""Warm run starts: a study's training process forked from a warm process instead of started cold.

A cold `python -m cifarlab.cli train ...` pays about 1.7 s of interpreter start and imports (torch,
torch._dynamo, cifarlab) and reads its dataset again. A warm process (one per executor worker) starts
once, imports those modules and nothing else (no torch op runs in it, so no OpenMP or intra-op thread
pool exists when it forks), reads each run's dataset once (numpy arrays that the runs it forks share
copy-on-write: data.sources.KEPT), and forks one child per run. The child is what a cold start would
be: it makes its own session (its own process group, which `processes.stop` signals), asks Linux to
SIGKILL it when the warm process dies (PR_SET_PDEATHSIG; the warm process itself dies with the thread
that started it), has the default SIGINT / SIGTERM handling, takes the job's environment, working
folder and log as stdout and stderr, and runs the job's `-m MODULE ARGS` as `python -m` does. Its exit
code is the job's result: the warm process waits for it and sends it back, and the executor waits on
a `WarmRun` as it waits on a subprocess. When anything in this fails, the job starts cold.

The executor side talks to its warm process over a socket pair, one JSON line per message: a request
{argv, env, cwd, log, data}, then {"pid"} (or {"refused"}), then {"exit"}. The warm processes' own
output goes to the study's logs/warm.log.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import json
import os
import queue
import runpy
import select
import signal
import socket
import subprocess
import sys
import threading
import traceback
from pathlib import Path
from typing import IO, Any, NoReturn, Optional, Union

from .. import processes

# what every training process imports: `-m cifarlab.cli` itself runs afresh in each child, as `python -m`
# runs it, with its imports done; torch._dynamo is imported by the first optimizer a run makes
PRELOAD = ("cifarlab.cli", "cifarlab.api", "torch._dynamo")
IDLE_S = 600.0  # a warm process that got no job for this long leaves (the next job starts another)


def available() -> bool:
    """Warm starts need fork and PR_SET_PDEATHSIG: Linux."""
    return sys.platform.startswith("linux") and hasattr(os, "fork")


# ---------------------------------------------------------------- the warm process


class Channel:
    """One JSON object a line over a socket."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall((json.dumps(message) + "\n").encode())

    def receive(self, timeout: Optional[float] = None) -> Optional[dict[str, Any]]:
        """The next message, or None once the other end closed; subprocess.TimeoutExpired when none came
        within `timeout` seconds (None: no limit)."""
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                raise subprocess.TimeoutExpired("a warm process' message", timeout)
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def close(self) -> None:
        self.sock.close()


def serve(channel: Channel) -> None:
    """Fork a run for each request until the other end closes the channel or IDLE_S pass without one;
    refuse (and end) once forking is no longer safe."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork: the child calls no dlsym
    threads = thread_count()
    while True:
        try:
            request = channel.receive(IDLE_S)
        except subprocess.TimeoutExpired:
            return
        if request is None:
            return
        os.environ.clear()  # the run's environment, also for the dataset it reads (the cache's folder)
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        note = keep_data(request.get("data"))
        unsafe = fork_hazard(threads)
        if unsafe:
            channel.send({"refused": unsafe})
            return
        pid = fork_run(request, channel, prctl)
        channel.send({"pid": pid, **({"note": note} if note else {})})
        _, status = os.waitpid(pid, 0)
        channel.send({"exit": os.waitstatus_to_exitcode(status)})


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def fork_hazard(threads: int) -> Optional[str]:
    """Why forking now could hang or break a child (a thread started since the preload: an OpenMP pool
    that a torch op started; CUDA or its driver set up), or None."""
    import torch

    if torch.cuda.is_initialized():
        return "CUDA was initialized in the warm process"
    with open("/proc/self/maps") as maps:  # the driver set up (a device count asked): a child's CUDA would fail
        if any("libcuda.so" in line for line in maps):
            return "CUDA's driver is loaded in the warm process"
    if thread_count() > threads:
        return f"the warm process runs {thread_count()} threads, {threads} after its imports"
    return None


def keep_data(config_path: Optional[str]) -> Optional[str]:
    """Read the dataset of the run's config into data.sources.KEPT; a failure is the run's to report
    (it reads the data itself then), and is returned as a note."""
    if not config_path:
        return None
    from ..config import load_config
    from ..data.sources import keep_dataset

    try:
        config = load_config(Path(config_path))
        keep_dataset(config.data, config.seed)
    except Exception as e:  # noqa: BLE001 - the run meets the same error and reports it as a run
        return f"dataset not kept ({type(e).__name__}: {' '.join(str(e).split())})"
    return None


def fork_run(request: dict[str, Any], channel: Channel, prctl) -> int:
    """Fork the run's process; returns once it has its own session and dies with this process."""
    ready_read, ready_write = os.pipe()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:
        os.close(ready_read)
        become_run(request, channel, prctl, parent, ready_write)
    os.close(ready_write)
    os.read(ready_read, 1)  # b"" when the child ended before: its exit status says why
    os.close(ready_read)
    return pid


def become_run(request: dict[str, Any], channel: Channel, prctl, parent: int, ready: int) -> NoReturn:
    """The forked child: a process of its own, then `python -m MODULE ARGS`; never returns."""
    code = 1
    try:
        channel.close()  # the warm process' channel is not the run's
        os.setsid()
        prctl(processes.PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the warm process died before prctl took effect
            os._exit(1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.write(ready, b"+")
        os.close(ready)
        output = os.open(request["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.dup2(output, 1)
        os.dup2(output, 2)
        os.close(output)
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        os.close(stdin)
        code = run_module(request["argv"], request["cwd"])
        for thread in threading.enumerate():  # as the interpreter does at exit: its threads, then atexit
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001 - a child never returns into the warm process' loop
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001, S110 - nothing left to tell it to
                pass
        os._exit(code)


def run_module(argv: list[str], cwd: str) -> int:
    """`python -m argv[0] argv[1:]` in this process; returns its exit code as the interpreter would."""
    module = argv[0]
    sys.argv = list(argv)
    sys.path[0] = cwd  # what `python -m` puts first
    sys.modules.pop(module, None)  # imported by the preload: run it afresh as __main__, as `python -m` does
    package, _, name = module.rpartition(".")
    if package in sys.modules:
        vars(sys.modules[package]).pop(name, None)
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the interpreter's own way out: the traceback, then death by SIGINT
        traceback.print_exc()
        sys.stderr.flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str]) -> None:
    """`python -m cifarlab.studies.warm FD MODULE...`: import the modules, then serve on socket FD."""
    processes.die_with_parent()
    # a SIGTERM meant for a job (scancel signals every process of a Slurm job) must not end the warm
    # process first, which would SIGKILL the run before it saved its place; it ends with its channel
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    channel = Channel(socket.socket(fileno=int(argv[0])))
    for module in argv[1:]:
        importlib.import_module(module)
    serve(channel)


# ---------------------------------------------------------------- the executor's side


class WarmRun:
    """A run forked by a warm process, waited for like a subprocess.Popen (pid, wait, poll, returncode);
    `processes.stop` signals its process group like any other."""

    def __init__(self, starter: "WarmStarter", pid: int):
        self.starter, self.pid, self.returncode = starter, pid, None

    def wait(self, timeout: Optional[float] = None) -> int:
        if self.returncode is None:
            try:
                reply = self.starter.channel.receive(timeout)
            except OSError:
                reply = None
            # no reply: the warm process died, and the run with it (PR_SET_PDEATHSIG)
            self.returncode = reply["exit"] if reply is not None else -signal.SIGKILL
        return self.returncode

    def poll(self) -> Optional[int]:
        try:
            return self.wait(0)
        except subprocess.TimeoutExpired:
            return None


class WarmStarter:
    """One warm process, started on first use (it dies with the thread that starts it); `start` runs
    one job at a time through it, or starts the job cold when the warm process cannot."""

    def __init__(self, session: str = "") -> None:
        self.session = session  # the sweep it serves (a Dask worker's thread keeps one per sweep)
        self.process: Optional[subprocess.Popen] = None
        self.channel: Optional[Channel] = None
        self.off: Optional[str] = None  # why warm starts failed twice in a row: the next jobs start cold

    def launch(self, logs: Path) -> None:
        """Start the warm process (its imports go on while this returns), its output in `logs`/warm.log."""
        if self.process is not None and self.process.poll() is None:
            return
        self.close()
        ours, theirs = socket.socketpair()
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / "warm.log", "a") as output, theirs:
            self.process = processes.start([sys.executable, "-m", __name__, str(theirs.fileno()), *PRELOAD],
                                           dict(os.environ), output, pass_fds=(theirs.fileno(),))
        self.channel = Channel(ours)

    def start(self, command: list[str], env: dict[str, str], log: IO, data: Optional[Path] = None
              ) -> Union[WarmRun, subprocess.Popen]:
        """The job's `command` (`python -m MODULE ...`) forked from the warm process, which first reads the
        dataset of the config at `data`; started cold when that fails. Notes go to the job's `log`."""
        if command[:2] != [sys.executable, "-m"] or self.off:
            if self.off:
                log.write(f"# warm starts off ({self.off}); starting cold\n")
                log.flush()
            return processes.start(command, env, log)
        request = {"argv": command[2:], "env": {k: v for k, v in env.items() if k != processes.PARENT_ENV},
                   "cwd": os.getcwd(), "log": str(Path(log.name).resolve()), "data": str(data) if data else None}
        for _ in range(2):  # a warm process that died since the last job is started again, once
            try:
                self.launch(Path(log.name).resolve().parent)
                self.channel.send(request)
                reply = self.channel.receive()
            except OSError:  # it ended while we wrote or read (a reset connection, a broken pipe)
                reply = None
            if reply is not None and "pid" in reply:
                log.write(f"# warm start: process {reply['pid']} forked from {self.process.pid}"
                          f"{'; ' + reply['note'] if reply.get('note') else ''}\n")
                log.flush()
                return WarmRun(self, reply["pid"])
            why = (reply or {}).get("refused") or "the warm process ended: see warm.log"
            self.close()
        self.off = why
        log.write(f"# warm start failed ({why}); starting cold\n")
        log.flush()
        return processes.start(command, env, log)

    def close(self) -> None:
        """End the warm process: it reads the end of its channel and leaves (SIGKILL if it does not)."""
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None:
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                processes.stop(self.process, grace_s=0)
            self.process = None


class Starters:
    """The warm processes of a local executor's workers, handed out like GPUs from a free queue. They
    are started by the thread that makes this (which outlives the worker threads), and closed with it."""

    def __init__(self, count: int, logs: Path):
        self.free: "queue.Queue[WarmStarter]" = queue.Queue()
        self.all = [WarmStarter() for _ in range(count if available() else 0)]
        for starter in self.all:
            try:
                starter.launch(logs)
            except OSError as e:  # no process to be had (a limit on processes): this worker's runs start cold
                starter.off = f"the warm process could not start: {e}"
            self.free.put(starter)

    def take(self) -> Optional[WarmStarter]:
        return self.free.get() if self.all else None

    def give(self, starter: Optional[WarmStarter]) -> None:
        if starter is not None:
            self.free.put(starter)

    def __enter__(self) -> "Starters":
        return self

    def __exit__(self, *exc) -> None:
        for starter in self.all:
            starter.close()


_this_thread = threading.local()


def thread_starter(session: str) -> Optional[WarmStarter]:
    """The warm process of the calling thread (a Dask worker's task thread: it lives as long as the
    worker) for the sweep `session`, made on first use; a warm process of an earlier sweep is closed
    first (it may hold other code and data). None where warm starts are not available."""
    if not available():
        return None
    current = getattr(_this_thread, "starter", None)
    if current is not None and current.session != session:
        current.close()
        current = None
    if current is None:
        current = _this_thread.starter = WarmStarter(session)
    return current


if __name__ == "__main__":
    main(sys.argv[1:])
