"""Progress of a training run, as a callback: log lines, a progress bar on a terminal, or a bar
that renders in a Jupyter notebook. The library shows a bar only when asked (`progress=True`, or
by default on a terminal or in IPython); otherwise it only logs."""

from __future__ import annotations

import html
from abc import ABC, abstractmethod
import logging
import sys
import time
from typing import Any, Optional

from ..hooks import Callback, TrainerView


log = logging.getLogger(__name__)


def format_epoch(record: dict[str, Any]) -> str:
    parts = [f"epoch {record['epoch']}", f"loss {record['train_loss']:.4f}", f"acc {100 * record['train_acc']:.2f}%"]
    for split in ("val", "test"):  # every split train.evaluate scores each epoch (report 004: the test set too)
        if f"{split}_loss" in record:
            parts += [f"{split}_loss {record[f'{split}_loss']:.4f}", f"{split}_acc {100 * record[f'{split}_acc']:.2f}%"]
    parts.append(f"{record['time']['img_per_s']:.0f} img/s")
    return "  ".join(parts)


def format_result(summary: dict[str, Any]) -> str:
    test = summary.get("test_acc")
    tested = (f" (epoch {summary['tested_epoch']}'s weights: {summary.get('test_weights')})"
              if summary.get("tested_epoch") is not None else "")
    return f"{summary['stop_reason']}: test accuracy " + ("-" if test is None else f"{100 * test:.2f}%") + tested


class LogProgress(Callback):
    """Log lines (logging.INFO): the run, running loss every train.log_every steps, each epoch, the result."""

    def on_fit_start(self, trainer: TrainerView) -> None:
        log.info("run %s: %d epochs of %d steps", trainer.run_dir, trainer.config.train.epochs, trainer.steps_per_epoch)

    def on_step_end(self, trainer: TrainerView, batch: int, logs: Optional[dict[str, float]]) -> None:
        if logs is not None:
            log.info("epoch %d step %d: loss %.4f acc %.2f%%", trainer.current_epoch, batch, logs["loss"],
                     100 * logs["acc"])

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        log.info("%s", format_epoch(record))

    def on_fit_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        log.info("%s", format_result(summary))


class BarProgress(Callback, ABC):
    """A bar per epoch (steps done, running loss and accuracy, img/s) with a line per finished epoch.
    Subclasses draw it: `draw(epoch_text, done, total, stats)`, `line(text)` and `close()`."""

    def on_fit_start(self, trainer: TrainerView) -> None:
        self.total = trainer.steps_per_epoch
        self.epochs = trainer.config.train.epochs
        self.batch_size = trainer.config.train.batch_size
        self.stats = ""
        self.epoch_start = time.perf_counter()
        self.line(f"run directory: {trainer.run_dir}")

    def on_step_end(self, trainer: TrainerView, batch: int, logs: Optional[dict[str, float]]) -> None:
        if batch == 1:
            self.epoch_start, self.stats = time.perf_counter(), ""
        if logs is not None:
            rate = batch * self.batch_size / max(time.perf_counter() - self.epoch_start, 1e-9)
            self.stats = f"loss {logs['loss']:.4f} acc {100 * logs['acc']:.1f}% {rate:.0f} img/s"
        self.draw(f"epoch {trainer.current_epoch}/{self.epochs}", batch, self.total, self.stats)

    def on_epoch_end(self, trainer: TrainerView, record: dict[str, Any]) -> None:
        self.line(format_epoch(record))

    def on_train_end(self, trainer: TrainerView) -> None:
        self.close()

    def on_interrupt(self, trainer: TrainerView, position: dict[str, Any]) -> None:
        self.close()

    @abstractmethod
    def draw(self, epoch: str, done: int, total: int, stats: str) -> None:
        """Show the bar of `epoch` at `done` of `total` steps with the running `stats`."""

    @abstractmethod
    def line(self, text: str) -> None:
        """Show one line (the run directory, an epoch's result) above the bar."""

    def close(self) -> None:
        pass


