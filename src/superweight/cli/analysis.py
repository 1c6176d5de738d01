"""`analyze`, `sparsify`, `compensate`, `report` and `compare`: study a run directory that `repair` or `run` wrote."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from superweight.cli.common import (
    Bar, DeviceMapOpt, MaxMemoryOpt, OffloadOpt, RunBosOpt, run_bos, placement,
    DeviceOpt, DtypeOpt, JsonOpt, RunDirArg, app, check_run_dir, err, errors, floats, load_model, out, progress,
)
from superweight.errors import UsageError
from superweight.io.lock import hold_run_dir
from superweight.report import terminal


@app.command()
@errors
def analyze(
    run_dir: RunDirArg,
    tokens: Annotated[int, typer.Option(help="eval-split tokens to analyse on")] = 2048,
    draws: Annotated[int, typer.Option(help="random-k control draws per k")] = 3,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model spec (default: the run's own)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    bos: RunBosOpt = None,
):
    """Patch geometry, top-k sparsity with a random-k control, token and neuron views, scale sweep."""
    from superweight.stages.analyze import AnalyzeConfig, run_analyze

    path, spec = check_run_dir(run_dir)
    cfg = AnalyzeConfig(tokens=tokens, draws=draws)
    where = placement(device, dtype, device_map, max_memory, offload_folder)
    bos = run_bos(path, bos)  # the run's own, unless given
    with hold_run_dir(path, "analyze"):  # one writer, or refused here, before the model loads
        loaded = load_model(model or spec, where, bos)
        with progress() as bar:
            record = run_analyze(loaded, path, cfg, Bar(bar))
    terminal.print_analysis(out, record)
    out.print(f"Updated {path / 'results.json'}")


@app.command()
@errors
def sparsify(
    run_dir: RunDirArg,
    l1: Annotated[str, typer.Option(help="comma-separated L1 (proximal) strengths; empty to skip")] = "0.6,0.8,1",
    l0: Annotated[str, typer.Option(help="comma-separated hard-concrete L0 strengths; empty to skip")] = "1,10,30",
    steps: Annotated[Optional[int], typer.Option(help="steps per sparse patch (default: half the run's)")] = None,
    tokens: Annotated[int, typer.Option(help="eval-split tokens to score each patch on")] = 2048,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model spec (default: the run's own)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    bos: RunBosOpt = None,
):
    """Train sparse patches (L1, hard-concrete L0) over a sweep of strengths; the recovery-vs-size frontier."""
    from superweight.stages.sparsify import SparsifyConfig, run_sparsify

    strengths = {"l1": floats("--l1", l1), "l0": floats("--l0", l0)}
    strengths = {k: v for k, v in strengths.items() if v}
    if not strengths:
        raise UsageError("no strengths given: set --l1 and/or --l0")
    cfg = SparsifyConfig(strengths=strengths, steps=steps, tokens=tokens)
    path, spec = check_run_dir(run_dir)
    where = placement(device, dtype, device_map, max_memory, offload_folder)
    bos = run_bos(path, bos)  # the run's own, unless given
    with hold_run_dir(path, "sparsify"):  # one writer, or refused here, before the model loads
        loaded = load_model(model or spec, where, bos)
        with progress() as bar:
            record = run_sparsify(loaded, path, cfg, Bar(bar))
    terminal.print_sparse(out, record.sparse_training)
    out.print(f"Updated {path / 'results.json'}")


@app.command()
@errors
def compensate(
    run_dir: RunDirArg,
    max_k: Annotated[int, typer.Option(help="the budget: exclude at most this many writing neurons")] = 64,
    stop_below: Annotated[float, typer.Option(help="stop once a point's held-out KL recovery falls below this")] = 0.1,
    tokens: Annotated[int, typer.Option(help="eval-split tokens to score each point on")] = 1024,
    steps: Annotated[Optional[int], typer.Option(help="cap on each point's steps (lbfgs: loss evaluations); "
                                                      "default: the run's recipe")] = None,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model spec (default: the run's own)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    bos: RunBosOpt = None,
):
    """The compensation frontier: repair again with the top 1, 2, 4, ... writing neurons held at 0 (greedy), until
    recovery falls below --stop-below or --max-k neurons are out; updates results.json and the report."""
    from superweight.report import write_report
    from superweight.stages.compensate import CompensateConfig, run_compensate

    cfg = CompensateConfig(max_k=max_k, stop_below=stop_below, tokens=tokens, steps=steps)
    path, spec = check_run_dir(run_dir)
    where = placement(device, dtype, device_map, max_memory, offload_folder)
    bos = run_bos(path, bos)  # the run's own, unless given
    with hold_run_dir(path, "compensate"):  # one writer, or refused here, before the model loads
        loaded = load_model(model or spec, where, bos)
        with progress() as bar:
            record = run_compensate(loaded, path, cfg, Bar(bar))
        _md, page = write_report(path, record)
    terminal.print_compensation(out, record.compensation)
    out.print(f"Updated {path / 'results.json'}; report: {page}")


@app.command()
@errors
def report(run_dir: RunDirArg):
    """Write report.html (self-contained) and report.md (with plots/*.png) for a run directory."""
    from pathlib import Path

    from superweight.io.rundir import read_record
    from superweight.report import write_report

    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"no such run directory: {path}")
    read_record(path)  # a directory that holds no run is refused before it is locked
    with hold_run_dir(path, "report"):  # one writer: a report is never drawn from a run that is being written
        md, page = write_report(path)
    out.print(f"Wrote {md}")
    out.print(f"Report: {page}")


@app.command()
@errors
def compare(run_dirs: Annotated[list[str], typer.Argument(help="run directories")], json_: JsonOpt = None):
    """One table across runs (seeds, recipes, models): PPLs, recovery, patch geometry, sparsity."""
    from superweight.io.files import check_writable, write_json
    from superweight.report import compare_rows

    if json_:
        check_writable(json_)
    rows = compare_rows(run_dirs)
    terminal.print_compare(out, rows)
    if json_:
        write_json(json_, [r.model_dump() for r in rows])
        err.print(f"Wrote {json_}")
