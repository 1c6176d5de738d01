"""`analyze`, `sparsify`, `compensate`, `report` and `compare`: study a run directory that `repair` or `run` wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from superweight.cli.common import (
    Bar, RunBosOpt, model_to_load, JsonOpt, RunDirArg, app, check_json, err, errors, floats, out, progress, placed,
)
from superweight.errors import UsageError
from superweight.report import terminal


@app.command()
@errors
@placed
def analyze(
    run_dir: RunDirArg,
    tokens: Annotated[int, typer.Option(help="eval-split tokens to analyse on")] = 2048,
    draws: Annotated[int, typer.Option(help="random-k control draws per k")] = 3,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model spec (default: the run's own)")] = None,
    bos: RunBosOpt = None,
    where: dict | None = None,  # the placement options (common.placed)
):
    """Patch geometry, top-k sparsity with a random-k control, token and neuron views, scale sweep."""
    import superweight.api as sw

    cfg = sw.AnalyzeConfig(tokens=tokens, draws=draws)
    later = model_to_load(model, where, bos)  # None: the run's own
    with progress() as bar:
        record = sw.analyze(later, run_dir, cfg, Bar(bar))
    terminal.print_analysis(out, record)
    _updated(run_dir)


@app.command()
@errors
@placed
def sparsify(
    run_dir: RunDirArg,
    l1: Annotated[str, typer.Option(help="comma-separated L1 (proximal) strengths; empty to skip")] = "0.6,0.8,1",
    l0: Annotated[str, typer.Option(help="comma-separated hard-concrete L0 strengths; empty to skip")] = "1,10,30",
    steps: Annotated[Optional[int], typer.Option(help="steps per sparse patch (default: half the run's)")] = None,
    tokens: Annotated[int, typer.Option(help="eval-split tokens to score each patch on")] = 2048,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model spec (default: the run's own)")] = None,
    bos: RunBosOpt = None,
    where: dict | None = None,  # the placement options (common.placed)
):
    """Train sparse patches (L1, hard-concrete L0) over a sweep of strengths; the recovery-vs-size frontier."""
    import superweight.api as sw

    strengths = {"l1": floats("--l1", l1), "l0": floats("--l0", l0)}
    strengths = {k: v for k, v in strengths.items() if v}
    if not strengths:
        raise UsageError("no strengths given: set --l1 and/or --l0")
    cfg = sw.SparsifyConfig(strengths=strengths, steps=steps, tokens=tokens)
    later = model_to_load(model, where, bos)  # None: the run's own
    with progress() as bar:
        record = sw.sparsify(later, run_dir, cfg, Bar(bar))
    terminal.print_sparse(out, record.sparse_training)
    _updated(run_dir)


@app.command()
@errors
@placed
def compensate(
    run_dir: RunDirArg,
    max_k: Annotated[int, typer.Option(help="the budget: exclude at most this many writing neurons")] = 64,
    stop_below: Annotated[float, typer.Option(help="stop once a point's held-out KL recovery falls below this")] = 0.1,
    tokens: Annotated[int, typer.Option(help="eval-split tokens to score each point on")] = 1024,
    steps: Annotated[Optional[int], typer.Option(help="cap on each point's steps (lbfgs: loss evaluations); "
                                                      "default: the run's recipe")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model spec (default: the run's own)")] = None,
    bos: RunBosOpt = None,
    where: dict | None = None,  # the placement options (common.placed)
):
    """The compensation frontier: repair again with the top 1, 2, 4, ... writing neurons held at 0 (greedy), until
    recovery falls below --stop-below or --max-k neurons are out; updates results.json and the report."""
    import superweight.api as sw

    cfg = sw.CompensateConfig(max_k=max_k, stop_below=stop_below, tokens=tokens, steps=steps)
    later = model_to_load(model, where, bos)  # None: the run's own
    with progress() as bar:
        record = sw.compensate(later, run_dir, cfg, Bar(bar))
    terminal.print_compensation(out, record.compensation)
    _updated(run_dir, f"; report: {Path(run_dir) / 'report.html'}")


@app.command()
@errors
def report(run_dir: RunDirArg):
    """Write report.html (self-contained) and report.md (with plots/*.png) for a run directory."""
    import superweight.api as sw

    md, page = sw.write_report(run_dir)  # never from a run another process is writing
    out.print(f"Wrote {md}")
    out.print(f"Report: {page}")


@app.command()
@errors
def compare(run_dirs: Annotated[list[str], typer.Argument(help="run directories")], json_: JsonOpt = None):
    """One table across runs (seeds, recipes, models): PPLs, recovery, patch geometry, sparsity."""
    import superweight.api as sw

    check_json(json_)
    rows = sw.compare(*run_dirs)
    terminal.print_compare(out, rows)
    if json_:
        sw.write_json(json_, [r.model_dump() for r in rows])
        err.print(f"Wrote {json_}")


def _updated(run_dir: str, more: str = "") -> None:
    out.print(f"Updated {Path(run_dir) / 'results.json'}{more}")
