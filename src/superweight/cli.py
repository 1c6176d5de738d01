"""The `superweight` command line: thin commands that parse options, call one library function, print.

Errors raised as `SuperweightError` become one `Error: ...` line on stderr and a non-zero exit (2 for bad
option values, 1 otherwise). Set SUPERWEIGHT_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from superweight import data
from superweight.errors import SuperweightError, UsageError
from superweight.models import DEFAULT_MODEL

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Detect, ablate, measure and repair super weights in causal language models.",
)
# Piped output (files, CI logs) gets room for the wide tables instead of rich's 80-column fallback.
# emoji=False: a coordinate such as 29:100:1126 must not turn into "29💯1126".
out = Console(width=None if sys.stdout.isatty() else 140, emoji=False)
err = Console(stderr=True, emoji=False)

# Options shared by several commands.
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="smollm2-135m, a hub id, a model directory or a .gguf file")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")]
DtypeOpt = Annotated[str, typer.Option(help="fp32, bf16 or fp16 (log-softmax is always fp32)")]
CorpusOpt = Annotated[str, typer.Option(help="pydoc, wikitext2 or text:PATH (file, directory or glob)")]
SplitOpt = Annotated[str, typer.Option(help="train, eval or all (wikitext2: train, validation, test)")]
JsonOpt = Annotated[Optional[str], typer.Option("--json", help="write the full result as JSON to this path")]


def _errors(fn):
    """Turn domain errors into one line and an exit code, at the CLI boundary only."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SuperweightError as exc:
            if os.environ.get("SUPERWEIGHT_DEBUG"):
                raise
            err.print(f"Error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130) from None

    return wrapper


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True,
        # Off when stderr is not a terminal: a log needs no bar, and an error line then stands alone.
        disable=not err.is_terminal,
    )


def _token_and_prompt_tasks(bar: Progress, n_tokens: int, n_prompts: int):
    """Two progress tasks (scored tokens, generations) and the callbacks that advance them."""
    tokens = bar.add_task("Scoring tokens", total=n_tokens)
    prompts = bar.add_task("Generating", total=n_prompts)
    return (lambda n: bar.advance(tokens, n)), (lambda n: bar.advance(prompts, n))


def _stages(bar: Progress):
    """One progress task that follows a job's stages: (stage(name, total), advance(n, loss)) callbacks."""
    task = bar.add_task("Preparing", total=None)
    current = {"name": "Preparing"}

    def stage(name: str, total: int | None = None) -> None:
        current["name"] = name
        bar.update(task, description=name, total=total, completed=0)

    def advance(n: int, loss: float | None = None) -> None:
        note = f" (KL {loss:.4f})" if loss is not None else ""
        bar.update(task, advance=n, description=current["name"] + note)

    return stage, advance


def _write_result(json_: str | None, result) -> None:
    if json_:
        from superweight.runs import write_json

        write_json(json_, result.model_dump())
        err.print(f"Wrote {json_}")


def _load(model: str, device: str, dtype: str):
    from superweight import models

    with err.status(f"Loading {model} ({dtype}, {device})..."):
        return models.load(model, device=device, dtype=dtype)


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}" if abs(x) < 1e5 else f"{x:.3e}"


@app.command()
@_errors
def info(model: ModelOpt = DEFAULT_MODEL, device: DeviceOpt = "cpu", dtype: DtypeOpt = "fp32",
         json_: JsonOpt = None):
    """Architecture, sizes and down-projection names of a model."""
    from dataclasses import asdict

    from superweight.arch import describe
    from superweight.known import published
    from superweight.runs import check_writable, write_json

    if json_:
        check_writable(json_)
    loaded = _load(model, device, dtype)
    desc = describe(loaded.model)
    table = Table(title=f"{model}", show_header=False)
    table.add_row("source", loaded.source)
    table.add_row("family", desc.family)
    table.add_row("class", desc.model_class)
    table.add_row("layers", str(desc.n_layers))
    table.add_row("d_model (rows)", str(desc.d_model))
    table.add_row("d_ff (cols)", str(desc.d_ff))
    table.add_row("parameters", f"{desc.n_params:,}")
    table.add_row("down-projections", f"{desc.down_proj_names[0]} ... {desc.down_proj_names[-1]}")
    known = published(model)
    table.add_row("published super weights", ", ".join(map(str, known)) or "none recorded")
    out.print(table)
    if json_:
        write_json(json_, {**asdict(desc), "source": loaded.source, "published": [c.model_dump() for c in known]})


