"""`repair` and `apply`: train a patch for ablated weights, and merge it into a standalone model."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from superweight.cli.common import (
    Bar, BosOpt, DeviceMapOpt, MaxMemoryOpt, OffloadOpt, RunBosOpt, check_bos, placement,
    CorpusOpt, DeviceOpt, DtypeOpt, ModelOpt, app, err, errors, load_model, out, progress, recipe_config,
    IncludePathOpt, TaskLimitOpt, TasksOpt, task_spec,
)
from superweight.io import corpora
from superweight.io.models import DEFAULT_MODEL
from superweight.report import terminal

ExcludeOpt = Annotated[Optional[list[str]], typer.Option(
    help="hold columns of the patch at 0 (repeatable): deleted (the ablated weights' columns), top:K (the K "
         "neurons writing most in the unconstrained repair) or column numbers 3,17,40")]


@app.command()
@errors
def repair(
    weight: Annotated[list[str], typer.Option(help="LAYER:ROW:COL to ablate (repeatable)")],
    patch_row: Annotated[Optional[list[str]], typer.Option(
        help="LAYER:ROW to patch (repeatable); default: each ablated weight's row")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    corpus: CorpusOpt = corpora.DEFAULT_CORPUS,
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
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    bos: RunBosOpt = None,
    exclude: ExcludeOpt = None,
):
    """Train a row patch that repairs the ablated model by KL distillation against the intact one."""
    from pathlib import Path

    from contextlib import nullcontext

    from superweight.core.coords import parse_coords, patch_rows
    from superweight.io.lock import hold_run_dir
    from superweight.io.rundir import read_record
    from superweight.io.runstate import check_run_dir_for
    from superweight.stages import distributed
    from superweight.settings import revalidated
    from superweight.stages.repair import RepairJob, recorded_bos, repair_settings, run_repair

    coords = parse_coords(weight)
    rows = patch_rows(coords, patch_row)
    cfg = recipe_config(recipe, budget=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, optimizer=optimizer,
                        schedule=schedule, warmup=warmup, weight_decay=weight_decay, kl=kl, temperature=temperature,
                        init=init, seed=seed)
    job = RepairJob(recipe=recipe, config=cfg, checkpoint_every=checkpoint_every, eval_tokens=eval_tokens,
                    seeds=seeds, corpus=corpus, baselines=baselines, resume=resume, exclude=exclude or [])
    where = placement(device, dtype, device_map, max_memory, offload_folder)
    first = coords[0]
    run_dir = Path(out_ or f"runs/repair-{first.layer}-{first.row}-{first.col}")
    bos = check_bos(bos) if bos is not None else recorded_bos(run_dir) if resume else check_bos()
    settings = repair_settings(model, job, coords, rows, bos)
    dp = distributed.current()  # under `accelerate launch`: only process 0 writes run_dir and prints
    check_run_dir_for(run_dir, settings, resume)  # refused before the directory is made or locked
    with hold_run_dir(run_dir, "repair") if dp.is_main else nullcontext():  # one writer, or refused here
        state = check_run_dir_for(run_dir, settings, resume)  # again, now that no other writer can change it
        dp.barrier()  # every process has seen run_dir as it was before process 0 writes into it
        if state == "finished" and resume:
            err.print(f"{run_dir} is finished already (results.json): nothing to resume, nothing changed.",
                      soft_wrap=True)
            terminal.print_repair(out, read_record(run_dir), run_dir)
            return
        corpora.load_text(corpus, "train")  # a missing or unreadable corpus fails before the model loads
        corpora.load_text(corpus, "eval")
        task_set = task_spec(tasks, include_path, task_limit)
        job = revalidated(job, tasks=task_set if dp.is_main else None)
        loaded = load_model(model, where, bos)
        if dp.world > 1 and dp.is_main:
            err.print(f"data-parallel: {dp.world} processes share each batch of {cfg.batch_size} sequences",
                      markup=False, highlight=False)
        with progress() as bar, dp.run_dir_for(run_dir, resume) as own_dir:
            record = run_repair(loaded, coords, rows, own_dir, job, Bar(bar))
    if dp.is_main:
        terminal.print_repair(out, record, run_dir)


@app.command("apply")
@errors
def apply_(
    patch: Annotated[str, typer.Option(help="run directory (or patch.safetensors) of a repair")],
    export: Annotated[Optional[str], typer.Option(help="new directory for the merged model (save_pretrained layout)")] = None,
    peft: Annotated[Optional[str], typer.Option(
        help="new directory for a PEFT LoRA adapter on the intact base model (adapter_config.json + adapter_model.safetensors)")] = None,
    ablation_only: Annotated[bool, typer.Option(help="with --peft: the adapter that only ablates (breaks the model)")] = False,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model spec (default: the patch's own)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    device_map: DeviceMapOpt = None,
    max_memory: MaxMemoryOpt = None,
    offload_folder: OffloadOpt = None,
    bos: BosOpt = "auto",
):
    """Merge a patch into the ablated model and write it as a standalone model directory (--export), or write it
    as a PEFT LoRA adapter for the intact model (--peft)."""
    from pathlib import Path

    from superweight.core.coords import row_text
    from superweight.io.patch import check_targets, export_model
    from superweight.io.patchfile import load_patch

    check_targets(export, peft, ablation_only)
    where = placement(device, dtype, device_map, max_memory, offload_folder)
    bos = check_bos(bos)
    data_ = load_patch(patch)
    loaded = load_model(model or data_.config.spec or DEFAULT_MODEL, where, bos)
    what = (f"{', '.join(map(str, data_.ablated))} ablated, rows {', '.join(map(row_text, data_.rows))} "
            "patched")
    if peft:  # first: the adapter is made against the intact weights
        from superweight.io.peft import write_peft

        config = write_peft(loaded, data_, Path(peft), ablation_only)
        done = f"{', '.join(map(str, data_.ablated))} ablated only" if ablation_only else what
        targets = config["target_modules"] + config.get("target_parameters", [])
        out.print(f"Wrote a LoRA adapter ({done}; rank {config['r']} on {', '.join(targets)}) "
                  f"for the intact {loaded.source} to {peft}")
    if export:
        export_model(loaded, data_, Path(export))
        out.print(f"Wrote the patched model ({what}) to {export}")
