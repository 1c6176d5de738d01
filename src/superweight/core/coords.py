"""Weight coordinates written `LAYER:ROW:COL[@SCALE]`, e.g. `11:507:1229` or `11:507:1229@0.5`, and in a
mixture-of-experts layer `LAYER:EXPERT:ROW:COL[@SCALE]`, e.g. `3:17:507:1229` (routed expert 17) or
`3:shared:507:1229` (the shared expert).

ROW is the residual channel (d_model side), COL the intermediate neuron (d_ff side); see core/arch.py.

Patch rows are tuples: `(layer, row)` in a dense MLP, `(layer, row, expert)` in an expert's down-projection,
written `LAYER:ROW` and `LAYER:EXPERT:ROW`. `row_of`, `split_row`, `row_text` and `parse_row` convert.
"""

from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict

from superweight.errors import CoordinateError
from superweight.settings import revalidated

SHARED = "shared"  # core/moe.py's name of the shared expert
_SCALE = r"(?:@\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?"
_PATTERN = re.compile(rf"^\s*(\d+):(?:(\d+|{SHARED}):)?(\d+):(\d+)\s*{_SCALE}\s*$")
_ROW = re.compile(rf"^\s*(\d+):(?:(\d+|{SHARED}):)?(\d+)\s*$")

Expert = Union[int, Literal["shared"], None]  # None: a dense MLP; an int: a routed expert; "shared"


class WeightCoord(BaseModel):
    """One scalar of one down-projection, and the factor an ablation multiplies it by (0 = zero it)."""

    model_config = ConfigDict(frozen=True)

    layer: int
    row: int
    col: int
    scale: float = 0.0
    expert: Expert = None

    def __str__(self) -> str:
        where = f"{self.layer}:" if self.expert is None else f"{self.layer}:{self.expert}:"
        base = f"{where}{self.row}:{self.col}"
        return base if self.scale == 0.0 else f"{base}@{self.scale:g}"

    @property
    def key(self) -> tuple:
        """(layer, row, col), or (layer, expert, row, col) in an expert."""
        if self.expert is None:
            return (self.layer, self.row, self.col)
        return (self.layer, self.expert, self.row, self.col)


def _expert(text: str | None) -> Expert:
    return None if text is None else text if text == SHARED else int(text)


def parse_coord(text: str) -> WeightCoord:
    match = _PATTERN.match(text)
    if not match:
        raise CoordinateError(
            f"invalid weight coordinate '{text}': expected LAYER:ROW:COL[@SCALE], e.g. 11:507:1229 or "
            "11:507:1229@0.5 (LAYER:EXPERT:ROW:COL in a mixture of experts, e.g. 3:17:507:1229 or 3:shared:507:1229)"
        )
    layer, expert, row, col, scale = match.groups()
    return WeightCoord(layer=int(layer), row=int(row), col=int(col), scale=float(scale or 0.0),
                       expert=_expert(expert))


def as_coords(value, unique: bool = True) -> list[WeightCoord]:
    """"L:R:C[@S]" (or several, comma-separated), a WeightCoord, or an iterable of either, as coordinates; with
    `unique`, the same weight twice is an error (parse_coords)."""
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, WeightCoord) else list(value)
    coords = [c if isinstance(c, WeightCoord) else parse_coord(c) for c in items]
    if unique:
        parse_coords([str(c) for c in coords])
    return coords


def parse_coords(texts: list[str]) -> list[WeightCoord]:
    """Parse several coordinates; the same weight twice is an error (its edits would not commute)."""
    coords = [parse_coord(t) for t in texts]
    seen = set()
    for c in coords:
        if c.key in seen:
            raise CoordinateError(f"weight {revalidated(c, scale=0.0)} is given more than once")
        seen.add(c.key)
    return coords


# --- patch rows ---
def row_of(c: WeightCoord) -> tuple:
    """The patch row that holds weight `c`: (layer, row), or (layer, row, expert)."""
    return (c.layer, c.row) if c.expert is None else (c.layer, c.row, c.expert)


def split_row(r) -> tuple[int, int, Expert]:
    """(layer, row, expert) of a patch row (expert None for a dense one)."""
    layer, row, *rest = r
    return int(layer), int(row), _expert(str(rest[0])) if rest and rest[0] is not None else None


def site(r) -> int | tuple[int, Expert]:
    """The down-projection a patch row lies in, as per-projection dicts key it: its layer for a dense MLP,
    (layer, expert) for an expert."""
    layer, _, expert = split_row(r)
    return layer if expert is None else (layer, expert)


def make_row(layer: int, row: int, expert: Expert = None) -> tuple:
    return (int(layer), int(row)) if expert is None else (int(layer), int(row), expert)


def row_text(r) -> str:
    layer, row, expert = split_row(r)
    return f"{layer}:{row}" if expert is None else f"{layer}:{expert}:{row}"


def parse_row(text: str) -> tuple:
    match = _ROW.match(text)
    if not match:
        raise CoordinateError(f"invalid patch row '{text}': expected LAYER:ROW, e.g. 11:507 (LAYER:EXPERT:ROW in a "
                              "mixture of experts, e.g. 3:17:507 or 3:shared:507)")
    layer, expert, row = match.groups()
    return make_row(int(layer), int(row), _expert(expert))


def rows_of(coords: list[WeightCoord]) -> list[tuple]:
    """The patch rows of `coords`, each once, sorted (dense rows, then experts by index, then shared)."""
    return sorted({row_of(c) for c in coords}, key=row_order)


def patch_rows(coords: list[WeightCoord], rows=None) -> list[tuple]:
    """The rows a repair patches: `rows` as given ("LAYER:ROW" / "LAYER:EXPERT:ROW" texts or row tuples), or, when
    None or empty, each ablated weight's row (`rows_of`: an expert's weight gives its expert's row). The CLI's
    --patch-row and the API's rows= both come here."""
    if not rows:
        return rows_of(coords)
    return [parse_row(r) if isinstance(r, str) else make_row(*split_row(r)) for r in rows]


def row_order(r) -> tuple:
    layer, row, expert = split_row(r)
    return (layer, -1 if expert is None else 1 << 30 if expert == SHARED else expert, row)
