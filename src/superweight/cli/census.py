"""`census`: `detect` on many models, one at a time, into one table that resumes (stages/census.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from superweight.cli import inspect as _inspect  # noqa: F401  (detect is registered first: census follows it)
from superweight.cli.common import (
    DEFAULT_CORPUS, Bar, BosOpt, CorpusOpt, app, err, errors, model_to_load, out, progress, placed,
)
from superweight.errors import UsageError


@app.command()
@errors
@placed
def census(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="model specs, as --model takes them (smollm2-135m, a hub id, a directory, a .gguf file)",
        show_default=False)] = None,
    models_file: Annotated[Optional[str], typer.Option(
        help="a file of model specs, one a line (blank lines and # comments skipped); adds to MODELS")] = None,
    out_: Annotated[Optional[str], typer.Option(
        "--out", help="census directory (default runs/census-DATE); a rerun on it skips the models done, and "
                      "several processes (one model each) may share it")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        help="scan prompt (repeatable); default: the paper's + 3")] = None,
    max_candidates: Annotated[int, typer.Option(help="most spike-scan rounds (one weight each)")] = 8,
    attribution_top: Annotated[int, typer.Option(help="attribution candidates to verify")] = 3,
    corpus: CorpusOpt = DEFAULT_CORPUS,
    split: Annotated[str, typer.Option(help="calibration split")] = "train",
    calib_tokens: Annotated[int, typer.Option(help="calibration tokens for attribution and verification")] = 2048,
    max_length: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    seed: int = 0,
    table_only: Annotated[bool, typer.Option(
        "--table-only", help="detect nothing: rewrite and print the table from the results in --out (the merge "
                             "after a job array); MODELS, if given, come first and in that order")] = False,
    bos: BosOpt = "auto",
    where: dict | None = None,  # the placement options (common.placed)
):
    """Detect super weights in many models, one in memory at a time: one table (CSV, Markdown, terminal).

    Per model: the super weights found (else its most damaging weight), their KL, PPL ratio, grade and depth,
    and whether they match the published ones. A rerun on the same --out skips the models already done. A
    model that fails is an error row and the census goes on; the exit code is then 1 (0 when every model has a
    result). docs/census.md runs a census on a cluster.
    """
    import superweight.api as sw
    from superweight.report.census import print_census

    # Everything that can be checked without a model is checked before the first (slow) load.
    specs = [*(models or []), *(sw.read_models_file(models_file) if models_file else [])]
    if table_only:
        if not out_:
            raise UsageError("--table-only needs --out: the census directory to read")
        outcome = sw.census_table(out_, specs)
        print_census(out, outcome.rows, outcome.out)
        _wrote(outcome.out)
        return
    if not specs:
        raise UsageError("no models given: name them (superweight census MODEL...) or pass --models-file FILE")
    cfg = sw.DetectConfig(prompts=prompt, max_candidates=max_candidates, attribution_top=attribution_top,
                          corpus=corpus, split=split, calib_tokens=calib_tokens, max_length=max_length, seed=seed)
    later = model_to_load(None, where, bos)
    with progress() as bar:
        outcome = sw.census(specs, out_, cfg, later, Bar(bar, "Detecting"))
    print_census(out, outcome.rows, outcome.out)
    if outcome.tables_written:
        _wrote(outcome.out)
    else:
        err.print(f"The tables in {outcome.out} were not rewritten: another process held it for "
                  f"{sw.CENSUS_LOCK_WAIT_S:.0f} s. The models' records are kept; a rerun writes them.",
                  markup=False, highlight=False, soft_wrap=True)
    if outcome.failed:
        raise typer.Exit(1)


def _wrote(where) -> None:
    from superweight.api import CENSUS_CSV, CENSUS_MD

    err.print(f"Wrote {where / CENSUS_CSV} and {where / CENSUS_MD}", markup=False, highlight=False)
