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
    recipe: Annotated[str, typer.Option(help="fast (default) or seed (the write-up's settings)")] = "fast",
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
    eval_tokens: Annotated[int, typer.Option(help="eval-split tokens for the before/after metrics")] = 4096,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "fp32",
):
    """Train a row patch that repairs the ablated model by KL distillation against the intact one."""
    from pathlib import Path

    from superweight.coords import parse_coords
    from superweight.repair import RECIPES, RepairConfig
    from superweight.repair_job import run_repair

    coords = parse_coords(weight)
    rows = _parse_rows(patch_row) if patch_row else sorted({(c.layer, c.row) for c in coords})
    if recipe not in RECIPES:
        raise UsageError(f"unknown recipe '{recipe}': use {', '.join(RECIPES)}")
    overrides = {k: v for k, v in dict(steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr,
                                       optimizer=optimizer, kl=kl, temperature=temperature, init=init,
                                       seed=seed).items() if v is not None}
    try:
        cfg = RepairConfig(**{**RECIPES[recipe].model_dump(), **overrides})
    except ValueError as exc:
        raise UsageError(f"invalid training option: {str(exc).splitlines()[-1].strip()}") from None
    if checkpoint_every < 1:
        raise UsageError(f"--checkpoint-every must be at least 1, got {checkpoint_every}")
    if eval_tokens < 2:
        raise UsageError(f"--eval-tokens must be at least 2, got {eval_tokens}")
    first = coords[0]
    run_dir = Path(out or f"runs/repair-{first.layer}-{first.row}-{first.col}")
    data.load_text(corpus, "eval")  # a missing corpus fails before the model loads
    loaded = _load(model, device, dtype)
    with _progress() as bar:
        task = bar.add_task("Preparing", total=None)
        last = {"loss": None}

        def stage(name: str, total: int | None) -> None:
            bar.update(task, description=name, total=total, completed=0)

        def advance(n: int, loss: float | None) -> None:
            last["loss"] = loss
            bar.update(task, advance=n, description=f"Training (KL {loss:.4f})" if loss is not None else None)

        results = run_repair(loaded, coords, rows, cfg, recipe, run_dir, corpus, eval_tokens, 512, baselines,
                             resume, checkpoint_every, on_stage=stage, on_advance=advance)
    _print_repair(results, run_dir)


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
    for key, g in results["patch"].items():
        cols = "; ".join(f"d[{k[3:]}] = {v['value_at_col']:.4g} (deleted {v['deleted_value']:.4g})"
                         for k, v in g.items() if k.startswith("col"))
        out.print(f"Patch row {key}: ||d|| = {g['norm']:.3f}, cos(d, original row) = {g['cos_original_row']:.3f}; {cols}")
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
