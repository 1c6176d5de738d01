"""What every command shares: the app, the consoles, option types, the error boundary, the progress bar (the
library's progress.Progress), the model's Placement, and the small parsers that check option values before any
model loads. A command builds its settings objects (which validate themselves) and calls one library function."""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Optional

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from superweight.errors import SuperweightError, UsageError
from superweight.io.models import DEFAULT_MODEL
from superweight.io.placement import Placement
from superweight.settings import error_line, internal_error_line, is_settings_error

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Detect, ablate, measure and repair super weights in causal language models.",
)
# Piped output (files, CI logs) gets room for the wide tables instead of rich's 80-column fallback, and its lines
# are never wrapped (a log line is one line, whatever COLUMNS says); a terminal gets its own width.
# emoji=False: a coordinate such as 29:100:1126 must not turn into "29💯1126".
out = Console(width=None if sys.stdout.isatty() else 140, emoji=False, soft_wrap=not sys.stdout.isatty())
err = Console(stderr=True, emoji=False, soft_wrap=True)  # messages, one line each: the terminal wraps them

# Options shared by several commands.
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="smollm2-135m, a hub id, a model directory or a .gguf file")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, cuda:N, mps or auto")]
DtypeOpt = Annotated[str, typer.Option(
    help="auto (bf16 on CUDA with bf16 and on CPUs with native bf16 matmul, else fp32), fp32, bf16 or fp16; "
         "the patch, loss and log-softmax are always fp32")]
DeviceMapOpt = Annotated[Optional[str], typer.Option(
    help="spread the model over devices with accelerate: auto, balanced, or a JSON map {module: device} "
         "(a string or a file); overrides --device")]
MaxMemoryOpt = Annotated[Optional[str], typer.Option(
    help="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB")]
OffloadOpt = Annotated[Optional[str], typer.Option(help="with --device-map: folder for disk-offloaded weights")]
BOS_HELP = ("start every window and training row with the BOS token: auto follows the tokenizer (Gemma, Llama add "
            "one; SmolLM2, GPT-2 do not), on, off")
BosOpt = Annotated[str, typer.Option("--bos", help=BOS_HELP)]
RunBosOpt = Annotated[Optional[str], typer.Option(
    "--bos", help=BOS_HELP + "; default auto, or what the run did when continuing one")]
CorpusOpt = Annotated[str, typer.Option(help="pydoc, wikitext2 or text:PATH (file, directory or glob)")]
SplitOpt = Annotated[str, typer.Option(help="train, eval or all (wikitext2: train, validation, test)")]
JsonOpt = Annotated[Optional[str], typer.Option("--json", help="write the full result as JSON to this path")]
RunDirArg = Annotated[str, typer.Argument(help="a run directory written by `superweight repair` or `run`")]
TasksOpt = Annotated[Optional[str], typer.Option(
    help="zero-shot lm-evaluation-harness tasks per condition, comma-separated: arc_easy,piqa,... "
         "(needs pip install -e '.[lm-eval]')")]
IncludePathOpt = Annotated[Optional[str], typer.Option(help="with --tasks: a folder of local task YAML files")]
TaskLimitOpt = Annotated[Optional[int], typer.Option(help="with --tasks: score at most N items per task")]


