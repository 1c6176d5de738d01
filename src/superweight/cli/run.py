"""`run`: the whole study in one command (stages/pipeline.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from superweight.cli.common import (
    Bar, DeviceMapOpt, MaxMemoryOpt, OffloadOpt, RunBosOpt, check_bos, placement,
    CorpusOpt, DeviceOpt, DtypeOpt, ModelOpt, app, err, errors, load_model, out, progress, recipe_config,
    IncludePathOpt, TaskLimitOpt, TasksOpt, task_spec,
)
from superweight.cli.repair import ExcludeOpt
from superweight.errors import UsageError
from superweight.io import corpora
from superweight.io.models import DEFAULT_MODEL
from superweight.report import terminal


@app.command()
@errors
def run(
    model: ModelOpt = DEFAULT_MODEL,
    corpus: CorpusOpt = corpora.DEFAULT_CORPUS,
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
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    bos: RunBosOpt = None,
    exclude: ExcludeOpt = None,
):
    """The whole study in one go: detect, ablate, measure, repair with baselines, analyse, report."""
    import datetime as dt
    from pathlib import Path

    from superweight.core.coords import parse_coord
    from superweight.io.lock import hold_run_dir
    from superweight.settings import revalidated
    from superweight.stages.pipeline import PipelineJob, check_out, run_pipeline
    from superweight.stages.repair import RepairJob, recorded_bos

    repair = RepairJob(recipe=recipe, config=recipe_config(recipe, budget=steps), corpus=corpus,
                       eval_tokens=eval_tokens, baselines=baselines, seeds=seeds, resume=resume,
                       exclude=exclude or [])
    job = PipelineJob(weight=parse_coord(weight) if weight else None, repair=repair, analysis_tokens=analysis_tokens,
                      draws=draws, sparse=sparse, quantize=quantize)
    where = placement(device, dtype, device_map, max_memory, offload_folder)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out_ or f"runs/{Path(model).name.removesuffix('.gguf')}-{stamp}")
    if resume and out_ is None:
        raise UsageError("--resume needs the --out of the run to continue")
    check_out(path, resume)  # refused before the directory is made or locked
    bos = check_bos(bos) if bos is not None else recorded_bos(path) if resume else check_bos()  # resumed: the run's
    with hold_run_dir(path, "run"):  # one writer, or refused here, before the model loads
        if check_out(path, resume) == "finished":  # again, now that no other writer can change it
            err.print(f"{path} is finished already (report.html): nothing to resume, nothing changed.",
                      soft_wrap=True)
            return
        corpora.load_text(corpus, "eval")  # a missing corpus fails before the model loads
        job = revalidated(job, repair=revalidated(repair, tasks=task_spec(tasks, include_path, task_limit)))
        loaded = load_model(model, where, bos)
        with progress() as bar:
            record = run_pipeline(loaded, path, job, Bar(bar))
    terminal.print_run(out, record, path)

