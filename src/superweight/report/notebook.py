"""Results in a notebook: the HTML and the one-line repr behind each result's `_repr_html_` and `__repr__`
(superweight/display.py; superweight/api.py registers them). Nothing is formatted here a third time: a run shows
the report's own sections and plots, a quantization the report's section and figure, and the other results the
terminal's tables (terminal.py), collected as report blocks; render.py writes the HTML for both.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from rich.table import Table
from rich.text import Text

from superweight.schema.record import RunRecord
from superweight.report import report_blocks, terminal
from superweight.report.format import num, pct, ppl, rec
from superweight.report.compensation import compensation_blocks
from superweight.report.plots import compensation_figure, save_quantize_plot
from superweight.report.render import render_body
from superweight.report.sections import quantize_section


class Blocks:
    """Stands in for the rich Console that terminal.py prints on: keeps each table and line as a report block
    (sections.py), so render.py can draw them as HTML tables and paragraphs."""

    def __init__(self):
        self.blocks: list = []

    def print(self, obj="", *_, markup: bool = True, **__) -> None:
        if isinstance(obj, Table):
            if obj.title:
                self.blocks.append(("h", 4, _plain(obj.title)))
            self.blocks.append(("table", [_plain(c.header) for c in obj.columns],
                                [list(row) for row in zip(*([_plain(x) for x in c.cells] for c in obj.columns))]))
        else:
            self.blocks.append(("p", _plain(obj) if markup or isinstance(obj, Text) else str(obj)))


def _plain(cell) -> str:
    """A cell or line as the terminal shows it, without its styles (rich markup is parsed, as the console does)."""
    return cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain


def _html(blocks: list, plots: dict[str, Path] | None = None) -> str:
    return f'<div class="superweight">\n{render_body(blocks, plots or {})}\n</div>'


def terminal_html(print_fn, *args) -> str:
    """What `print_fn(console, *args)` (a terminal.py printer) prints, as HTML."""
    out = Blocks()
    print_fn(out, *args)
    return _html(out.blocks)


def run_html(r: RunRecord) -> str:
    """The run's report (the sections of report.html, with its plots), from the record and its run directory."""
    with tempfile.TemporaryDirectory() as tmp:
        blocks, plots = report_blocks(r, r._run_dir, Path(tmp))
        return _html(blocks, plots)


def quantize_html(q) -> str:
    """The report's quantization section: the table, PPL against block size, and what changed the super weight."""
    with tempfile.TemporaryDirectory() as tmp:
        path = save_quantize_plot(q, Path(tmp) / "quantize.png")
        plots = {"quantize": path} if path else {}
        return _html(quantize_section(q, plots), plots)


def compensation_html(c) -> str:
    """The report's compensation section: the frontier's table, its figure and the neurons each point writes
    through."""
    with tempfile.TemporaryDirectory() as tmp:
        fig = compensation_figure(c)
        plots = {}
        if fig is not None:
            plots["compensation"] = Path(tmp) / "compensation.png"
            fig.savefig(plots["compensation"], format="png", dpi=110)
        return _html(compensation_blocks(c, plots), plots)


def detect_html(r) -> str:
    return terminal_html(terminal.print_detect, r)


def eval_html(r) -> str:
    return terminal_html(terminal.print_eval, r)


def compare_html(rows) -> str:
    return terminal_html(terminal.print_compare, rows)


# ---------------------------------------------------------------- one line each
def detect_repr(r) -> str:
    c = r.candidates
    top = f"; first {c[0].coord}: {c[0].grade or 'not verified'}, KL {num(c[0].kl)}" if c else ""
    return f"DetectResult({len(c)} candidates, {sum(x.confirmed for x in c)} confirmed{top})"


def eval_repr(r) -> str:
    p = r.protocol
    line = (f"EvalResult({p.model.split(' (')[0]}, {p.corpus}/{p.split}, {p.n_tokens:,} tokens: "
            f"base PPL {ppl(r.base.ppl)}")
    for name in ("ablated", "patched"):
        if (m := getattr(r, name)) is not None:
            line += f"; {name} PPL {ppl(m.ppl)}, KL {num(m.kl)}"
    return line + ")"


def run_repr(r: RunRecord) -> str:
    where = f", {r._run_dir}" if r._run_dir else ""
    return (f"RunRecord({r.weight} in {r.protocol.model.split(' (')[0]}: PPL {ppl(r.base.ppl)} base, "
            f"{ppl(r.broken.ppl)} broken, {ppl(r.patched.ppl)} patched; NLL-gap recovery {rec(r.recovery.nll_gap)}"
            f"{f', {r.verdict}' if r.verdict else ''}{where})")


def quantize_repr(q) -> str:
    return (f"QuantResult({len(q.rows) + len(q.patched_rows) + len(q.activations)} conditions, {q.base.n_tokens:,} "
            f"tokens; fp PPL {ppl(q.base.ppl)}; super weights {', '.join(q.keep) or 'none'} ({q.keep_source}))")


def compensation_repr(c) -> str:
    last = c.points[-1] if c.points else None
    end = f"; at {last.k} excluded NLL-gap recovery {pct(last.nll_gap)}" if last else ""
    return f"Compensation({len(c.points)} points on row {c.row}{end}; stopped: {c.stopped})"


def compare_repr(rows) -> str:
    return f"Comparison({len(rows)} runs: {', '.join(r.run for r in rows)})"
