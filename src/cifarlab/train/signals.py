"""SIGINT / SIGTERM during training: a flag the loop checks after each step, so a run stops at a
step boundary with its state saved; a second signal stops at once. After training (the analysis: the
report, t-SNE) there is no step to finish and every file is written atomically: there the first
signal stops at once (`SignalFlag(at_once=True)` raises SignalStop)."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Optional

from ..errors import CifarlabError


class SignalStop(BaseException):
    """SIGINT / SIGTERM under `SignalFlag(at_once=True)`: a BaseException, so `except Exception` in a
    figure or a callback does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum


class SignalFlag:
    """Turns SIGINT / SIGTERM into `signum`, which the loop reads (handlers only in the main thread);
    with `at_once`, into SignalStop raised where the program is."""

    def __init__(self, at_once: bool = False):
        self.signum: Optional[int] = None
        self.at_once = at_once
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "SignalFlag":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        if self.at_once:
            raise SignalStop(signum)

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def stoppable(action: Callable[[], Any]) -> tuple[str, Optional[str], Optional[int]]:
    """Run `action` where the first SIGINT / SIGTERM stops it at once: (status, reason, signal) is
    ("done", None, None), ("interrupted", "interrupted by SIGTERM", 15), or ("failed", the error, None)
    when it raised an Exception (a CifarlabError by its message, anything else by its type and message)."""
    try:
        with SignalFlag(at_once=True):
            action()
    except SignalStop as e:
        return "interrupted", f"interrupted by {signal_name(e.signum)}", e.signum
    except Exception as e:  # noqa: BLE001 - the caller records and logs it
        return "failed", str(e) if isinstance(e, CifarlabError) else f"{type(e).__name__}: {e}", None
    return "done", None, None
