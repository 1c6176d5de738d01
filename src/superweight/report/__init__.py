"""Turn a run directory into plots, a markdown report and one self-contained HTML page.

    md, page = write_report("runs/xb")         # runs/xb/report.md, runs/xb/report.html, runs/xb/plots/*.png
    rows = compare_rows(["runs/xb", "runs/xc"])  # one CompareRow per run, for a comparison table
    print(md.read_text())

The report reads the run record (io/rundir.RunDir.record), never a stage's code. The document is built once as a
list of blocks (sections.py: heading, paragraph, table, image) and rendered twice (render.py), so the two
files cannot drift. Sections only hold plain text; the renderers escape every string, so a token such as
'</script>' is shown, never obeyed. Each section appears only when its stage has run (see docs/results.md).
terminal.py prints each command's result on the console; notebook.py draws a result in a notebook from both.
"""

from __future__ import annotations

from pathlib import Path

from superweight.io.checkpoint import read_train_log
from superweight.io.files import write_atomic
from superweight.schema.quantize import read_quantize
from superweight.schema.record import RunRecord, smallest_k
from superweight.io.rundir import PLOTS, REPORT_HTML, REPORT_MD, RunDir
from superweight.report.compare import CompareRow, Comparison, compare_rows
from superweight.report.plots import draw_plots, save_quantize_plot
from superweight.report.render import render_html, render_md
from superweight.report.sections import SECTIONS, quantize_section

__all__ = ["CompareRow", "Comparison", "compare_rows", "report_blocks", "smallest_k", "write_report"]


def write_report(run_dir: str | Path, record: RunRecord | None = None) -> tuple[Path, Path]:
    """Write RUN_DIR/plots/*.png, RUN_DIR/report.md and a self-contained RUN_DIR/report.html, of `record` (None:
    the one in RUN_DIR/results.json; the pipeline passes the one it holds before writing it).

    Returns (report.md, report.html). Raises SuperweightError when RUN_DIR has no readable results.json."""
    run = Path(run_dir)
    blocks, plots = report_blocks(record if record is not None else RunDir(run).record(), run, run / PLOTS)
    md, page = render_md(blocks), render_html(blocks, plots)
    return (write_atomic(run / REPORT_MD, lambda tmp: tmp.write_text(md, encoding="utf-8")),
            write_atomic(run / REPORT_HTML, lambda tmp: tmp.write_text(page, encoding="utf-8")))


def report_blocks(record: RunRecord, run_dir: Path | None, plots_dir: Path) -> tuple[list, dict[str, Path]]:
    """The report of `record` as blocks (sections.py), with its plots drawn into `plots_dir`; the run directory
    (None: unknown) adds the loss curve (train log) and the quantization section (`run --quantize`)."""
    plots = draw_plots(record, read_train_log(run_dir) if run_dir else [], plots_dir)
    quantized = read_quantize(run_dir) if run_dir else None
    if quantized is not None and (path := save_quantize_plot(quantized, plots_dir / "quantize.png")):
        plots["quantize"] = path
    blocks = [b for section in SECTIONS for b in section(record, plots)]
    if quantized is not None:  # before the closing protocol section
        at = next((i for i, b in enumerate(blocks) if b[:3] == ("h", 2, "Protocol and versions")), len(blocks))
        blocks[at:at] = quantize_section(quantized, plots)
    return blocks, plots
