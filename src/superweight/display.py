"""How a result shows in a notebook: `_repr_html_` (its tables, and its plots where it has them) and a short
`__repr__`, for the classes that mix in `Shown` (DetectResult, EvalResult, RunRecord, QuantResult, Comparison).

The classes live in several layers (io, stages, report) and the drawing is the report's (report/notebook.py),
which no lower layer may import; so the top-level API (superweight/api.py, loaded by the first `sw.<name>`)
registers each class's two renderers in RENDERERS. Until then a result shows as pydantic's plain repr. `num`
formats a number for a table cell or a progress line, at any layer (the census table and its progress lines).
"""

from __future__ import annotations

from collections.abc import Callable

# class -> (short repr, HTML): filled by superweight/api.py
RENDERERS: dict[type, tuple[Callable[[object], str], Callable[[object], str]]] = {}


def _renderers(obj) -> tuple[Callable, Callable] | None:
    return next((RENDERERS[c] for c in type(obj).__mro__ if c in RENDERERS), None)


class Shown:
    """Mix-in for a result: a one-line `__repr__` and an HTML `_repr_html_` from its registered renderers."""

    def __repr__(self) -> str:
        found = _renderers(self)
        return found[0](self) if found else super().__repr__()

    def _repr_html_(self) -> str | None:
        found = _renderers(self)
        return found[1](self) if found else None


def num(x: float | None, digits: int) -> str:
    """A number for a table cell or a progress line: `digits` decimals, "-" for none, and scientific notation
    where fixed point would hide it (a control-sized KL, 2e-7, is not 0.000) or run long."""
    if x is None:
        return "-"
    if x != 0 and (abs(x) < 10 ** -digits or abs(x) >= 1e5):
        return f"{x:.1e}"
    return f"{x:.{digits}f}"
