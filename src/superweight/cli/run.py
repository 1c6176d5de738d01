"""`run`: the whole study in one command (stages/pipeline.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from superweight.cli.common import (
    DEFAULT_CORPUS, DEFAULT_MODEL, Bar, RunBosOpt, model_to_load, CorpusOpt, ModelOpt, app, errors, out, progress,
    recipe_config, IncludePathOpt, TaskLimitOpt, TasksOpt, task_spec, placed,
)
from superweight.cli.repair import ExcludeOpt
from superweight.errors import UsageError
from superweight.report import terminal


@app.command()
@errors
@placed
def run(
    model: ModelOpt = DEFAULT_MODEL,
    corpus: CorpusOpt = DEFAULT_CORPUS,
    out_: Annotated[Optional[str], typer.Option("--out", help="run directory (default runs/MODEL-DATE-TIME)")] = None,
    weight: Annotated[Optional[str], typer.Option(help="LAYER:ROW:COL to repair instead of detecting one")] = None,
    recipe: Annotated[str, typer.Option(help="lbfgs (default: quasi-Newton, scale-free, on 4 rows, stops on progress, 64 loss evaluations at most), balanced, quick (Adam), sgd, fast or seed; docs/recipes.md")] = "lbfgs",
    steps: Annotated[Optional[int], typer.Option(help="the repair's budget (overrides the recipe's): lbfgs: loss "
                                                      "evaluations at most; adamw/adam/sgd: optimiser steps")] = None,
    seeds: Annotated[int, typer.Option(help="patches trained with different seeds (mean and spread)")] = 1,
    baselines: Annotated[bool, typer.Option(help="oracle, activation restore, random vectors, other row")] = True,
    sparse: Annotated[bool, typer.Option(help="also train sparse patches (L1, L0) over a sweep of strengths")] = False,
    eval_tokens: Annotated[int, typer.Option(help="eval-split tokens for the headline metrics")] = 2048,
    analysis_tokens: Annotated[int, typer.Option(help="eval-split tokens for the analyses")] = 1024,
    draws: Annotated[int, typer.Option(help="random-k control draws per k")] = 2,
    resume: Annotated[bool, typer.Option(help="continue a run killed in --out (same options): the repair resumes "
                                              "from its checkpoint, the stages after it run again")] = False,
    quantize: Annotated[bool, typer.Option(help="also 4-bit RTN at blocks 64/128/256/channel with the super weight "
                                                 "held, clipped and restored (quantize.json, a report section)")] = False,
    tasks: TasksOpt = None,
    include_path: IncludePathOpt = None,
    task_limit: TaskLimitOpt = None,
    bos: RunBosOpt = None,
    exclude: ExcludeOpt = None,
    where: dict | None = None,  # the placement options (common.placed)
):
    """The whole study in one go: detect, ablate, measure, repair with baselines, analyse, report."""
    from pathlib import Path

    import superweight.api as sw
    from superweight.core.coords import parse_coord
    from superweight.settings import revalidated

    repair = sw.RepairJob(recipe=recipe, config=recipe_config(recipe, budget=steps), corpus=corpus,
                          eval_tokens=eval_tokens, baselines=baselines, seeds=seeds, resume=resume,
                          exclude=exclude or [])
    job = sw.PipelineJob(weight=parse_coord(weight) if weight else None, repair=repair,
                         analysis_tokens=analysis_tokens, draws=draws, sparse=sparse, quantize=quantize)
    later = model_to_load(model, where, bos)
    if resume and out_ is None:
        raise UsageError("--resume needs the --out of the run to continue")
    job = revalidated(job, repair=revalidated(repair, tasks=task_spec(tasks, include_path, task_limit)))
    path = out_ or sw.new_run_dir(model)
    with progress() as bar:
        record = sw.run(later, path, job=job, progress=Bar(bar))
    terminal.print_run(out, record, Path(path))
