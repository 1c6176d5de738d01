"""The census table (stages/census.py's rows) as CSV, Markdown and a rich table for the terminal.

    print_census(Console(), rows, Path("runs/census"))
    Path("census.md").write_text(to_markdown(rows))

One row per model. `coordinates` are the super weights found (most damaging first) or, when there is none, the
most damaging verified weight; KL, PPL ratio and depth follow them, one value per coordinate. `known` compares
the super weights found with known.py's published coordinates.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from superweight.display import num
from superweight.measure.grade import SUPER_KL, SUPER_PPL_RATIO

CSV_COLUMNS = ["model", "status", "coordinates", "kl", "ppl_ratio", "grade", "layer", "n_layers", "depth", "known",
               "published", "seconds", "finished", "error"]
COLUMNS = ["model", "coordinates", "KL", "PPL ×", "grade", "depth", "known"]
LEGEND = (
    "coordinates: LAYER:ROW:COL of the down-projection weights graded super weight (most damaging first), else the "
    "most damaging weight detect verified. KL: mean KL(base || that weight zeroed), nats/token, on the calibration "
    "text; PPL ×: perplexity with it zeroed / base. grade: super (zeroing it collapses the model: PPL × >= "
    f"{SUPER_PPL_RATIO:g} or KL >= {SUPER_KL:g}, and far above its controls), sensitive (above its controls, "
    "no collapse) or none (measure/grade.py). depth: layer / number of layers. known: match (every coordinate "
    "known.py publishes for the model was found as a super weight), differs, or not listed."
)


def _join(values) -> str:
    return ", ".join(values) or "-"


def cells(row) -> list[str]:
    """A row's cells under COLUMNS (the Markdown and terminal tables)."""
    if row.status == "error":
        return [row.model, f"error: {row.error}", "-", "-", "-", "-", "-"]
    if row.status in {"busy", "pending"}:
        return [row.model, f"({row.error})", "-", "-", "-", "-", "-"]
    depth = [f"{layer}/{row.n_layers}" if row.n_layers else str(layer) for layer in row.layers]
    known = row.known if row.known != "differs" else f"differs (published {', '.join(row.published)})"
    return [row.model, _join(row.coordinates), _join(num(k, 3) for k in row.kl),
            _join(num(p, 2) for p in row.ppl_ratio), row.grade, _join(depth), known]


def to_markdown(rows) -> str:
    def esc(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + LEGEND + "\n"


def tables(rows) -> tuple[str, str]:
    """The census table as (CSV, Markdown) texts: what stages/census.py writes as census.csv and census.md."""
    return to_csv(rows), to_markdown(rows)


def to_csv(rows) -> str:
    """One line per model; a row with several coordinates has space-separated values in the per-weight columns
    (coordinates, kl, ppl_ratio, layer, depth), in the same order."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in rows:
        depth = [f"{layer / r.n_layers:.3f}" for layer in r.layers] if r.n_layers else []
        writer.writerow([
            r.model, r.status, " ".join(r.coordinates), " ".join(_raw(k) for k in r.kl),
            " ".join(_raw(p) for p in r.ppl_ratio), r.grade, " ".join(map(str, r.layers)),
            "" if r.n_layers is None else r.n_layers, " ".join(depth), r.known, " ".join(r.published),
            "" if r.seconds is None else r.seconds, r.finished or "", r.error if r.status == "error" else "",
        ])
    return buf.getvalue()


def _raw(x: float | None) -> str:
    return "" if x is None else f"{x:.6g}"


def print_census(out: Console, rows, where: Path | None = None) -> None:
    title = "Super-weight census" + (f" ({where})" if where else "")
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for c in COLUMNS:
        # A long model path folds (the widest column gives way first), so a status note beside it stays whole.
        table.add_column(c, justify="right" if c in {"KL", "PPL ×", "depth"} else "left",
                         no_wrap=c not in {"model", "coordinates", "known"},
                         overflow="fold" if c == "model" else "ellipsis")
    for r in rows:
        values = [Text(v) for v in cells(r)]  # Text: a spec or an error with [brackets] is not markup
        if r.grade == "super":
            values[4].stylize("bold")
        if r.status == "error":
            values[1].stylize("red")
        table.add_row(*values)
    out.print(table)
    out.print(LEGEND, markup=False, highlight=False)
