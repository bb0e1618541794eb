"""What every `cifarlab` command shares: the consoles (stdout for results, stderr for progress
and errors), the one-line error wrapper and logging. Part of the command line: it imports only the
public namespace and errors."""

from __future__ import annotations

import functools
import inspect
import logging
import sys

import typer
from rich.console import Console
from rich.text import Text

import cifarlab

from .errors import CifarlabError, Interrupted

# No markup: user values such as [32, 64] must print as they are.
out = Console(markup=False, highlight=False, soft_wrap=True)
err = Console(stderr=True, markup=False, highlight=False, soft_wrap=True)


def user_errors(command):
    """Print a user's mistake as one line and exit 2 (1 for failed training); --debug shows the traceback.
    The command gets a `context` parameter typer fills in, which carries --debug (the root command's)."""

    @functools.wraps(command)
    def run(*args, context: typer.Context, **kwargs):
        try:
            return command(*args, **kwargs)
        except Interrupted as e:
            if cifarlab.reports_runs() and not e.reported:  # data-parallel ranks stop together: rank 0 says so
                err.print(f"{' '.join(str(e).split())}; {e.next_step}")
            raise typer.Exit(e.exit_code) from None
        except CifarlabError as e:
            if (context.find_root().obj or {}).get("debug"):
                raise
            if not e.reported:
                err.print(Text.assemble(("error: ", "bold red"), " ".join(str(e).split())))
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    signature = inspect.signature(command)
    context = inspect.Parameter("context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)
    run.__signature__ = signature.replace(parameters=[*signature.parameters.values(), context])
    return run


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr, force=True)
    for noisy in ("pooch", "openTSNE", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def say(line: str) -> None:
    """A line on stdout at once, also when stdout is a file or a pipe (a line per run as it ends)."""
    out.print(line)
    out.file.flush()