@app.command("eval")
@_errors
def eval_(
    model: ModelOpt = DEFAULT_MODEL,
    corpus: CorpusOpt = data.DEFAULT_CORPUS,
    split: SplitOpt = "eval",
    ablate: Annotated[Optional[list[str]], typer.Option(
        help="LAYER:ROW:COL[@SCALE] (repeatable); default: the model's published super weights")] = None,
    max_tokens: Annotated[int, typer.Option(help="tokens of the corpus to evaluate")] = 4096,
    max_length: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    stride: Annotated[Optional[int], typer.Option(help="window stride (default: max-length, no overlap)")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(help="generation prompt (repeatable); default: ten built-in")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="greedy tokens per generation")] = 20,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    json_: JsonOpt = None,
):
    """Base vs ablated: NLL, PPL, KL, top-1 agreement, super activation, and generations side by side."""
    from superweight.coords import parse_coords
    from superweight.evaluate import run_eval
    from superweight.generate import DEFAULT_PROMPTS
    from superweight.known import published
    from superweight.metrics import n_scored
    from superweight.runs import check_writable

    # Everything that can be checked without the model is checked before the (slow) load.
    coords = parse_coords(ablate) if ablate else published(model)
    data.check_windows(max_length, stride)
    if max_tokens < 2:
        raise UsageError(f"--max-tokens must be at least 2, got {max_tokens}")
    if json_:
        check_writable(json_)
    text = data.load_text(corpus, split)
    loaded = _load(model, device, dtype)
    if not coords:
        err.print("No --ablate given and no published super weight for this model: base metrics only.",
                  soft_wrap=True)
    ids = data.tokenize(loaded.tokenizer, text, max_tokens)
    prompts = prompt or DEFAULT_PROMPTS
    with _progress() as bar:
        on_tokens, on_prompt = _token_and_prompt_tasks(bar, n_scored(ids.numel(), max_length, stride), len(prompts))
        result = run_eval(
            loaded, coords, corpus, split, max_tokens, max_length, stride, prompts, max_new_tokens, ids=ids,
            on_tokens=on_tokens, on_prompt=on_prompt,
        )
    _print_eval(result)
    _write_result(json_, result)


def _print_eval(result) -> None:
    p = result.protocol
    table = Table(title=f"{p.model}: {p.corpus}/{p.split}, {p.n_tokens:,} tokens, "
                        f"windows {p.max_length}/{p.stride}, {p.dtype}")
    table.add_column("condition")
    for col in ("NLL", "PPL", "KL(base||·)", "top-1 agree", "super act."):
        table.add_column(col, justify="right")
    rows = [("base", result.base)]
    if result.ablated:
        rows.append((p.interventions["ablated"], result.ablated))
    for name, m in rows:
        table.add_row(name, _fmt(m.nll), _fmt(m.ppl, 2), _fmt(m.kl), f"{m.top1_agree:.1%}",
                      _fmt(m.super_activation, 1))
    out.print(table)
    if result.base and result.ablated:
        out.print(f"PPL ratio ablated/base: {result.ablated.ppl / result.base.ppl:.2f}x")
    _print_generations(result.generations)


def _print_generations(rows: list[dict[str, str]]) -> None:
    gen = Table(title="Greedy generations", show_lines=True)
    for col in rows[0] if rows else []:
        gen.add_column(col, overflow="fold")
    for row in rows:
        # Text(): generated text is data, never rich markup ("[1, 2, 3" must print as is).
        gen.add_row(*[Text(repr(v)[1:-1] if k == "prompt" else v) for k, v in row.items()])
    out.print(gen)


