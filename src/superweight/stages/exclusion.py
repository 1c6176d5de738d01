"""Which columns a repair holds at 0 (`repair --exclude SPEC`, repeatable):

    deleted   the ablated weights' columns (in the rows they were ablated from)
    top:K     the K neurons that write most in the unconstrained repair (RMS over the eval tokens of x_j d_j, as
              the neuron view ranks them: the same neurons however the MLP is scaled)
    3,17,40   these columns

    specs = parse_excludes(["deleted", "top:4"])
    columns = resolve(specs, coords, rows, d_ffs, ranking)   # per row, sorted columns; ranking: for top:K

Excluding is a mask on the patch's space (engine/patch.SpacePatch.exclude): the entries stay
exactly 0, and the mask keeps every symmetry that the column space follows.
"""

from __future__ import annotations

import torch

from superweight.core.coords import make_row, row_of, split_row
from superweight.errors import UsageError
from superweight.measure.geometry import neuron_writes


def parse_excludes(specs) -> list[str]:
    """The specs checked and normalised ("deleted", "top:4", "3,17,40"); a bad one is one UsageError line."""
    out = []
    for spec in specs or []:
        spec = str(spec).strip().lower()
        if spec == "deleted":
            out.append(spec)
        elif spec.startswith("top:"):
            k = spec[4:]
            if not k.isdigit() or int(k) < 1:
                raise UsageError(f"--exclude {spec}: top:K needs a whole number K >= 1")
            out.append(f"top:{int(k)}")
        else:
            try:
                cols = sorted({int(c) for c in spec.split(",") if c.strip()})
            except ValueError:
                raise UsageError(f"--exclude {spec}: use deleted, top:K or column numbers (3,17,40)") from None
            if not cols or cols[0] < 0:
                raise UsageError(f"--exclude {spec}: column numbers must be 0 or more")
            out.append(",".join(map(str, cols)))
    return list(dict.fromkeys(out))


def ranking_needed(specs: list[str]) -> int:
    """The largest K of the top:K specs (0: none needs the unconstrained repair's ranking)."""
    return max((int(s[4:]) for s in specs if s.startswith("top:")), default=0)


def top_writers(x: torch.Tensor, d: torch.Tensor, skip=()) -> list[int]:
    """Neurons by their write (RMS over tokens of x_j d_j), largest first, without `skip` and the ones that
    write nothing."""
    w = neuron_writes(x.float(), d.detach().float().cpu())
    skip = set(skip)
    return [int(j) for j in w.argsort(descending=True).tolist() if j not in skip and w[j] > 0]


def deleted_columns(coords, row) -> list[int]:
    """The columns of the ablated weights in patch row `row` (the `deleted` spec), sorted."""
    return sorted({c.col for c in coords if row_of(c) == make_row(*split_row(row))})


def resolve(specs: list[str], coords, rows, d_ffs: list[int], ranking: list[list[int]] | None = None) -> list[list[int]]:
    """Per patch row, the sorted columns the specs hold at 0. `ranking`: per row, neurons by write in the
    unconstrained repair (top_writers), needed by top:K. A column past a row's d_ff is a UsageError."""
    out = []
    for i, (r, d_ff) in enumerate(zip(rows, d_ffs)):
        cols: set[int] = set()
        for spec in specs:
            if spec == "deleted":
                cols |= set(deleted_columns(coords, r))
            elif spec.startswith("top:"):
                if ranking is None:
                    raise ValueError("top:K needs the unconstrained repair's ranking")
                cols |= set(ranking[i][: int(spec[4:])])
            else:
                cols |= {int(c) for c in spec.split(",")}
        bad = sorted(c for c in cols if c >= d_ff)
        if bad:
            raise UsageError(f"--exclude: column {bad[0]} is past the patch row's {d_ff} columns")
        out.append(sorted(cols))
    return out
