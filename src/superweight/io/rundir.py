"""The run directory: the one place that names its files, reads and writes the run record, writes atomically
and stamps provenance.

RUN_DIR/
  config.json        what was asked (recipe, model, weights, rows, corpus); a resumed run must match it
  train_log.jsonl    one line per step: step, loss, lr, seconds
  checkpoints/last.pt
  patch.safetensors + patch_config.json   (io/patchfile.py)
  results.json       the run record (io/record.py), which each stage extends (docs/results.md)
  detect.json        the full detection (`superweight run`)
  report.md, report.html, plots/*.png
  .superweight.lock, .superweight.lock.json   while a command writes here (io/lock.py: one writer at a time)

    record = read_record(run_dir)          # migrated from older formats, or one clear error
    write_record(run_dir, record)          # atomic
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import logging
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from superweight.errors import SuperweightError, UsageError
from superweight.io.migrate import parse
from superweight.io.runconfig import RunConfig, parse as parse_settings
from superweight.io.record import RunRecord

CONFIG = "config.json"
RESULTS = "results.json"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT = "checkpoints/last.pt"
DETECT = "detect.json"
REPORT_MD, REPORT_HTML, PLOTS = "report.md", "report.html", "plots"
LOCK, LOCK_HOLDER = ".superweight.lock", ".superweight.lock.json"  # io/lock.py; not part of the run
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


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None  # provenance probes never break a run


def provenance() -> dict:
    """Versions, date and git hash for the record."""
    import torch
    import transformers

    from superweight import __version__

    return {
        "superweight": __version__,
        "git": _git_hash(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def holds_files(out: Path) -> bool:
    """Whether the directory `out` holds anything besides a writer's lock (io/lock.py)."""
    return any(not p.name.startswith(LOCK) for p in out.iterdir())


def check_new_run_dir(out: Path) -> None:
    """Refuse a directory that exists and is not empty: a run is never overwritten."""
    if out.exists() and (not out.is_dir() or holds_files(out)):
        unfinished = (out / CONFIG).is_file() and not (out / REPORT_HTML).is_file()
        hint = "; a killed `run` continues with --resume" if unfinished else ""
        raise UsageError(f"{out} already exists: choose another --out (a run is never overwritten){hint}")
    check_writable(out / CONFIG)  # e.g. --out under a file: refused now, not after the model loads


def run_state(out: Path) -> str:
    """What a run directory holds, for the rules of `check_run_dir_for`:
    "new" (absent, empty or only a lock), "started" (config.json, no checkpoint yet: nothing of value to lose),
    "trained" (a checkpoint, no results.json), "finished" (results.json) or "other" (files, no config.json)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a run directory")
    if not out.exists() or not holds_files(out):
        return "new"
    if (out / RESULTS).is_file():
        return "finished"
    if not (out / CONFIG).is_file():
        return "other"
    return "trained" if (out / CHECKPOINT).is_file() else "started"


def check_run_dir_for(out: Path, settings: RunConfig, resume: bool) -> str:
    """Check (writing nothing) that a run with `settings` may start or resume in `out`; returns its state.

    A fresh run takes a new directory, or one whose run stopped before its first checkpoint (it restarts);
    any other run is never overwritten. `--resume` continues from the last checkpoint, from step 0 when
    there is none yet, and of a finished run changes nothing; the settings must be the same."""
    state = run_state(out)
    check_writable(out / CONFIG)
    if state == "other":
        raise UsageError(f"{out} holds files but no {CONFIG}: not a run directory; choose another --out")
    if not resume:
        if state in {"trained", "finished"}:
            raise UsageError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        return state
    if state == "new":
        return state
    old = parse_settings(RunConfig, read_json(out / CONFIG, "run settings"), str(out / CONFIG)).model_dump(mode="json")
    new = settings.model_dump(mode="json")
    if old != new:
        changed = sorted(k for k in new if old[k] != new[k])
        raise UsageError(f"--resume with other settings than {out / CONFIG}: {', '.join(changed)} differ")
    return state


def prepare_run_dir(out: Path, settings: RunConfig, resume: bool) -> str:
    """`check_run_dir_for`, then write config.json for a run that starts (call it once the inputs are known
    to be good, so a late error leaves no directory behind that looks like a run)."""
    state = check_run_dir_for(out, settings, resume)
    if state in {"new", "started"}:
        write_json(out / CONFIG, settings.model_dump(mode="json"))
    return state


def read_record(run_dir: str | os.PathLike) -> RunRecord:
    """The run record in RUN_DIR/results.json, lifted to the current schema (io/migrate.py)."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS
    if not path.is_file():
        raise SuperweightError(f"no results.json in {run_dir}: run `superweight repair --out {run_dir}` first")
    record = parse(read_json(path, "results"), str(path))
    record._run_dir = run_dir
    return record


def write_record(run_dir: str | os.PathLike, record: RunRecord) -> Path:
    """Write RUN_DIR/results.json atomically; parts of stages that have not run are left out."""
    absent = {name for name in RunRecord.model_fields if getattr(record, name) is None}
    record._run_dir = Path(run_dir)
    return write_json(Path(run_dir) / RESULTS, record.model_dump(exclude=absent))


def read_train_log(run_dir: str | os.PathLike) -> list[dict]:
    """The train log's entries ({step, loss, lr, seconds}); [] when there is none."""
    path = Path(run_dir) / TRAIN_LOG
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves half a last line; the curve without it is still right
        if isinstance(entry, dict) and isinstance(entry.get("step"), int) and "loss" in entry:
            out.append(entry)
    return out