@app.command()
@_errors
def detect(
    model: ModelOpt = DEFAULT_MODEL,
    prompt: Annotated[Optional[list[str]], typer.Option(help="scan prompt (repeatable); default: the paper's + 3")] = None,
    max_candidates: Annotated[int, typer.Option(help="most spike-scan rounds (one weight each)")] = 8,
    spike_ratio: Annotated[float, typer.Option(help="a layer is an outlier when its output spike is this many times the median layer's")] = 50.0,
    attribution: Annotated[str, typer.Option(help="activation (|W|*max|x|), gradient (|w*dL/dw|) or none")] = "activation",
    attribution_top: Annotated[int, typer.Option(help="attribution candidates to verify")] = 3,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="measure each candidate's damage vs controls")] = True,
    corpus: CorpusOpt = data.DEFAULT_CORPUS,
    split: Annotated[str, typer.Option(help="calibration split")] = "train",
    calib_tokens: Annotated[int, typer.Option(help="calibration tokens for attribution and verification")] = 2048,
    max_length: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    min_kl: Annotated[float, typer.Option(help="least KL (nats/token) for a confirmed super weight")] = 0.1,
    control_factor: Annotated[float, typer.Option(help="confirmed KL must be this many times the worse control's")] = 10.0,
    seed: int = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    json_: JsonOpt = None,
):
    """Find super weights: iterative spike scan + attribution, each confirmed by the damage its removal does."""
    from superweight.detect import run_detect
    from superweight.metrics import n_scored
    from superweight.runs import check_writable

    if attribution not in {"activation", "gradient", "none"}:
        raise UsageError(f"unknown attribution '{attribution}': use activation, gradient or none")
    data.check_windows(max_length)
    if calib_tokens < 2:
        raise UsageError(f"--calib-tokens must be at least 2, got {calib_tokens}")
    if json_:
        check_writable(json_)
    text = data.load_text(corpus, split) if (verify or attribution != "none") else None
    loaded = _load(model, device, dtype)
    ids = data.tokenize(loaded.tokenizer, text, calib_tokens) if text is not None else None
    with _progress() as bar:
        task = bar.add_task("Detecting", total=None)

        def stage(name: str) -> None:
            total = n_scored(ids.numel(), max_length) if name.startswith("Verifying") else None
            bar.update(task, description=name, total=total, completed=0)

        result = run_detect(
            loaded, prompt, max_candidates, spike_ratio, None if attribution == "none" else attribution,
            attribution_top, verify, corpus, split, calib_tokens, max_length, min_kl, control_factor, seed, ids=ids,
            on_stage=stage, on_tokens=lambda n: bar.advance(task, n),
        )
    _print_detect(result)
    _write_result(json_, result)


def _print_detect(result) -> None:
    p = result.protocol
    title = "Super-weight candidates"
    if p:
        title += f" (damage on {p.corpus}/{p.split}, {p.n_tokens:,} tokens)"
    table = Table(title=title, box=box.SIMPLE_HEAD)
    cols = ["L:R:C", "W", "in", "out", "×med", "KL", "PPL×", "ctrl KL", "confirmed", "found by"]
    for c in cols:
        table.add_column(c, justify="left" if c in {"L:R:C", "found by", "confirmed"} else "right", no_wrap=True)
    for c in result.candidates:
        ctrl = "-" if c.control_kl_top is None else f"{c.control_kl_top:.1g}/{c.control_kl_random:.1g}"
        table.add_row(
            f"{c.layer}:{c.row}:{c.col}", f"{c.value:.3g}", _fmt(c.in_spike, 0), _fmt(c.out_spike, 0),
            _fmt(c.spike_ratio, 0), _fmt(c.kl, 3), _fmt(c.ppl_ratio, 2), ctrl,
            "[bold green]yes[/]" if c.confirmed else ("no" if c.kl is not None else "not verified"),
            c.source.replace("attribution:", "attr:").replace("(round ", "r").rstrip(")"),
        )
    out.print(table)
    out.print(
        "W: the weight; in/out: max |input| at its column and max |output| at its row of the down-projection "
        "in the scan; ×med: that output spike over the median layer's; KL: mean KL(base || weight zeroed), "
        "nats/token; PPL×: PPL with it zeroed / base PPL; ctrl KL: the same for the largest-|W| other weight "
        "/ a random weight of the same matrix. "
        f"Confirmed: KL >= {result.settings['min_kl']} and >= {result.settings['control_factor']:g}× the worse "
        "control. found by: spike scan round n, or attribution method."
    )
    if result.candidates and result.candidates[0].kl is not None and not any(c.confirmed for c in result.candidates):
        out.print("[bold]No candidate is confirmed: none does damage far above its controls.[/]")
    if not result.candidates:
        out.print("[bold]No candidates: no layer's spike stands out and attribution was off.[/]")
    if result.published:
        known = ", ".join(
            f"{k['layer']}:{k['row']}:{k['col']} ({'confirmed' if k['confirmed'] else 'detected' if k['detected'] else 'not found'})"
            for k in result.published
        )
        out.print(f"Published super weights for this model: {known}")


