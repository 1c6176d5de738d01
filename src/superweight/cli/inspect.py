"""`info`, `eval`, `detect` and `sweep`: look at a model, and at what one weight does."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from superweight.cli.common import (
    DEFAULT_CORPUS, DEFAULT_MODEL, Bar, BosOpt, check_json, model_to_load, CorpusOpt, JsonOpt, ModelOpt, SplitOpt,
    app, err, errors, out, progress, write_result, IncludePathOpt, TaskLimitOpt, TasksOpt, task_spec, placed,
)
from superweight.errors import UsageError
from superweight.report import terminal
from superweight.settings import revalidated


@app.command()
@errors
@placed
def info(model: ModelOpt = DEFAULT_MODEL, json_: JsonOpt = None, bos: BosOpt = "auto", where: dict | None = None):
    """Architecture, sizes and down-projection names of a model."""
    import superweight.api as sw

    later = model_to_load(model, where, bos)
    check_json(json_)
    info_ = sw.info(later)
    terminal.print_info(out, model, info_.source, info_.arch, info_.published)
    if json_:
        sw.write_json(json_, info_.as_json())


@app.command("eval")
@errors
@placed
def eval_(
    model: ModelOpt = DEFAULT_MODEL,
    corpus: CorpusOpt = DEFAULT_CORPUS,
    split: SplitOpt = "eval",
    ablate: Annotated[Optional[list[str]], typer.Option(
        help="LAYER:ROW:COL[@SCALE] (repeatable); default: the model's published super weights")] = None,
    max_tokens: Annotated[int, typer.Option(help="tokens of the corpus to evaluate")] = 4096,
    max_length: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    stride: Annotated[Optional[int], typer.Option(help="window stride (default: max-length, no overlap)")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(help="generation prompt (repeatable); default: ten built-in")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens per generation")] = 20,
    patch: Annotated[Optional[str], typer.Option(
        help="run directory of a repair: also the patched model (and its ablation instead of --ablate)")] = None,
    tasks: TasksOpt = None,
    include_path: IncludePathOpt = None,
    task_limit: TaskLimitOpt = None,
    bos: BosOpt = "auto",
    json_: JsonOpt = None,
    where: dict | None = None,  # the placement options (common.placed)
):
    """Base vs ablated (vs patched): NLL, PPL, KL, top-1 agreement, super activation, generations side by side,
    and zero-shot task accuracies with --tasks."""
    import superweight.api as sw
    from superweight.core.coords import parse_coords

    # Everything that can be checked without the model is checked before the (slow) load.
    if patch and ablate:
        raise UsageError("--patch brings its own ablation; give --ablate or --patch, not both")
    coords = parse_coords(ablate) if ablate else None
    cfg = sw.EvalConfig(corpus=corpus, split=split, max_tokens=max_tokens, max_length=max_length, stride=stride,
                        prompts=prompt, max_new_tokens=max_new_tokens)
    later = model_to_load(model, where, bos)
    check_json(json_)
    cfg = revalidated(cfg, tasks=task_spec(tasks, include_path, task_limit))
    with progress() as bar:
        result = sw.evaluate(later, ablate=coords, patch=patch, config=cfg, progress=Bar(bar))
    terminal.print_eval(out, result)
    write_result(json_, result)


@app.command()
@errors
@placed
def detect(
    model: ModelOpt = DEFAULT_MODEL,
    prompt: Annotated[Optional[list[str]], typer.Option(help="scan prompt (repeatable); default: the paper's + 3")] = None,
    max_candidates: Annotated[int, typer.Option(help="most spike-scan rounds (one weight each)")] = 8,
    spike_ratio: Annotated[float, typer.Option(help="a layer is an outlier when its output spike is this many times the median layer's")] = 50.0,
    attribution: Annotated[str, typer.Option(help="activation (|W|*max|x|), gradient (|w*dL/dw|) or none")] = "activation",
    attribution_top: Annotated[int, typer.Option(help="attribution candidates to verify")] = 3,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="measure each candidate's damage vs controls")] = True,
    corpus: CorpusOpt = DEFAULT_CORPUS,
    split: Annotated[str, typer.Option(help="calibration split")] = "train",
    calib_tokens: Annotated[int, typer.Option(help="calibration tokens for attribution and verification")] = 2048,
    max_length: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    min_kl: Annotated[float, typer.Option(help="least KL (nats/token) for a confirmed super weight")] = 0.1,
    control_factor: Annotated[float, typer.Option(help="confirmed KL must be this many times the worse control's")] = 10.0,
    seed: int = 0,
    bos: BosOpt = "auto",
    json_: JsonOpt = None,
    where: dict | None = None,  # the placement options (common.placed)
):
    """Find super weights: iterative spike scan + attribution, each confirmed by the damage its removal does."""
    import superweight.api as sw

    cfg = sw.DetectConfig(  # checks its values (one error line each)
        attribution=attribution, max_length=max_length, calib_tokens=calib_tokens, max_candidates=max_candidates,
        attribution_top=attribution_top, spike_ratio=spike_ratio, control_factor=control_factor, min_kl=min_kl,
        prompts=prompt, verify=verify, corpus=corpus, split=split, seed=seed,
    )
    later = model_to_load(model, where, bos)
    check_json(json_)
    with progress() as bar:
        result = sw.detect(later, cfg, progress=Bar(bar, "Detecting"))
    terminal.print_detect(out, result)
    write_result(json_, result)


@app.command()
@errors
@placed
def sweep(
    weight: Annotated[str, typer.Option(help="LAYER:ROW:COL of the weight to scale")],
    model: ModelOpt = DEFAULT_MODEL,
    scales: Annotated[str, typer.Option(help="comma-separated factors")] = "1,0.5,0,-1,2",
    spread: Annotated[int, typer.Option(help="also zero it and add value/N to the next N columns (0: skip)")] = 8,
    corpus: CorpusOpt = DEFAULT_CORPUS,
    split: SplitOpt = "eval",
    max_tokens: Annotated[int, typer.Option(help="tokens of the corpus to evaluate")] = 4096,
    max_length: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    prompt: Annotated[Optional[list[str]], typer.Option(help="generation prompt (repeatable)")] = None,
    max_new_tokens: int = 20,
    plot: Annotated[Optional[str], typer.Option(help="PNG path (default runs/sweep/L-R-C.png)")] = None,
    bos: BosOpt = "auto",
    json_: JsonOpt = None,
    where: dict | None = None,  # the placement options (common.placed)
):
    """Scale one weight (and spread it): NLL/PPL/KL/top-1 and generations per scale, plus a PNG plot."""
    import superweight.api as sw
    from superweight.core.coords import parse_coord
    from superweight.report.plots import save_sweep_plot as plot_sweep

    coord = parse_coord(weight)
    if "@" in weight:
        raise UsageError("--weight takes LAYER:ROW:COL without @SCALE; give factors with --scales")
    try:
        factors = [float(x) for x in scales.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"invalid --scales '{scales}': expected comma-separated numbers, e.g. 1,0.5,0,-1,2") from None
    if not factors:
        raise UsageError("--scales is empty")
    if spread < 0:
        raise UsageError(f"--spread must be >= 0, got {spread}")
    cfg = sw.SweepConfig(scales=factors, spread=spread or None, corpus=corpus, split=split, max_tokens=max_tokens,
                      max_length=max_length, prompts=prompt, max_new_tokens=max_new_tokens)
    later = model_to_load(model, where, bos)
    png = plot or sw.sweep_plot_path(coord)
    check_json(json_, png)
    with progress() as bar:
        result = sw.sweep(later, coord, cfg, progress=Bar(bar))
    terminal.print_sweep(out, result)
    plot_sweep(result, png)
    err.print(f"Wrote {png}")
    write_result(json_, result)