def errors(fn):
    """Turn domain errors into one line and an exit code, at the CLI boundary only."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:  # a settings model refused an option value: one line, exit 2
            if os.environ.get("SUPERWEIGHT_DEBUG"):
                raise
            if not is_settings_error(exc):  # a record superweight built itself: a bug, not an option
                err.print(f"Error: {internal_error_line(exc)} (SUPERWEIGHT_DEBUG=1 shows the traceback)",
                          markup=False, highlight=False, soft_wrap=True)
                raise typer.Exit(1) from None
            err.print(f"Error: {error_line(exc, '--')}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except SuperweightError as exc:
            if os.environ.get("SUPERWEIGHT_DEBUG"):
                raise
            err.print(f"Error: {exc}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("Interrupted.")
            raise typer.Exit(130) from None

    return wrapper


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("eta"), TimeRemainingColumn(), console=err, transient=True,
        # Off when stderr is not a terminal: a log needs no bar, and an error line then stands alone.
        disable=not err.is_terminal,
    )


class Bar:
    """The library's progress protocol (superweight.progress.Progress) drawn as one rich progress task: a stage
    sets its description and total, `advance` moves it (and shows a training step's loss)."""

    def __init__(self, bar: Progress, first: str = "Preparing"):
        self.bar, self.name = bar, first
        self.task = bar.add_task(first, total=None)

    def stage(self, name: str, total: int | None = None) -> None:
        self.name = name
        self.bar.update(self.task, description=name, total=total, completed=0)

    def advance(self, n: int = 1, loss: float | None = None) -> None:
        note = f" (KL {loss:.4f})" if loss is not None else ""
        self.bar.update(self.task, advance=n, description=self.name + note)


def write_result(json_: str | None, result) -> None:
    if json_:
        from superweight.io.files import write_json

        write_json(json_, result.model_dump())
        err.print(f"Wrote {json_}")


def check_bos(bos: str = "auto"):
    """The --bos option as the text protocol's one value (io/corpora.Bos), checked before any slow work;
    io/models.load resolves its token on the tokenizer."""
    from superweight.io.corpora import Bos

    return Bos(bos)


def run_bos(path, bos: str | None):
    """--bos for a command that continues a run directory: as given, else what the run's record says its windows
    started with (on when a BOS, off when none, as in records made before --bos existed)."""
    if bos is not None:
        return check_bos(bos)
    from superweight.io.rundir import read_record

    return check_bos("off" if read_record(path).protocol.bos is None else "on")


def placement(device: str = "cpu", dtype: str = "auto", device_map: str | None = None, max_memory: str | None = None,
              offload_folder: str | None = None) -> Placement:
    """The five placement options of a command that loads a model, as one checked Placement (before the load)."""
    from superweight.stages.distributed import process_device

    # under `accelerate launch`, each process's own GPU
    return Placement(device=process_device(device), dtype=dtype, device_map=device_map, max_memory=max_memory,
                     offload_folder=offload_folder)


def load_model(model: str, where: Placement, bos=None):
    """Load a model; say once which dtype `--dtype auto` chose and why (the protocol records it too)."""
    from superweight.io import models

    with err.status(f"Loading {model} ({where.dtype}, {where.where()})..."):
        loaded = models.load(model, where, bos=bos or check_bos())
    if loaded.dtype_reason and "pinned by" not in loaded.dtype_reason:  # a pinned choice needs no explaining
        err.print(f"dtype auto: {loaded.dtype} ({loaded.dtype_reason})", markup=False, highlight=False)
    if where.device_map:
        err.print(f"device map {where.device_map}: {loaded.device}", markup=False, highlight=False)
    return loaded


def recipe_config(recipe: str, **overrides):
    """A recipe's settings with the options given on the command line (None = keep the recipe's)."""
    from superweight.engine.config import recipe_settings

    return recipe_settings(recipe, "--", **{k: v for k, v in overrides.items() if v is not None})


def floats(name: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"invalid {name} '{text}': expected comma-separated numbers") from None
    if any(v <= 0 for v in values):
        raise UsageError(f"{name} strengths must be positive")
    return values


def check_run_dir(run_dir: str):
    """The run directory and the model spec it was made with, checked before any model loads."""
    from pathlib import Path

    from superweight.io.patchfile import load_patch
    from superweight.io.rundir import read_record

    path = Path(run_dir)
    if not path.is_dir():
        raise UsageError(f"no such run directory: {path}")
    read_record(path)  # a missing, damaged or unreadable record fails before the model loads
    return path, load_patch(path).config.spec or DEFAULT_MODEL


def task_spec(tasks: str | None, include_path: str | None, limit: int | None):
    """The checked --tasks (measure.tasks.TaskSpec), or None; fails before any model loads."""
    if tasks is None:
        if include_path is not None or limit is not None:
            raise UsageError("--include-path and --task-limit go with --tasks")
        return None
    from superweight.measure.tasks import prepare_tasks

    with err.status("Finding lm-eval tasks..."):
        return prepare_tasks(tasks, include_path, limit)
