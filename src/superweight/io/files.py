"""Writing files so that no reader sees half of one: atomic writes, strict JSON, and reading JSON back.

    write_json(path, data)                  # indented, strict (NaN -> null, with a warning), atomic
    write_atomic(path, lambda tmp: ...)     # any writer: a temp file beside `path`, then a rename
    read_json(path, "run settings")         # a missing or damaged file is one error line
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from superweight.errors import SuperweightError, UsageError

log = logging.getLogger("superweight")


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any long work) when `path` cannot become a file: it is a directory, or its
    nearest existing ancestor is a file or not writable (missing directories are made when writing)."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"output path '{path}' is a directory")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"cannot write '{path}': '{parent}' is a file, not a directory")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to directory '{parent}'")
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp file beside `path`, then rename it over `path`: a reader (or a run killed
    mid-write) sees the old file or the new one, never half of either."""
    path = check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):  # left by a writer that was killed
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results and reports are for sharing
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, data) -> Path:
    """Write indented, strict JSON atomically (see write_atomic). JSON has no NaN or infinity: such a value
    is written as null and named in a warning (readers and docs/results.md say what null means)."""
    nulled: list[str] = []
    text = json.dumps(_finite(data, "", nulled), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    if nulled:
        log.warning("superweight: %s: %s not finite, written as null", path, ", ".join(nulled))
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _finite(value, where: str, nulled: list[str]):
    """`value` with every NaN / infinite float replaced by None (their paths appended to `nulled`)."""
    if isinstance(value, float) and not math.isfinite(value):
        nulled.append(f"{where or 'value'} ({value})")
        return None
    if isinstance(value, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), nulled) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v, f"{where}[{i}]", nulled) for i, v in enumerate(value)]
    return value


def read_json(path: str | os.PathLike, what: str = "file"):
    """Parsed JSON of a run-directory file; a missing, unreadable or damaged one is one error line."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuperweightError(f"{path} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SuperweightError(f"{path} is not valid JSON ({exc}); was the run interrupted while writing?") from None
    except OSError as exc:
        raise SuperweightError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
