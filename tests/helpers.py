"""Plain helpers shared by the test modules (fixtures are in conftest.py): the `cifarlab` command in a
process of its own or in this one, waiting for a condition, IDX files."""

from __future__ import annotations

import gzip
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

# `cifarlab ...` in a process of its own: for signals, SIGKILL, locks, resource limits and ranks
CLI = [sys.executable, "-m", "cifarlab.cli"]
# the console script that `pip install` writes beside this interpreter
CONSOLE_SCRIPT = Path(sys.executable).parent / "cifarlab"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cli_command(*args) -> list[str]:
    """The command line of `cifarlab ARGS` run as its own process."""
    return [*CLI, *map(str, args)]


def run_cli(*args, timeout: float = 600, env: Optional[dict[str, str]] = None, **kwargs) -> subprocess.CompletedProcess:
    """`cifarlab ARGS` in a process of its own; waits for it (up to `timeout` seconds: a command whose own
    wait is not bounded fails the test instead of hanging it) and captures its output. `env`: variables
    added to this process' environment."""
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env} if env else None, **kwargs)


def assert_error(result, code: int, *fragments: str) -> str:
    """Exit `code`, no traceback, and the last stderr line is the one-line error holding every fragment;
    returns that line (printed too: pytest -rP shows the corpus' messages)."""
    assert result.returncode == code, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in last, (fragment, last)
    print(f"exit {result.returncode}: {last}")
    return last


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Result:
    """What a finished `cifarlab` command left: as subprocess.CompletedProcess names it."""

    returncode: int
    stdout: str
    stderr: str


def invoke(*args) -> Result:
    """`cifarlab ARGS` run in this process (typer's CliRunner), for what a process of its own would
    prove nothing more about: exit code, stdout and stderr kept apart. An exception that the command
    does not turn into an exit code is raised here (the real command would print its traceback)."""
    from typer.testing import CliRunner

    from cifarlab.cli import app

    try:
        runner = CliRunner(mix_stderr=False)  # click < 8.2; later versions always keep stderr apart
    except TypeError:
        runner = CliRunner()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    threads = torch.get_num_threads()
    try:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    finally:  # the command points the root logger at the runner's streams, which close, and sets torch's threads
        root.handlers[:] = handlers
        root.setLevel(level)
        torch.set_num_threads(threads)
    # rich colours its output when this process' stdout was a terminal at import (pytest -s)
    return Result(result.exit_code, ANSI.sub("", result.stdout), ANSI.sub("", result.stderr))


def invoke_bounded(*args, timeout: float = 120) -> Result:
    """`invoke(ARGS)` in a thread of its own, for a command whose bounded wait is what the test checks: one that
    has not returned within `timeout` seconds fails the test instead of hanging it (its daemon thread is left
    behind), as a process of its own would, without the process' start (torch and the CLI imported again)."""
    outcome: dict[str, object] = {}

    def target():
        try:
            outcome["result"] = invoke(*args)
        except BaseException as e:  # re-raised in the test's thread
            outcome["error"] = e

    thread = threading.Thread(target=target, name="cifarlab command", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"cifarlab {' '.join(map(str, args))}: still waiting after {timeout} s")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["result"]  # type: ignore[return-value]


def wait_for(predicate, what: str = "a condition", timeout: float = 300, interval: float = 0.05):
    """Poll `predicate` until it returns something true, and return that; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def write_idx(path: Path, array: np.ndarray, magic: bytes = b"\0\0\x08") -> None:
    """An IDX file (MNIST's format) of uint8 `array`; gzip-compressed when the name ends in .gz."""
    header = magic + bytes([array.ndim]) + b"".join(struct.pack(">I", int(n)) for n in array.shape)
    opener = gzip.open if Path(path).suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def listening(pids: set[int]) -> set[str]:
    """host:port of every listening TCP socket that one of `pids` holds."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = set()
    for table_file, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table_file).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                address, port = fields[1].split(":")
                found.add(f"{decode(address, width)}:{int(port, 16)}")
    return found


def decode(hex_address: str, width: int) -> str:
    if width == 8:
        return ".".join(str(b) for b in reversed(bytes.fromhex(hex_address)))
    return "::1" if hex_address == "00000000000000000000000001000000" else hex_address


def parent_of(pid: int) -> int:
    """The parent pid of process `pid` (from /proc/PID/stat)."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (children started from any of its threads, theirs, ...)."""
    parents = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            parents[int(entry)] = parent_of(int(entry))
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    found, todo = set(), [pid]
    while todo:
        parent = todo.pop()
        children = {p for p, pp in parents.items() if pp == parent} - found
        found |= children
        todo.extend(children)
    return found
