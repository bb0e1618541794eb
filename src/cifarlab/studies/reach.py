"""Whether what a study runs on can be reached, each within a bounded wait: a Dask scheduler (at an
address or named by a scheduler file), a Slurm controller, and (in tune.py) a search's storage server.
The wait is $CIFARLAB_CONNECT_TIMEOUT seconds (default CONNECT_TIMEOUT_S); nothing is written to a study
folder before these answer, and one that does not is a ConfigError: one line, exit code 2."""

from __future__ import annotations

import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

from ..errors import ConfigError

CONNECT_TIMEOUT_ENV = "CIFARLAB_CONNECT_TIMEOUT"  # seconds to reach a Dask scheduler, a Slurm controller, a storage
CONNECT_TIMEOUT_S = 10.0  # its default (Dask waits 30 s, and forever for a server that accepts and never answers)


def connect_timeout() -> float:
    """How long a study waits for a Dask scheduler, a Slurm controller or a search's storage server to
    answer: $CIFARLAB_CONNECT_TIMEOUT seconds, default CONNECT_TIMEOUT_S."""
    text = os.environ.get(CONNECT_TIMEOUT_ENV, "").strip()
    try:
        seconds = float(text) if text else CONNECT_TIMEOUT_S
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"{CONNECT_TIMEOUT_ENV}={text}: must be a number of seconds > 0")
    return seconds


def reach_scheduler(address: Optional[str], scheduler_file: Optional[str], seconds: float) -> str:
    """The address of the Dask scheduler at `address` (or named by `scheduler_file`, which may take up to
    `seconds` to appear) once it has answered a handshake within `seconds`; else a ConfigError. Dask's
    own connect timeout leaves out the handshake: a server that accepts and never answers hangs it."""
    import asyncio

    from distributed.comm import connect

    where = f"Dask scheduler {address}" if address else f"--scheduler-file {scheduler_file}"
    if not address:
        address = scheduler_file_address(Path(str(scheduler_file)), seconds)

    async def handshake() -> None:
        comm = await asyncio.wait_for(connect(address, timeout=seconds), seconds)
        await comm.close()

    try:
        with ThreadPoolExecutor(max_workers=1) as pool:  # an event loop of its own (a notebook runs one already)
            pool.submit(asyncio.run, handshake()).result()
    except (OSError, ValueError) as e:  # refused, timed out, no such host (TimeoutError is an OSError); a bad address
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{where}: no answer within {seconds:g} s ({reason}); is the scheduler running? "
                          f"(${CONNECT_TIMEOUT_ENV} sets the wait)") from None
    return address


def scheduler_file_address(path: Path, seconds: float) -> str:
    """The scheduler address in a Dask scheduler file, waiting up to `seconds` for the file to appear."""
    deadline = time.monotonic() + seconds
    while not path.is_file() and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        return str(json.loads(path.read_text())["address"])
    except FileNotFoundError:
        raise ConfigError(f"--scheduler-file {path}: no such file after {seconds:g} s "
                          f"(${CONNECT_TIMEOUT_ENV} sets the wait)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--scheduler-file {path}: not a Dask scheduler file ({type(e).__name__}: {e})") from None


def slurm_reachable(seconds: float) -> None:
    """`scontrol ping` says the Slurm controller is UP within `seconds`; else a ConfigError (no Slurm
    commands on this machine, a controller that is down, or one that does not answer)."""
    try:
        found = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=seconds)
    except FileNotFoundError:
        raise ConfigError("executor slurm: no scontrol on this machine; run the study where Slurm's commands are "
                          "(a login node)") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"executor slurm: the Slurm controller did not answer `scontrol ping` within {seconds:g} s "
                          f"(${CONNECT_TIMEOUT_ENV} sets the wait)") from None
    lines = (found.stdout + found.stderr).strip().splitlines()
    answer = " ".join(lines[0].split()) if lines else ""  # its first line (a DOWN answer adds a banner of asterisks)
    if found.returncode != 0 or " DOWN" in answer:
        raise ConfigError(f"executor slurm: the Slurm controller cannot be reached (scontrol ping: "
                          f"{answer or f'exit {found.returncode}'})")
