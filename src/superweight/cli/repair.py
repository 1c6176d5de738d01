"""`repair` and `apply`: train a patch for ablated weights, and merge it into a standalone model."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from superweight.cli.common import (
    DEFAULT_CORPUS, DEFAULT_MODEL, Bar, BosOpt, RunBosOpt, model_to_load, CorpusOpt, ModelOpt, app, err, errors,
    out, progress, recipe_config, IncludePathOpt, TaskLimitOpt, TasksOpt, task_spec, placed,
)
from superweight.report import terminal

ExcludeOpt = Annotated[Optional[list[str]], typer.Option(
    help="hold columns of the patch at 0 (repeatable): deleted (the ablated weights' columns), top:K (the K "
         "neurons writing most in the unconstrained repair) or column numbers 3,17,40")]


@app.command()
@errors
@placed
def repair(
    weight: Annotated[list[str], typer.Option(help="LAYER:ROW:COL to ablate (repeatable)")],
    patch_row: Annotated[Optional[list[str]], typer.Option(
        help="LAYER:ROW to patch (repeatable); default: each ablated weight's row")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    corpus: CorpusOpt = DEFAULT_CORPUS,
    recipe: Annotated[str, typer.Option(help="lbfgs (default: quasi-Newton, scale-free, on 4 rows, stops on progress, 64 loss evaluations at most), balanced (SGD, scale-free in neuron rescaling only), quick (Adam), sgd, fast or seed (the write-up's); docs/recipes.md")] = "lbfgs",
    steps: Annotated[Optional[int], typer.Option(help="the budget, in loss evaluations (overrides the recipe's): "
                                                      "lbfgs: evaluations at most (max_evals), line-search trials "
                                                      "included; adamw/adam/sgd: optimiser steps, one each")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="sequences per step (lbfgs: the fixed sequences it fits)")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="tokens per sequence")] = None,
    lr: Annotated[Optional[float], typer.Option(help="learning rate (lbfgs: scales its first step only)")] = None,
    optimizer: Annotated[Optional[str], typer.Option(
        help="lbfgs (quasi-Newton with a line search), adamw, adam or sgd (first-order)")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="first-order only: constant or cosine (decays to 0)")] = None,
    warmup: Annotated[Optional[int], typer.Option(help="first-order only: linear warm-up steps")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="adamw only: weight decay")] = None,
    kl: Annotated[Optional[str], typer.Option(help="forward (KL(teacher||student)) or reverse")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="softmax temperature")] = None,
    init: Annotated[Optional[str], typer.Option(help="zero or random")] = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed")] = None,
    out_: Annotated[Optional[str], typer.Option("--out", help="run directory (default runs/repair-L-R-C)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="checkpoint every K steps")] = 25,
    baselines: Annotated[bool, typer.Option(help="also oracle, activation restore, random vector, other row")] = False,
    seeds: Annotated[int, typer.Option(help="train this many patches (seeds SEED, SEED+1, ...): mean and spread")] = 1,
    eval_tokens: Annotated[int, typer.Option(help="eval-split tokens for the before/after metrics")] = 4096,
    tasks: TasksOpt = None,
    include_path: IncludePathOpt = None,
    task_limit: TaskLimitOpt = None,
    bos: RunBosOpt = None,
    exclude: ExcludeOpt = None,
    where: dict | None = None,  # the placement options (common.placed)
):
    """Train a row patch that repairs the ablated model by KL distillation against the intact one."""
    import superweight.api as sw
    from superweight.core.coords import parse_coords, patch_rows
    from superweight.settings import revalidated

    coords = parse_coords(weight)
    rows = patch_rows(coords, patch_row)
    cfg = recipe_config(recipe, budget=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, optimizer=optimizer,
                        schedule=schedule, warmup=warmup, weight_decay=weight_decay, kl=kl, temperature=temperature,
                        init=init, seed=seed)
    job = sw.RepairJob(recipe=recipe, config=cfg, checkpoint_every=checkpoint_every, eval_tokens=eval_tokens,
                       seeds=seeds, corpus=corpus, baselines=baselines, resume=resume, exclude=exclude or [])
    later = model_to_load(model, where, bos)
    job = revalidated(job, tasks=task_spec(tasks, include_path, task_limit))
    first = coords[0]
    run_dir = out_ or f"runs/repair-{first.layer}-{first.row}-{first.col}"
    with progress() as bar:
        result = sw.repair(later, coords, rows, out=run_dir, job=job, progress=Bar(bar))
    if not sw.main_process():  # under `accelerate launch`: process 0 reports
        return
    if result.unchanged:
        err.print(f"{result.run_dir} is finished already (results.json): nothing to resume, nothing changed.",
                  soft_wrap=True)
    terminal.print_repair(out, result.record, result.run_dir)


@app.command("apply")
@errors
@placed
def apply_(
    patch: Annotated[str, typer.Option(help="run directory (or patch.safetensors) of a repair")],
    export: Annotated[Optional[str], typer.Option(help="new directory for the merged model (save_pretrained layout)")] = None,
    peft: Annotated[Optional[str], typer.Option(
        help="new directory for a PEFT LoRA adapter on the intact base model (adapter_config.json + adapter_model.safetensors)")] = None,
    ablation_only: Annotated[bool, typer.Option(help="with --peft: the adapter that only ablates (breaks the model)")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model spec (default: the patch's own)")] = None,
    bos: BosOpt = "auto",
    where: dict | None = None,  # the placement options (common.placed)
):
    """Merge a patch into the ablated model and write it as a standalone model directory (--export), or write it
    as a PEFT LoRA adapter for the intact model (--peft)."""
    import superweight.api as sw
    from superweight.core.coords import row_text

    later = model_to_load(model, where, bos)
    written = sw.apply(later, patch, export=export, peft=peft, ablation_only=ablation_only)
    data_, loaded, config = written["patch"], written["model"], written["peft"]
    what = (f"{', '.join(map(str, data_.ablated))} ablated, rows {', '.join(map(row_text, data_.rows))} "
            "patched")
    if peft:
        done = f"{', '.join(map(str, data_.ablated))} ablated only" if ablation_only else what
        targets = config["target_modules"] + config.get("target_parameters", [])
        out.print(f"Wrote a LoRA adapter ({done}; rank {config['r']} on {', '.join(targets)}) "
                  f"for the intact {loaded.source} to {peft}")
    if export:
        out.print(f"Wrote the patched model ({what}) to {export}")