@app.command()
@_errors
def sweep(
    weight: Annotated[str, typer.Option(help="LAYER:ROW:COL of the weight to scale")],
    model: ModelOpt = DEFAULT_MODEL,
    scales: Annotated[str, typer.Option(help="comma-separated factors")] = "1,0.5,0,-1,2",
    spread: Annotated[int, typer.Option(help="also zero it and add value/N to the next N columns (0: skip)")] = 8,
    corpus: CorpusOpt = data.DEFAULT_CORPUS,
    split: SplitOpt = "eval",
    max_tokens: Annotated[int, typer.Option(help="tokens of the corpus to evaluate")] = 4096,
    max_length: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    prompt: Annotated[Optional[list[str]], typer.Option(help="generation prompt (repeatable)")] = None,
    max_new_tokens: int = 20,
    plot: Annotated[Optional[str], typer.Option(help="PNG path (default runs/sweep/L-R-C.png)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
    json_: JsonOpt = None,
):
    """Scale one weight (and spread it): NLL/PPL/KL/top-1 and generations per scale, plus a PNG plot."""
    from superweight.coords import parse_coord
    from superweight.generate import DEFAULT_PROMPTS
    from superweight.metrics import n_scored
    from superweight.runs import check_writable
    from superweight.sweep import plot as plot_sweep, run_sweep

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
    data.check_windows(max_length)
    png = plot or f"runs/sweep/{coord.layer}-{coord.row}-{coord.col}.png"
    for path in filter(None, [json_, png]):
        check_writable(path)
    text = data.load_text(corpus, split)
    loaded = _load(model, device, dtype)
    ids = data.tokenize(loaded.tokenizer, text, max_tokens)
    prompts = prompt or DEFAULT_PROMPTS
    with _progress() as bar:
        on_tokens, on_prompt = _token_and_prompt_tasks(bar, n_scored(ids.numel(), max_length), len(prompts))
        result = run_sweep(
            loaded, coord, factors, spread or None, corpus, split, max_tokens, max_length, prompts,
            max_new_tokens, ids=ids, on_tokens=on_tokens, on_prompt=on_prompt,
        )
    p = result.protocol
    table = Table(title=f"Sweep of {result.weight} (W = {result.value:.4g}): {p.corpus}/{p.split}, "
                        f"{p.n_tokens:,} tokens")
    for col in ("condition", "NLL", "PPL", "KL(base||·)", "top-1 agree", "super act."):
        table.add_column(col, justify="left" if col == "condition" else "right")
    for label, m in [("base", result.base)] + [(pt.label, pt.metrics) for pt in result.points]:
        table.add_row(label, _fmt(m.nll), _fmt(m.ppl, 2), _fmt(m.kl), f"{m.top1_agree:.1%}",
                      _fmt(m.super_activation, 1))
    out.print(table)
    _print_generations(result.generations)
    plot_sweep(result, png)
    err.print(f"Wrote {png}")
    _write_result(json_, result)


@app.command()
@_errors
def repair(
    weight: Annotated[list[str], typer.Option(help="LAYER:ROW:COL to ablate (repeatable)")],
    patch_row: Annotated[Optional[list[str]], typer.Option(
        help="LAYER:ROW to patch (repeatable); default: each ablated weight's row")] = None,
    model: ModelOpt = DEFAULT_MODEL,
    corpus: CorpusOpt = data.DEFAULT_CORPUS,
    recipe: Annotated[str, typer.Option(help="fast (default), quick (the one-shot run's), sgd (quick with SGD) or seed (the write-up's)")] = "fast",
    steps: Annotated[Optional[int], typer.Option(help="optimiser steps (overrides the recipe)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="sequences per step")] = None,
    seq_len: Annotated[Optional[int], typer.Option(help="tokens per sequence")] = None,
    lr: Annotated[Optional[float], typer.Option(help="learning rate")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw, adam or sgd")] = None,
    kl: Annotated[Optional[str], typer.Option(help="forward (KL(teacher||student)) or reverse")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="softmax temperature")] = None,
    init: Annotated[Optional[str], typer.Option(help="zero or random")] = None,
    seed: Annotated[Optional[int], typer.Option(help="random seed")] = None,
    out: Annotated[Optional[str], typer.Option(help="run directory (default runs/repair-L-R-C)")] = None,
    resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint")] = False,
    checkpoint_every: Annotated[int, typer.Option(help="checkpoint every K steps")] = 25,
    baselines: Annotated[bool, typer.Option(help="also oracle, activation restore, random vector, other row")] = False,
    seeds: Annotated[int, typer.Option(help="train this many patches (seeds SEED, SEED+1, ...): mean and spread")] = 1,
    eval_tokens: Annotated[int, typer.Option(help="eval-split tokens for the before/after metrics")] = 4096,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
):
    """Train a row patch that repairs the ablated model by KL distillation against the intact one."""
    from pathlib import Path

    from superweight.coords import parse_coords
    from superweight.repair_job import run_repair

    coords = parse_coords(weight)
    rows = _parse_rows(patch_row) if patch_row else sorted({(c.layer, c.row) for c in coords})
    cfg = _recipe_config(recipe, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, optimizer=optimizer,
                         kl=kl, temperature=temperature, init=init, seed=seed)
    if checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every must be at least 1, got {checkpoint_every}")
    if eval_tokens < 2:
        raise UsageError(f"--eval-tokens must be at least 2, got {eval_tokens}")
    if seeds < 1:
        raise UsageError(f"--seeds must be at least 1, got {seeds}")
    first = coords[0]
    run_dir = Path(out or f"runs/repair-{first.layer}-{first.row}-{first.col}")
    data.load_text(corpus, "eval")  # a missing corpus fails before the model loads
    loaded = _load(model, device, dtype)
    with _progress() as bar:
        stage, advance = _stages(bar)
        results = run_repair(loaded, coords, rows, cfg, recipe, run_dir, corpus, eval_tokens, 512, baselines,
                             seeds, resume, checkpoint_every, on_stage=stage, on_advance=advance)
    _print_repair(results, run_dir)


def _recipe_config(recipe: str, **overrides):
    """A recipe's settings with the options given on the command line (None = keep the recipe's)."""
    from superweight.repair import RECIPES, RepairConfig

    if recipe not in RECIPES:
        raise UsageError(f"unknown recipe '{recipe}': use {', '.join(RECIPES)}")
    try:
        return RepairConfig(**{**RECIPES[recipe].model_dump(), **{k: v for k, v in overrides.items() if v is not None}})
    except ValueError as exc:
        raise UsageError(f"invalid training option: {str(exc).splitlines()[-1].strip()}") from None


def _parse_rows(texts: list[str]) -> list[tuple[int, int]]:
    rows = []
    for t in texts:
        parts = t.strip().split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise UsageError(f"invalid patch row '{t}': expected LAYER:ROW, e.g. 11:507")
        rows.append((int(parts[0]), int(parts[1])))
    return rows


def _print_repair(results: dict, run_dir) -> None:
    p = results["protocol"]
    table = Table(title=f"Repair ({results['recipe']} recipe): {p['corpus']}/eval, {p['n_tokens']:,} tokens")
    for col in ("condition", "NLL", "PPL", "KL(base||·)", "top-1 agree", "super act.", "NLL-gap rec.", "KL rec."):
        table.add_column(col, justify="left" if col == "condition" else "right")
    rows = [("base", results["base"], None), ("broken", results["broken"], None),
            ("patched", results["patched"], results["recovery"])]
    rows += [(name, m, m["recovery"]) for name, m in results.get("baselines", {}).items()]
    for name, m, rec in rows:
        table.add_row(name, _fmt(m["nll"]), _fmt(m["ppl"], 2), _fmt(m["kl"]), f"{m['top1_agree']:.1%}",
                      _fmt(m["super_activation"], 1), f"{rec['nll_gap']:.1%}" if rec else "",
                      f"{rec['kl']:.1%}" if rec else "")
    out.print(table)
    t = results["training"]
    out.print(f"Training: {t['steps']} steps, {t['seconds']:.0f} s ({t['s_per_step']:.2f} s/step), "
              f"final KL loss {t['final_loss']:.4f}" + (f", resumed from step {t['resumed_from']}" if t["resumed_from"] is not None else ""))
    for key, g in results["patch"]["rows"].items():
        cols = "; ".join(f"d[{c['col']}] = {c['value_at_col']:.4g} (deleted {c['deleted_value']:.4g}), "
                         f"cos(d, e_{c['col']}) = {c['cos_ablated_direction']:.3f}" for c in g["cols"])
        out.print(f"Patch row {key}: ||d|| = {g['norm']:.3f}, cos(d, original row) = {g['cos_original_row']:.3f}; {cols}")
    if "seeds" in results:
        sd = results["seeds"]
        out.print(f"Over {len(sd['values'])} seeds: NLL-gap recovery {sd['mean']['nll_gap']:.1%} ± {sd['std']['nll_gap']:.1%}, "
                  f"||d|| {sd['mean']['norm']:.3g} ± {sd['std']['norm']:.2g}, "
                  f"cos(d, row) {sd['mean']['cos_original_row']:.3f} ± {sd['std']['cos_original_row']:.3f}")
    out.print(f"Run directory: {run_dir}")


@app.command("apply")
@_errors
def apply_(
    patch: Annotated[str, typer.Option(help="run directory (or patch.safetensors) of a repair")],
    export: Annotated[str, typer.Option(help="new directory for the merged model (save_pretrained layout)")],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model spec (default: the patch's own)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
):
    """Merge a patch into the ablated model and write it as a standalone model directory."""
    from pathlib import Path

    from superweight.models import save_model_dir
    from superweight.patchfile import load_patch, merge_into_weights

    data_ = load_patch(patch)
    target = Path(export)
    if target.exists():
        raise UsageError(f"--export {target} exists already; choose a new directory")
    loaded = _load(model or data_.config.get("spec", DEFAULT_MODEL), device, dtype)
    merge_into_weights(loaded.model, data_)
    save_model_dir(loaded.model, loaded.tokenizer, target)
    out.print(f"Wrote the patched model ({', '.join(map(str, data_.ablated))} ablated, rows "
              f"{', '.join(f'{l}:{r}' for l, r in data_.rows)} patched) to {target}")

RunDirArg = Annotated[str, typer.Argument(help="a run directory written by `superweight repair` or `run`")]


def _run_dir(run_dir: str):
    """The run directory and the model spec it was made with, checked before any model loads."""
    from pathlib import Path

    from superweight.analyze import read_results
    from superweight.patchfile import load_patch

    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"no such run directory: {path}")
    read_results(path)
    return path, load_patch(path).config.get("spec", DEFAULT_MODEL)


@app.command()
@_errors
def analyze(
    run_dir: RunDirArg,
    tokens: Annotated[int, typer.Option(help="eval-split tokens to analyse on")] = 2048,
    draws: Annotated[int, typer.Option(help="random-k control draws per k")] = 3,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model spec (default: the run's own)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
):
    """Patch geometry, top-k sparsity with a random-k control, token and neuron views, scale sweep."""
    from superweight.analyze import run_analyze

    path, spec = _run_dir(run_dir)
    if tokens < 2 or draws < 1:
        raise UsageError("--tokens must be at least 2 and --draws at least 1")
    loaded = _load(model or spec, device, dtype)
    with _progress() as bar:
        stage, advance = _stages(bar)
        results = run_analyze(loaded, path, tokens, draws, on_stage=stage, on_tokens=advance)
    _print_analysis(results)
    out.print(f"Updated {path / 'results.json'}")


def _print_analysis(results: dict, patch_line: bool = True) -> None:
    from superweight.report import smallest_k

    if patch_line:  # `run` has printed it with the repair
        g = results["patch"]
        out.print(f"Patch {g['layer']}:{g['row']}: ||d|| = {g['norm']:.3f}, cos(d, original row) = {g['cos_original_row']:.3f}, "
                  f"cos(d, e_col) = {g.get('cos_ablated_direction', 0):.3f}, d[{g.get('col')}] = {g.get('value_at_col', 0):.4g} "
                  f"(deleted {g.get('deleted_value', 0):.4g})")
    table = Table(title=f"The patch cut to k entries: largest |d|, largest |x·d| at the massive token, random "
                        f"({results['analysis']['draws']} draws), "
                        f"{results['analysis']['protocol']['n_tokens']:,} tokens", box=box.SIMPLE_HEAD)
    for col in ("k", "top-|d| rec.", "KL", "top-|x·d| rec.", "KL ", "random-k rec.", "KL  "):
        table.add_column(col, justify="right")
    for p in results["sparsity"]:
        c = p["by_contribution"]
        table.add_row(str(p["k"]), f"{p['nll_gap']:.1%}", _fmt(p["kl"]), f"{c['nll_gap']:.1%}", _fmt(c["kl"]),
                      f"{p['random']['nll_gap']:.1%}", _fmt(p["random"]["kl"]))
    out.print(table)
    k90 = smallest_k(results["sparsity"])
    dense = results["sparsity"][-1]["nll_gap"]
    k_rel = smallest_k(results["sparsity"], 0.9 * dense) if dense > 0 else None
    k_c = smallest_k(results["sparsity"], ranking="by_contribution")
    out.print(f"Smallest top-|x·d| patch recovering >= 90% of the NLL gap: {k_c if k_c else 'none'}")
    out.print(f"Smallest top-|d| patch recovering >= 90% of the NLL gap: {k90 if k90 else 'none'}; "
              f"keeping 90% of the full patch's {dense:.1%}: {k_rel if k_rel else 'none'}")
    t = results["tokens"]
    for key, title in (("hurt", "most hurt by the ablation"), ("healed", "most healed by the patch")):
        out.print(f"Tokens {title}: " + ", ".join(f"{x['token']!r} ({x['sum']:+.1f})" for x in t[key][:8]), soft_wrap=True)
    out.print("Tokens rising in the broken model: " + ", ".join(f"{x['token']!r}" for x in t["rising"][:8]), soft_wrap=True)
    lens = t["logit_lens"]
    out.print(f"Logit lens of channel {lens['row']}: + " + ", ".join(repr(x["token"]) for x in lens["top"][:8])
              + " | - " + ", ".join(repr(x["token"]) for x in lens["bottom"][:8]), soft_wrap=True)


@app.command()
@_errors
def sparsify(
    run_dir: RunDirArg,
    l1: Annotated[str, typer.Option(help="comma-separated L1 (proximal) strengths; empty to skip")] = "0.6,0.8,1",
    l0: Annotated[str, typer.Option(help="comma-separated hard-concrete L0 strengths; empty to skip")] = "1,10,30",
    steps: Annotated[Optional[int], typer.Option(help="steps per sparse patch (default: half the run's)")] = None,
    tokens: Annotated[int, typer.Option(help="eval-split tokens to score each patch on")] = 2048,
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="model spec (default: the run's own)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
):
    """Train sparse patches (L1, hard-concrete L0) over a sweep of strengths; the recovery-vs-size frontier."""
    from superweight.sparsify import run_sparsify

    strengths = {"l1": _floats("--l1", l1), "l0": _floats("--l0", l0)}
    strengths = {k: v for k, v in strengths.items() if v}
    if not strengths:
        raise UsageError("no strengths given: set --l1 and/or --l0")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps must be at least 1, got {steps}")
    path, spec = _run_dir(run_dir)
    loaded = _load(model or spec, device, dtype)
    with _progress() as bar:
        stage, advance = _stages(bar)
        results = run_sparsify(loaded, path, strengths, steps, tokens, on_stage=stage, on_advance=advance)
    _print_sparse(results["sparse_training"])
    out.print(f"Updated {path / 'results.json'}")


def _floats(name: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"invalid {name} '{text}': expected comma-separated numbers") from None
    if any(v <= 0 for v in values):
        raise UsageError(f"{name} strengths must be positive")
    return values


def _print_sparse(st: dict) -> None:
    table = Table(title=f"Sparse training ({st['steps']} steps each from the dense patch)", box=box.SIMPLE_HEAD)
    for col in ("method", "strength", "non-zeros", "NLL-gap rec.", "KL", "||d||", "d\\[col]", "cos(d,e_col)", "frontier"):
        table.add_column(col, justify="left" if col == "method" else "right")
    front = {(p["method"], p["strength"]) for p in st["frontier"]}
    for p in st["points"]:
        table.add_row(p["method"], f"{p['strength']:g}", str(p["nnz"]), f"{p['nll_gap']:.1%}", _fmt(p["kl"]),
                      _fmt(p.get("norm")), _fmt(p.get("value_at_col")), _fmt(p.get("cos_ablated_direction")),
                      "yes" if (p["method"], p["strength"]) in front else "")
    out.print(table)
    s90 = st["smallest_90"]
    out.print("Smallest trained sparse patch recovering >= 90%: "
              + (f"{s90['nnz']} non-zeros ({s90['method']}, strength {s90['strength']:g})" if s90 else "none"))


@app.command()
@_errors
def report(run_dir: RunDirArg):
    """Write report.html (self-contained) and report.md (with plots/*.png) for a run directory."""
    from pathlib import Path

    from superweight.report import write_report

    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"no such run directory: {path}")
    md, page = write_report(path)
    out.print(f"Wrote {md}")
    out.print(f"Report: {page}")


@app.command()
@_errors
def compare(run_dirs: Annotated[list[str], typer.Argument(help="run directories")], json_: JsonOpt = None):
    """One table across runs (seeds, recipes, models): PPLs, recovery, patch geometry, sparsity."""
    from superweight.report import compare_rows
    from superweight.runs import check_writable, write_json

    if json_:
        check_writable(json_)
    rows = compare_rows(run_dirs)
    table = Table(title="Runs", box=box.SIMPLE_HEAD)
    pct = lambda v: f"{v:.1%}"  # noqa: E731
    cols = [  # (title, cell)
        ("run", lambda r: r["run"]), ("model", lambda r: (r["model"] or "-").split(" (")[0].split("/")[-1]),
        ("weight", lambda r: r["weight"]), ("recipe", lambda r: r["recipe"]), ("steps", lambda r: r["steps"]),
        ("seed", lambda r: r["seed"]), ("eval tokens", lambda r: r["n_tokens"]),
        ("base PPL", lambda r: _fmt(r["base_ppl"], 2)),
        ("broken PPL", lambda r: _fmt(r["broken_ppl"], 2)), ("patched PPL", lambda r: _fmt(r["patched_ppl"], 2)),
        ("NLL-gap rec.", lambda r: pct(r["nll_gap"])), ("KL rec.", lambda r: pct(r["kl_recovery"])),
        ("NLL-gap rec. over seeds", lambda r: f"{r['seeds_nll_gap_mean']:.1%} ± {r['seeds_nll_gap_std']:.1%} (n={r['seeds']})"),
        ("||d||", lambda r: _fmt(r["norm"], 1)), ("cos(d,row)", lambda r: _fmt(r["cos_original_row"])),
        ("fewest entries for 90%: top-|d|", lambda r: r["k90"]),
        ("  top-|x·d| at the massive token", lambda r: r["k90_contribution"]),
        ("  sparse training", lambda r: r["sparse_nnz90"]), ("train s", lambda r: _fmt(r["seconds"], 0)),
    ]
    # One column per run, one row per quantity: a few runs with many numbers read best this way round.
    table.add_column("")
    for r in rows:
        table.add_column(r["run"], justify="right", overflow="fold")
    for title, cell in cols[1:]:
        table.add_row(title, *[_cell(cell, r) for r in rows])
    out.print(table)
    if json_:
        write_json(json_, rows)
        err.print(f"Wrote {json_}")


def _cell(cell, row: dict) -> str:
    try:
        value = cell(row)
    except (TypeError, KeyError):  # a value this run does not have
        value = None
    return "-" if value is None else str(value)


@app.command()
@_errors
def run(
    model: ModelOpt = DEFAULT_MODEL,
    corpus: CorpusOpt = data.DEFAULT_CORPUS,
    out_: Annotated[Optional[str], typer.Option("--out", help="run directory (default runs/MODEL-DATE-TIME)")] = None,
    weight: Annotated[Optional[str], typer.Option(help="LAYER:ROW:COL to repair instead of detecting one")] = None,
    recipe: Annotated[str, typer.Option(help="quick (default: 32 steps of batch 2, Adam lr 0.3), sgd, fast or seed")] = "quick",
    steps: Annotated[Optional[int], typer.Option(help="optimiser steps (overrides the recipe)")] = None,
    seeds: Annotated[int, typer.Option(help="patches trained with different seeds (mean and spread)")] = 1,
    baselines: Annotated[bool, typer.Option(help="oracle, activation restore, random vectors, other row")] = True,
    sparse: Annotated[bool, typer.Option(help="also train sparse patches (L1, L0) over a sweep of strengths")] = False,
    eval_tokens: Annotated[int, typer.Option(help="eval-split tokens for the headline metrics")] = 2048,
    analysis_tokens: Annotated[int, typer.Option(help="eval-split tokens for the analyses")] = 1024,
    draws: Annotated[int, typer.Option(help="random-k control draws per k")] = 2,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
):
    """The whole study in one go: detect, ablate, measure, repair with baselines, analyse, report."""
    import datetime as dt
    from pathlib import Path

    from superweight.coords import parse_coord
    from superweight.pipeline import check_new_run_dir, run_pipeline

    coord = parse_coord(weight) if weight else None
    cfg = _recipe_config(recipe, steps=steps)
    if min(eval_tokens, analysis_tokens) < 2 or seeds < 1 or draws < 1:
        raise UsageError("--eval-tokens and --analysis-tokens must be at least 2, --seeds and --draws at least 1")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(out_ or f"runs/{Path(model).name.removesuffix('.gguf')}-{stamp}")
    check_new_run_dir(path)
    data.load_text(corpus, "eval")  # a missing corpus fails before the model loads
    loaded = _load(model, device, dtype)
    with _progress() as bar:
        stage, advance = _stages(bar)
        results = run_pipeline(loaded, path, coord, cfg, recipe, corpus, eval_tokens, analysis_tokens, draws,
                               baselines, seeds, sparse, on_stage=stage, on_advance=advance)
    d = results["detect"]
    if d["candidates"]:
        top = next(c for c in d["candidates"] if f"{c['layer']}:{c['row']}:{c['col']}" == d["weight"])
        out.print(f"Detected {len(d['candidates'])} candidates, {sum(c['confirmed'] for c in d['candidates'])} "
                  f"confirmed; repairing {d['weight']} (zeroing it: KL {top['kl']:.3g}, PPL x{top['ppl_ratio']:.2f} "
                  "on the calibration text). Details: detect.json")
    _print_repair(results, path)
    _print_analysis(results, patch_line=False)
    if "sparse_training" in results:
        _print_sparse(results["sparse_training"])
    t = results["timings"]
    out.print("Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in t.items()))
    out.print(f"Report: {path / 'report.html'}")



def main() -> None:
    app()


if __name__ == "__main__":
    main()
