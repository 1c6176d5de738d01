"""Number and text formatting for the report: 4 significant digits for NLL/KL, PPL with 2 decimals,
percentages with 1, tokens as repr so their whitespace shows."""

from __future__ import annotations

import json

DASH = "–"


def num(x) -> str:
    if x is None:
        return DASH
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):  # super activations run to 1e3-1e5: 24,072 reads better than 2.407e+04
        return f"{x:,.0f}" if 1e3 <= abs(x) < 1e9 else f"{x:.4g}"
    return str(x)


def ppl(x) -> str:
    return DASH if x is None else f"{x:.2f}" if x < 1e5 else f"{x:.2e}"


def pct(x) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


# A recovery is undefined (None, null in results.json) where the ablation did no damage of that kind.
NA = "n/a"
NO_DAMAGE = "n/a: the ablation did no measurable damage, so there is nothing to recover (docs/results.md)"


def rec(x) -> str:
    """A recovery as a percentage, or "n/a" where it is undefined (NO_DAMAGE says why)."""
    return NA if x is None else f"{100 * x:.1f}%"


def interval(x) -> str:
    """A [low, high] pair of shares: "95.1% to 99.9%"."""
    return f"{pct(x[0])} to {pct(x[1])}" if x else DASH


def tok(s) -> str:
    """A token with its whitespace visible: ' the', '\\n'."""
    return DASH if s is None else repr(s)


def vis(s) -> str:
    return str(s).replace("\r", "\\r").replace("\n", "\\n").replace("\t", "\\t")


def value(v) -> str:
    return json.dumps(v, ensure_ascii=False) if isinstance(v, dict | list) else num(v)
