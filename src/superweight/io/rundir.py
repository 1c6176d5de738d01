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

    record = read_record(run_dir)          # migrated from older formats, or one clear error
    write_record(run_dir, record)          # atomic
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from superweight.errors import SuperweightError, UsageError
from superweight.io.record import RunRecord, parse

CONFIG = "config.json"
RESULTS = "results.json"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT = "checkpoints/last.pt"
DETECT = "detect.json"
REPORT_MD, REPORT_HTML, PLOTS = "report.md", "report.html", "plots"


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early (before any long work) when `path`'s directory cannot take a file."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"output path '{path}' is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UsageError(f"cannot write to directory '{parent}'")
    return path


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temp file beside `path`, then rename it over `path`: a reader (or a run killed
    mid-write) sees the old file or the new one, never half of either."""
    path = check_writable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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
    """Write indented JSON atomically (see write_atomic)."""
    text = json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n"
    return write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


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


def check_new_run_dir(out: Path) -> None:
    """Refuse a directory that exists and is not empty: a run is never overwritten."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists: choose another --out (a run is never overwritten)")


def prepare_run_dir(out: Path, settings: dict, resume: bool) -> None:
    """Refuse to overwrite another run; on resume, insist on the same settings."""
    config_path = out / CONFIG
    if resume:
        if not config_path.is_file():
            raise UsageError(f"nothing to resume in {out}: no config.json")
        old = json.loads(config_path.read_text(encoding="utf-8"))
        new = json.loads(json.dumps(settings))  # as it would read back from disk (tuples become lists)
        if old != new:
            changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UsageError(f"--resume with other settings than {config_path}: {', '.join(changed)} differ")
        return
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    write_json(config_path, settings)


def read_record(run_dir: str | os.PathLike) -> RunRecord:
    """The run record in RUN_DIR/results.json, lifted to the current schema (io/record.migrate)."""
    run_dir = Path(run_dir)
    path = run_dir / RESULTS
    if not path.is_file():
        raise SuperweightError(f"no results.json in {run_dir}: run `superweight repair --out {run_dir}` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SuperweightError(f"{path} is not valid JSON ({exc}); was the run interrupted while writing?") from None
    return parse(data, str(path))


def write_record(run_dir: str | os.PathLike, record: RunRecord) -> Path:
    """Write RUN_DIR/results.json atomically; parts of stages that have not run are left out."""
    absent = {name for name in RunRecord.model_fields if getattr(record, name) is None}
    return write_json(Path(run_dir) / RESULTS, record.model_dump(exclude=absent))


def read_train_log(run_dir: str | os.PathLike) -> list[dict]:
    """The train log's entries ({step, loss, lr, seconds}); [] when there is none."""
    path = Path(run_dir) / TRAIN_LOG
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a run killed mid-write leaves half a last line; the curve without it is still right
        if isinstance(entry, dict) and "step" in entry and "loss" in entry:
            out.append(entry)
    return out
