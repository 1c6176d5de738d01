"""Restoration or compensation in the report, the terminal and a notebook: the headline's regime sentences,
the compensation frontier's section (a table, the neurons each point writes through, a figure) and its terminal
table. The numbers come from the record (schema/compensation.py); stages/compensate.py makes them."""

from __future__ import annotations

from rich import box
from rich.table import Table
from rich.text import Text

from superweight.schema.record import RunRecord
from superweight.measure.geometry import regime_of
from superweight.report.format import num, pct, tok, vis

COLUMNS = ["excluded", "NLL-gap rec.", "KL rec.", "held-out KL rec.", "‖d‖", "cos(d, row)", "d[col]/deleted",
           "write/removed", "neurons carrying (PR)", "evals", "s"]


def _cells(p) -> list[str]:
    return [p.label, pct(p.nll_gap), pct(p.kl_recovery), pct(p.check_recovery), num(p.norm),
            f"{p.cos_original_row:.3f}", num(p.value_ratio), num(p.write_vs_removed), num(p.participation),
            num(p.evals), f"{p.seconds:.0f}"]


def _writers(p, n: int = 3) -> str:
    return ", ".join(f"{w.neuron} ({pct(w.share)})" for w in p.neurons[:n]) or "none"


def regime_sentences(r: RunRecord) -> list[str]:
    """Which regime the repair is in and what each recovers: restoration (the patch gives back at least half of
    the deleted value at its column) or compensation (it repairs without the deleted weight)."""
    p = r.patch
    word = r.regime.regime if r.regime else regime_of(p.value_ratio)
    rec = f"recovers {pct(r.recovery.nll_gap)} of the NLL gap (KL {pct(r.recovery.kl)})"
    held = ""
    if r.exclusion:
        cols = "; ".join(f"{k}: {', '.join(map(str, v)) or 'none'}" for k, v in r.exclusion.columns.items())
        held = f" with columns held at 0 (--exclude {' '.join(r.exclusion.specs)}: {cols})"
    if word == "restoration":
        out = [f"Regime: restoration. The patch{held} writes the deleted weight back: d[{p.col}] = "
               f"{num(p.value_at_col)} is {pct(p.value_ratio)} of the deleted {num(p.deleted_value)}; it {rec}."]
    else:
        at = (f"d[{p.col}] is {pct(p.value_ratio)} of the deleted value" if p.col is not None else
              "it patches another row than the deleted weight's")
        out = [f"Regime: compensation. The patch{held} repairs without the deleted weight ({at}): it {rec}."]
    w = r.regime.without_deleted if r.regime else None
    if w is not None:
        out.append(f"Without the deleted weight (column {', '.join(map(str, w.excluded))} held at 0) a repair "
                   f"recovers {pct(w.nll_gap)} of the NLL gap (KL {pct(w.kl_recovery)}; held-out check "
                   f"{pct(w.check_recovery)}), with ‖d‖ {num(w.norm)}, cos(d, row) {w.cos_original_row:.3f}, "
                   f"its write spread over neurons with a participation ratio of {num(w.participation)}, most through "
                   f"{_writers(w)}.")
    return out


def _note(c) -> str:
    return (f"Each point repairs again with the run's recipe ({c.recipe}) and more of the writing neurons of row "
            f"{c.row} held at exactly 0. Ranking: {c.ranking} (each point also excludes the top writers of the "
            "previous point's patch, so the frontier knocks out one compensation path after another). Scored on "
            f"{c.tokens:,} eval tokens; held-out KL rec.: 1 - KL / KL broken on train-split rows the repair never "
            "saw. Neurons carrying: the participation ratio (Σ w²)² / Σ w⁴ of the per-neuron write w_j = RMS of "
            f"x_j·d_j. Stopped: {c.stopped}; {c.seconds:.0f} s in all.")


def compensation_blocks(c, plots: dict) -> list:
    """The frontier as report blocks (sections.py): note, figure, table, and the neurons each point writes
    through with the contexts where the top one fires most."""
    rows = [[cell if i else f"{p.k} ({p.label})" for i, cell in enumerate(_cells(p))] for p in c.points]
    out = [("h", 2, "Compensation frontier"), ("p", _note(c))]
    out += [("img", "compensation", "recovery against the number of writing neurons excluded")] \
        if "compensation" in plots else []
    out.append(("table", COLUMNS, rows))
    writes = []
    for p in c.points:
        for w in p.neurons:
            ctx = w.contexts[0] if w.contexts else None
            writes.append([p.label, str(w.neuron), pct(w.share), num(w.value),
                           [(vis(ctx.text), False), (vis(ctx.token), True)] if ctx else "-"])
    if writes:
        out += [("p", "The neurons each point writes through (share of Σ_j RMS(x_j·d_j)²), with the context where "
                      "each fires most:"),
                ("table", ["point", "neuron", "share of write", "d[neuron]", "top context"], writes)]
    return out


def compensation_section(r: RunRecord, plots) -> list:
    return compensation_blocks(r.compensation, plots) if r.compensation else []


def print_compensation(out, c) -> None:
    """The frontier on the terminal: one row per point, then the neurons each writes through."""
    table = Table(title=f"Compensation frontier of row {c.row} ({c.recipe}; greedy; {c.tokens:,} tokens)",
                  box=box.SIMPLE_HEAD)
    for i, col in enumerate(COLUMNS):
        table.add_column(col.replace("[", "\\["), justify="left" if i == 0 else "right")
    for p in c.points:
        table.add_row(*[Text(x) for x in _cells(p)])
    out.print(table)
    for p in c.points:
        top = p.neurons[0].contexts[0] if p.neurons and p.neurons[0].contexts else None
        where = f"; {p.neurons[0].neuron} fires most at {tok(top.token)} after {vis(top.text)!r}" if top else ""
        out.print(Text(f"{p.label}: writes through {_writers(p, 5)}{where}"))
    out.print(Text(f"Stopped: {c.stopped}."))