class TerminalProgress(BarProgress):
    """A rich progress bar on stderr; epoch lines print above it."""

    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True, markup=False, highlight=False, soft_wrap=True)
        self.progress = None
        self.task = None
        self.epoch_text = ""

    def draw(self, epoch: str, done: int, total: int, stats: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        if self.progress is None:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[stats]}"), TimeElapsedColumn(), console=self.console,
                                     transient=True)
            self.progress.start()
        if epoch != self.epoch_text:  # a new epoch: a fresh bar (and its elapsed time)
            if self.task is not None:
                self.progress.remove_task(self.task)
            self.task = self.progress.add_task(epoch, total=total, stats="")
            self.epoch_text = epoch
        self.progress.update(self.task, completed=done, stats=stats)

    def line(self, text: str) -> None:
        (self.progress.console if self.progress is not None else self.console).print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress, self.task, self.epoch_text = None, None, ""


class ShownLines(logging.Handler):
    """Log records of one logger shown as lines by a progress display (`show(text)`)."""

    def __init__(self, show):
        super().__init__(logging.INFO)
        self.show = show

    def emit(self, record: logging.LogRecord) -> None:
        self.show(record.getMessage())


class NotebookProgress(BarProgress):
    """An HTML bar in the notebook cell's output (IPython display, updated in place), with the
    epoch lines below it, then the result and the analysis phase's lines (a line per figure and
    t-SNE embedding, from the cifarlab.analysis logger). Redraws at most every `every_s` seconds."""

    def __init__(self, every_s: float = 0.25):
        self.every_s = every_s
        self.lines: list[str] = []
        self.handle = None
        self.last_draw = 0.0
        self.bar = ""
        self.analysis: Optional[tuple[logging.Logger, ShownLines, int]] = None

    def on_fit_end(self, trainer: TrainerView, summary: dict[str, Any]) -> None:
        self.line(format_result(summary))
        logger = logging.getLogger("cifarlab.analysis")  # the report callback runs after this one
        self.analysis = (logger, ShownLines(self.line), logger.level)
        logger.addHandler(self.analysis[1])
        logger.setLevel(logging.INFO)

    def draw(self, epoch: str, done: int, total: int, stats: str) -> None:
        now = time.perf_counter()
        if done not in (1, total) and now - self.last_draw < self.every_s:
            return
        self.last_draw = now
        self.bar = (f"<div style='font-family:monospace'>{html.escape(epoch)} "
                    f"<progress value='{done}' max='{total}' style='width:40%'></progress> {done}/{total} "
                    f"{html.escape(stats)}</div>")
        self.show()

    def line(self, text: str) -> None:
        self.lines.append(text)
        self.show()

    def close(self) -> None:
        self.bar = ""
        self.show()
        if self.analysis is not None:  # the run is over (api.fit closes its progress display)
            logger, handler, level = self.analysis
            logger.removeHandler(handler)
            logger.setLevel(level)
            self.analysis = None

    def show(self) -> None:
        from IPython.display import HTML, display

        body = self.bar + "".join(f"<div style='font-family:monospace'>{html.escape(t)}</div>" for t in self.lines)
        if self.handle is None:
            self.handle = display(HTML(body), display_id=True)
        else:
            self.handle.update(HTML(body))


def in_notebook() -> bool:
    """True inside a Jupyter kernel (not a terminal IPython)."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def default_progress(progress: Optional[bool]) -> Callback:
    """The progress callback for `progress`: True shows a bar (in a notebook or on the terminal),
    False only logs; None (the default) shows one in a notebook or when stderr is a terminal."""
    if in_notebook() and progress is not False:
        return NotebookProgress()
    if progress or (progress is None and sys.stderr.isatty()):
        return TerminalProgress()
    return LogProgress()
