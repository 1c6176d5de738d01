"""What every command shares: the app, the consoles, option types, the error boundary, the progress bar (the
library's progress.Progress), the model to load (an api Later: placement, --bos, a status line while it loads), and
the small parsers that check option values. A command builds its settings objects (which validate themselves) and
calls one library function (superweight.api), which checks the rest before it loads the model; the CLI never
imports superweight.io or superweight.stages (tests/test_layout.py)."""

from __future__ import annotations

import functools
import inspect
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
from superweight.settings import DEFAULT_CORPUS, DEFAULT_MODEL  # noqa: F401 (the commands' option defaults)
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
        from superweight.api import write_json

        write_json(json_, result.model_dump())
        err.print(f"Wrote {json_}")


def check_json(*paths: str | None) -> None:
    """Output paths (--json, --plot) that must be writable, checked before any model loads."""
    from superweight.api import check_writable

    for path in filter(None, paths):
        check_writable(path)


def check_bos(bos: str = "auto"):
    """The --bos option as the text protocol's one value (api Bos: io/corpora.Bos), checked before any slow work;
    the model's load resolves its token on the tokenizer."""
    from superweight.api import Bos

    return Bos(bos)


PLACEMENT = {  # the options of every command that loads a model on one or several devices, in this order
    "device": (DeviceOpt, "cpu"), "dtype": (DtypeOpt, "auto"), "device_map": (DeviceMapOpt, None),
    "max_memory": (MaxMemoryOpt, None), "offload_folder": (OffloadOpt, None),
}


def placed(command):
    """Give a command the five placement options (--device, --dtype, --device-map, --max-memory, --offload-folder)
    after its own, and hand them to it as one `where` dict (model_to_load's)."""
    own = inspect.signature(command, eval_str=True)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=kind)
             for name, (kind, default) in PLACEMENT.items()]

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        return command(*args, where={name: kwargs.pop(name) for name in PLACEMENT}, **kwargs)

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own.parameters.values() if p.name != "where"]
    wrapper.__signature__ = own.replace(parameters=params + extra)
    wrapper.__annotations__ = {p.name: p.annotation for p in params + extra}
    return wrapper


def model_to_load(model: str | None, where: dict | None = None, bos: str | None = "auto"):
    """The model a command loads once the library has checked its inputs (api Later): its spec (None: the run's or
    the patch's own), its placement (the options of `placed`, checked now), its --bos (None: the run's own, when
    continuing one), shown while it loads, and the library's notes printed on stderr."""
    from superweight.api import Later, placement

    where = placement(**(where or {}), prefix="--")
    return Later(model, where, None if bos is None else check_bos(bos), load=load_model, note=say)


def say(line: str) -> None:
    err.print(line, markup=False, highlight=False, soft_wrap=True)


def load_model(model: str, where, bos):
    """Load a model; say once which dtype `--dtype auto` chose and why (the protocol records it too)."""
    from superweight.api import load_at

    with err.status(f"Loading {model} ({where.dtype}, {where.where()})..."):
        loaded = load_at(model, where, bos)
    if loaded.dtype_reason and "pinned by" not in loaded.dtype_reason:  # a pinned choice needs no explaining
        err.print(f"dtype auto: {loaded.dtype} ({loaded.dtype_reason})", markup=False, highlight=False)
    if where.device_map:
        err.print(f"device map {where.device_map}: {loaded.device}", markup=False, highlight=False)
    return loaded


def recipe_config(recipe: str, **overrides):
    """A recipe's settings with the options given on the command line (None = keep the recipe's)."""
    from superweight.api import recipe_settings

    return recipe_settings(recipe, "--", **{k: v for k, v in overrides.items() if v is not None})


def floats(name: str, text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise UsageError(f"invalid {name} '{text}': expected comma-separated numbers") from None
    if any(v <= 0 for v in values):
        raise UsageError(f"{name} strengths must be positive")
    return values


def task_spec(tasks: str | None, include_path: str | None, limit: int | None):
    """The checked --tasks (measure.tasks.TaskSpec), or None; fails before any model loads."""
    if tasks is None:
        if include_path is not None or limit is not None:
            raise UsageError("--include-path and --task-limit go with --tasks")
        return None
    from superweight.measure.tasks import prepare_tasks

    with err.status("Finding lm-eval tasks..."):
        return prepare_tasks(tasks, include_path, limit)
