"""What every settings model shares: a base that validates on assignment, a re-validating copy, and one error
line from a pydantic ValidationError.

    job = RepairJob(eval_tokens=512)              # validated here, where it is defined
    job = revalidated(job, seeds=3)               # not model_copy(update=...), which skips validation
    error_line(exc, "--")                         # "--eval-tokens must be at least 2, got 1"
    file_error_line(exc, "runs/x/results.json", "a run record", "rerun the command that wrote it")

Settings models raise pydantic's ValidationError for a bad field (the CLI turns it into one `Error:` line and
exit 2, naming the option; the notebook API into a UsageError naming the argument) and UsageError for a bad
combination, with its own text. A ValidationError in what a file holds names the file and the field instead
(file_error_line), never an option; one from any other model is a bug, and the CLI says so (is_settings_error).
The two defaults every layer shares, the CLI's option defaults included, are here too: DEFAULT_MODEL, DEFAULT_CORPUS.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from superweight.errors import UsageError

M = TypeVar("M", bound=BaseModel)

DEFAULT_MODEL = "smollm2-135m"  # the embedded SmolLM2-135M-Instruct (io/models.EMBEDDED)
DEFAULT_CORPUS = "pydoc"  # the standard library's documentation: no download (io/corpora.py)


class Settings(BaseModel):
    """Base of the settings models: unknown fields are an error; frozen, so a change goes through `revalidated`."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def revalidated(model: M, **changes) -> M:
    """`model` with `changes`, validated again (model_copy(update=...) would skip every check). Fields are taken
    as they are (nested models and objects stay themselves); private attributes are not carried over."""
    return type(model).model_validate({**dict(model), **changes})


def build(cls: type[M], base: M | None = None, prefix: str = "", **changes) -> M:
    """`base` (None: the class's defaults) with `changes`, validated; a bad value is one UsageError line that
    names the field as `prefix + name` (prefix "--" for CLI options, "" for API arguments)."""
    unknown = sorted(set(changes) - set(cls.model_fields))
    if unknown:
        raise TypeError(f"unknown {cls.__name__} setting(s): {', '.join(unknown)} (use {', '.join(cls.model_fields)})")
    try:
        return cls.model_validate({**(dict(base) if base is not None else {}), **changes})
    except ValidationError as exc:
        raise UsageError(error_line(exc, prefix)) from None


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def error_line(exc: ValidationError, prefix: str = "--") -> str:
    """A ValidationError's first problem as one line naming the field: "--calib-tokens must be at least 2, got 1",
    "invalid --optimizer 'lion': use 'adamw', 'adam' or 'sgd'" (pydantic's own text names a help URL)."""
    first = exc.errors()[0]
    loc = [str(x) for x in first["loc"] if not isinstance(x, int)]
    name = prefix + ("-".join(loc).replace("_", "-") if prefix else ".".join(loc))
    ctx, value = first.get("ctx") or {}, first.get("input")
    if first["type"] == "greater_than_equal":
        return f"{name} must be at least {_number(ctx['ge'])}, got {_number(value)}"
    if first["type"] == "greater_than":
        return f"{name} must be {'positive' if ctx['gt'] == 0 else 'more than ' + _number(ctx['gt'])}, got {_number(value)}"
    if ctx.get("expected"):
        return f"invalid {name} {value!r}: use {ctx['expected']}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"invalid {name} {value!r}: {msg[0].lower()}{msg[1:]}"


def is_settings_error(exc: ValidationError) -> bool:
    """Whether a settings model (a Settings subclass: options and arguments) raised `exc`, rather than a record."""
    names, todo = set(), [Settings]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return exc.title in names


def _problem(exc: ValidationError) -> tuple[str, str]:
    """The first problem as "loc: message, got VALUE", and "; N more problem(s)" (or "")."""
    first = exc.errors()[0]
    at = ".".join(str(x) for x in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    got = f", got {first['input']!r}" if first["type"] != "missing" and not isinstance(first.get("input"), dict | list) else ""
    more = f"; {exc.error_count() - 1} more problem(s)" if exc.error_count() > 1 else ""
    return f"{at}: {msg[0].lower()}{msg[1:]}{got}", more


def internal_error_line(exc: ValidationError) -> str:
    """A ValidationError from a model superweight filled itself (not from an option or a file): a bug, said so."""
    return f"internal error: superweight made an invalid {exc.title} ({''.join(_problem(exc))}); please report it"


def file_error_line(exc: ValidationError, where: str, what: str, fix: str) -> str:
    """A ValidationError in a file's contents as one line naming the file, the field and what to do:
    "runs/x/results.json: recovery.kl: input should be a valid number, got 'high' (not a run record superweight
    can read: rerun the command that wrote it)"."""
    problem, more = _problem(exc)
    return f"{where}: {problem} (not {what} superweight can read{more}: {fix})"
