"""SIGINT / SIGTERM during training: a flag the loop checks after each step, so a run stops at a
step boundary with its state saved; a second signal stops at once."""

from __future__ import annotations

import signal
import threading
from typing import Any, Optional


class SignalFlag:
    """Turns SIGINT / SIGTERM into `signum`, which the loop reads (handlers only in the main thread)."""

    def __init__(self):
        self.signum: Optional[int] = None
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

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
