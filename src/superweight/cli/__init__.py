"""The `superweight` command line: thin commands that parse options, call one library function, print.

Errors raised as `SuperweightError` become one `Error: ...` line on stderr and a non-zero exit (2 for bad
option values, 1 otherwise). Set SUPERWEIGHT_DEBUG=1 to see the traceback instead.

One module per command group defines its commands on `app` (common.py): inspect.py (info, eval, detect, sweep),
census.py (census), repair.py (repair, apply), analysis.py (analyze, sparsify, compensate, report, compare), run.py (run),
quantize.py (quantize). `--help` lists them in `COMMANDS` order, the pipeline's, whatever order the modules are
imported in: `_in_pipeline_order` sorts the registered commands by it, and a command missing from it is an
error at import. Terminal tables live in report/terminal.py (the census's in report/census.py).
"""

from __future__ import annotations

from superweight.cli import (  # noqa: F401  (each module defines its commands on `app`)
    analysis, census, inspect, quantize, repair, run,
)
from superweight.cli.common import app, err, out

__all__ = ["COMMANDS", "app", "err", "main", "out"]

# The order `superweight --help` lists the commands in: look at a model, find and grade its super weights
# (one model, then many), probe one weight, repair it, use the patch, study the run, do all of it in one go,
# then quantization.
COMMANDS = (
    "info", "eval", "detect", "census", "sweep",
    "repair", "apply",
    "analyze", "sparsify", "compensate", "report", "compare",
    "run",
    "quantize",
)


def _in_pipeline_order() -> None:
    """Sort `app`'s commands by `COMMANDS` (typer lists them in registration order)."""
    registered = app.registered_commands
    names = [c.name or c.callback.__name__ for c in registered]
    if sorted(names) != sorted(COMMANDS):
        raise RuntimeError(f"cli.COMMANDS {sorted(COMMANDS)} does not match the registered commands {sorted(names)}")
    registered.sort(key=lambda c: COMMANDS.index(c.name or c.callback.__name__))


_in_pipeline_order()


def main() -> None:
    app()
