"""Turn a run directory into plots, a markdown report and one self-contained HTML page.

    md, page = write_report("runs/xb")         # runs/xb/report.md, runs/xb/report.html, runs/xb/plots/*.png
    rows = compare_rows(["runs/xb", "runs/xc"])  # one flat dict per run, for a comparison table
    print(md.read_text())

The document is built once as a list of blocks (heading, paragraph, table, image) and rendered twice, so the
two files cannot drift. Sections only hold plain text; the renderers escape every string, so a token such as
'</script>' is shown, never obeyed. Each section appears only when its keys exist (see docs/results.md).
"""

from __future__ import annotations

from pathlib import Path

from superweight.io.rundir import write_atomic
from superweight.report.compare import compare_rows
from superweight.report.load import load_run, smallest_k, train_log
from superweight.report.plots import draw_plots
from superweight.report.render import render_html, render_md
from superweight.report.sections import SECTIONS

__all__ = ["compare_rows", "smallest_k", "write_report"]


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Write RUN_DIR/plots/*.png, RUN_DIR/report.md and a self-contained RUN_DIR/report.html.

    Returns (report.md, report.html). Raises SuperweightError when RUN_DIR has no readable results.json."""
    run, r = load_run(run_dir)
    plots = draw_plots(r, train_log(run / "train_log.jsonl"), run / "plots")
    blocks = [b for section in SECTIONS for b in section(r, plots)]
    md, page = render_md(blocks), render_html(blocks, plots)
    return (write_atomic(run / "report.md", lambda tmp: tmp.write_text(md, encoding="utf-8")),
            write_atomic(run / "report.html", lambda tmp: tmp.write_text(page, encoding="utf-8")))
