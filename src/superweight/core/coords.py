"""Weight coordinates written `LAYER:ROW:COL[@SCALE]`, e.g. `11:507:1229` or `11:507:1229@0.5`.

ROW is the residual channel (d_model side), COL the intermediate neuron (d_ff side); see core/arch.py.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict

from superweight.errors import CoordinateError

_PATTERN = re.compile(r"^\s*(\d+):(\d+):(\d+)\s*(?:@\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?\s*$")


class WeightCoord(BaseModel):
    """One scalar of one down-projection, and the factor an ablation multiplies it by (0 = zero it)."""

    model_config = ConfigDict(frozen=True)

    layer: int
    row: int
    col: int
    scale: float = 0.0

    def __str__(self) -> str:
        base = f"{self.layer}:{self.row}:{self.col}"
        return base if self.scale == 0.0 else f"{base}@{self.scale:g}"

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.layer, self.row, self.col)


def parse_coord(text: str) -> WeightCoord:
    match = _PATTERN.match(text)
    if not match:
        raise CoordinateError(
            f"invalid weight coordinate '{text}': expected LAYER:ROW:COL[@SCALE], "
            "e.g. 11:507:1229 or 11:507:1229@0.5"
        )
    layer, row, col, scale = match.groups()
    return WeightCoord(layer=int(layer), row=int(row), col=int(col), scale=float(scale or 0.0))


def parse_coords(texts: list[str]) -> list[WeightCoord]:
    """Parse several coordinates; the same weight twice is an error (its edits would not commute)."""
    coords = [parse_coord(t) for t in texts]
    seen = set()
    for c in coords:
        if c.key in seen:
            raise CoordinateError(f"weight {c.layer}:{c.row}:{c.col} is given more than once")
        seen.add(c.key)
    return coords
