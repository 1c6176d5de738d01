"""The `superweight` command line: thin commands that parse options, call one library function, print.

Errors raised as `SuperweightError` become one `Error: ...` line on stderr and a non-zero exit (2 for bad
option values, 1 otherwise). Set SUPERWEIGHT_DEBUG=1 to see the traceback instead.

One module per command group registers its commands on `app` (common.py), in the order `--help` lists them:
inspect.py (info, eval, detect, sweep), census.py (census, moved to follow detect), repair.py (repair, apply),
analysis.py (analyze, sparsify, report, compare), run.py (run), quantize.py (quantize). Terminal tables live in
report/terminal.py (the census's in report/census.py).
"""

from __future__ import annotations

from superweight.cli import (  # noqa: F401  (registers the commands, in order)
    analysis, census, inspect, quantize, repair, run,
)
from superweight.cli.common import app, err, out

__all__ = ["app", "err", "main", "out"]


def main() -> None:
    app()
