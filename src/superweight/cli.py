"""The `superweight` command line: thin commands that parse options, call one library function, print.

Errors raised as `SuperweightError` become one `Error: ...` line on stderr and a non-zero exit (2 for bad
option values, 1 otherwise). Set SUPERWEIGHT_DEBUG=1 to see the traceback instead.
"""

from __future__ import annotations

import functools
import os
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from superweight import data
from superweight.errors import SuperweightError
from superweight.models import DEFAULT_MODEL

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Detect, ablate, measure and repair super weights in causal language models.",
)
out = Console()
err = Console(stderr=True)

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
        console=err, transient=True,
    )


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
    from superweight.runs import check_writable, write_json

    # Everything that can be checked without the model is checked before the (slow) load.
    coords = parse_coords(ablate) if ablate else published(model)
    if json_:
        check_writable(json_)
    text = data.load_text(corpus, split)
    loaded = _load(model, device, dtype)
    if not coords:
        err.print("No --ablate given and no published super weight for this model: base metrics only.")
    ids = data.tokenize(loaded.tokenizer, text, max_tokens)
    prompts = prompt or DEFAULT_PROMPTS
    with _progress() as bar:
        tokens = bar.add_task("Scoring tokens", total=n_scored(ids.numel(), max_length, stride))
        gens = bar.add_task("Generating", total=len(prompts))
        result = run_eval(
            loaded, coords, corpus, split, max_tokens, max_length, stride, prompts, max_new_tokens, ids=ids,
            on_tokens=lambda n: bar.advance(tokens, n), on_prompt=lambda n: bar.advance(gens, n),
        )
    _print_eval(result)
    if json_:
        write_json(json_, result.model_dump())
        err.print(f"Wrote {json_}")


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
    gen = Table(title="Greedy generations", show_lines=True)
    for col in result.generations[0] if result.generations else []:
        gen.add_column(col, overflow="fold")
    for row in result.generations:
        gen.add_row(*[repr(v)[1:-1] if k == "prompt" else v for k, v in row.items()])
    out.print(gen)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
