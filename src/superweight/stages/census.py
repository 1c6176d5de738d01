"""A census: `detect` on each of many models, one model in memory at a time, into one table that resumes.

    hooks = CensusHooks(load=load, detect=detect, tables=report.census.tables)     # the caller's pieces
    outcome = run_census(["smollm2-135m", "gemma3-270m"], Path("runs/census"), settings, hooks)

A census directory holds

    config.json                    the census settings (detection, dtype, BOS): every run on the directory uses them
    models/<slug>/census.json      one model's result (or its error), written atomically as soon as it is done
    census.csv, census.md          the table over every model in the directory, rewritten after each model

A model whose census.json says "done" is skipped by a later run on the same directory; a model that failed is tried
again. Each model's slot is held with the run-directory lock (io/lock.py) while it is detected, so several
processes (a job array, one model per job) can share one directory: two never detect the same model at once, and
the tables, written under the directory's own lock, list every model any of them finished.
"""

from __future__ import annotations

import datetime as _dt
import gc
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from superweight.display import num
from superweight.errors import RunDirInUseError, SuperweightError, UsageError
from superweight.io.files import check_writable, read_json, write_atomic, write_json
from superweight.io.lock import LOCK, hold_dir
from superweight.io.provenance import provenance
from superweight.io.rundir import CONFIG
from superweight.settings import error_line as settings_error_line
from superweight.settings import internal_error_line, is_settings_error

MODELS, RECORD = "models", "census.json"
Tables = Callable[[list], tuple[str, str]]  # rows -> (CSV text, Markdown text): report/census.tables
CENSUS_CSV, CENSUS_MD = "census.csv", "census.md"
FORMAT = 1  # config.json's "census" field: the layout above
LOCK_WAIT_S = 300.0  # how long a run waits for another one that is writing the tables (a few seconds each)
GRADE_WORDS = {"super weight": "super", "sensitive weight": "sensitive", "none": "none"}


class CensusRow(BaseModel):
    """One model's line of the table (report/census.py renders it as CSV, Markdown and a rich table)."""

    model: str = Field(description="the model spec as given")
    status: Literal["done", "error", "pending", "busy"] = Field(
        description="done; error (the model could not be loaded or detected); pending (no result yet); busy (another "
                    "process is detecting it: the terminal's word for pending)")
    coordinates: list[str] = Field(default_factory=list, description="LAYER:ROW:COL of the super weights found, "
                                   "else of the most damaging verified weight; most damaging first")
    kl: list[float | None] = Field(default_factory=list, description="KL(base || that weight zeroed), nats/token")
    ppl_ratio: list[float | None] = Field(default_factory=list, description="PPL with it zeroed / base PPL")
    layers: list[int] = Field(default_factory=list, description="each coordinate's layer")
    n_layers: int | None = Field(None, description="the model's number of layers (down-projections)")
    grade: str = Field("none", description="super, sensitive or none (measure/grade.py), or error")
    known: str = Field("not listed", description="against known.py: match (every published coordinate found as a "
                       "super weight), differs, or not listed")
    published: list[str] = Field(default_factory=list, description="known.py's coordinates for the spec")
    error: str | None = None
    seconds: float | None = Field(None, description="wall time of load + detect")
    finished: str | None = None


class CensusOutcome(BaseModel):
    rows: list[CensusRow] = Field(description="every model in the directory: this run's first, in the order given")
    detected: list[str] = Field(default_factory=list, description="models detected by this run")
    skipped: list[str] = Field(default_factory=list, description="models already done in the directory")
    busy: list[str] = Field(default_factory=list, description="models another process was detecting")
    failed: list[str] = Field(default_factory=list, description="models of this run that ended in an error")
    tables_written: bool = True
    out: Path | None = Field(None, description="the census directory")


def model_slug(spec: str) -> str:
    """A file-name-safe, collision-free directory name for a model spec (readable part + hash of the spec)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("._-")[-60:] or "model"
    return f"{readable}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"


def read_models_file(path: str | os.PathLike) -> list[str]:
    """Model specs from a file: one a line; blank lines and `#` comments (whole-line or after a space) skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no such models file: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read models file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    specs = []
    for line in text.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            specs.append(line)
    return specs


def unique(specs: list[str]) -> list[str]:
    return list(dict.fromkeys(s.strip() for s in specs if s.strip()))


def census_settings(cfg, dtype: str, bos) -> dict:
    """What a census directory records and every later run on it must match: the DetectConfig `cfg`'s fields, the
    --dtype as given and the --bos mode (io/corpora.Bos)."""
    return {**cfg.model_dump(), "dtype": dtype, "bos": bos.mode}


def check_census_dir(out: Path, settings: dict) -> None:
    """Refuse (one UsageError) an --out that cannot hold this census: a file, an unwritable place, a directory
    that holds something other than a census, or a census made with other settings. Writes nothing."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    check_writable(out / CONFIG)
    if not out.exists() or all(p.name.startswith(LOCK) for p in out.iterdir()):
        return
    if not (out / CONFIG).is_file():
        raise UsageError(f"{out} holds files but no {CONFIG}: not a census directory; choose another --out")
    old = read_config(out)
    new = _as_read_back(settings)
    if old.get("settings") != new:
        before = old.get("settings") if isinstance(old.get("settings"), dict) else {}
        changed = sorted(k for k in set(before) | set(new) if before.get(k) != new.get(k))
        raise UsageError(f"{out} holds a census made with other settings ({', '.join(changed)} differ): "
                         "use the same options to resume it, or choose another --out")


def read_config(out: Path) -> dict:
    """A census directory's config.json; a UsageError when `out` holds another command's."""
    config = read_json(out / CONFIG, "census settings")
    if not isinstance(config, dict) or config.get("census") != FORMAT:
        raise UsageError(f"{out} is not a census directory ({out / CONFIG} is another command's); "
                         "choose another --out")
    return config


def _as_read_back(data):
    import json

    return json.loads(json.dumps(data))  # tuples become lists, as the settings read back from config.json


@contextmanager
def holding(out: Path, wait_s: float | None = None) -> Iterator[None]:
    """The census directory's lock, waiting (up to `wait_s`, default LOCK_WAIT_S) for another process that holds
    it: census runs only hold it to check the settings or rewrite the tables, never while a model is detected."""
    deadline = time.monotonic() + (LOCK_WAIT_S if wait_s is None else wait_s)
    with ExitStack() as stack:
        while True:
            try:
                stack.enter_context(hold_dir(out, "census"))
                break
            except RunDirInUseError:
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)
        yield


def start(out: Path, settings: dict) -> None:
    """Check --out (see check_census_dir) and, under its lock, record the settings of a new census."""
    check_census_dir(out, settings)
    with holding(out):
        check_census_dir(out, settings)  # again: another process may have started it meanwhile
        if not (out / CONFIG).is_file():
            write_json(out / CONFIG, {"census": FORMAT, "settings": settings, "provenance": provenance()})


def table_only(out: Path, specs: list[str], tables: Tables) -> list[CensusRow]:
    """Rewrite the tables from the records in `out` (specs first, in order; then the others), detecting nothing:
    the merge after a job array, or a look at a census still running. `tables(rows)`: (CSV, Markdown) texts."""
    if not (out / CONFIG).is_file():
        raise UsageError(f"no census in {out} (no {CONFIG}): run `superweight census MODEL... --out {out}` first")
    read_config(out)
    with holding(out):
        rows = collect(out, specs)
        write_tables(out, rows, tables)
    return rows


def read_record(slot: Path) -> dict | None:
    """A model slot's census.json, or None when there is none (or it cannot be read: the model is then redone)."""
    try:
        data = read_json(slot / RECORD, "census record")
    except SuperweightError:
        return None
    return data if isinstance(data, dict) else None


def is_done(record: dict | None, spec: str) -> bool:
    return bool(record) and record.get("status") == "done" and record.get("spec") == spec


def detect_one(spec: str, load: Callable, detect: Callable, settings: dict) -> dict:
    """Load, detect and free one model; its census record (status done, or error with one line)."""
    from superweight.core.arch import down_projections

    began = time.perf_counter()
    loaded = None
    try:
        loaded = load(spec)
        n_layers = len(down_projections(loaded.model))
        result = detect(loaded)
        record = {
            "status": "done", "source": loaded.source, "dtype": loaded.dtype, "device": str(loaded.device),
            "n_layers": n_layers, "detect": result.model_dump(),
        }
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # any model's failure is its row, never the census's end
        if os.environ.get("SUPERWEIGHT_DEBUG"):
            raise
        record = {"status": "error", "error": error_line(exc)}
    loaded = None  # the only reference: the model goes before the next one loads (the traceback went with `exc`)
    free_memory()
    return {
        "spec": spec, **record, "settings": settings, "seconds": round(time.perf_counter() - began, 1),
        "finished": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "provenance": provenance(),
    }


def error_line(exc: BaseException) -> str:
    """A model's failure as its row's one line; a pydantic error names the setting, or the record and field."""
    if isinstance(exc, ValidationError):
        if is_settings_error(exc):
            return settings_error_line(exc, "")
        return internal_error_line(exc)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, SuperweightError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def summarize(record: dict) -> CensusRow:
    """A census record (a model slot's census.json) as its table row."""
    from superweight.known import published

    spec = record.get("spec", "?")
    known = [str(c) for c in published(spec)]
    common = {"model": spec, "published": known, "seconds": record.get("seconds"),
              "finished": record.get("finished")}
    if record.get("status") != "done":
        return CensusRow(**common, status="error", grade="error", known="-",
                         error=record.get("error") or "unknown error")
    candidates = (record.get("detect") or {}).get("candidates") or []
    verified = [c for c in candidates if c.get("kl") is not None]
    supers = [c for c in verified if c.get("grade") == "super weight"]
    sensitive = [c for c in verified if c.get("grade") == "sensitive weight"]
    shown = supers or sensitive[:1] or verified[:1]
    grade = GRADE_WORDS.get(shown[0].get("grade"), "none") if shown else "none"
    coords = [f"{c['layer']}:{c['row']}:{c['col']}" for c in shown]
    if not known:
        agreement = "not listed"
    else:
        found = {f"{c['layer']}:{c['row']}:{c['col']}" for c in supers}
        agreement = "match" if set(known) <= found else "differs"
    return CensusRow(
        **common, status="done", coordinates=coords, kl=[c.get("kl") for c in shown],
        ppl_ratio=[c.get("ppl_ratio") for c in shown], layers=[c["layer"] for c in shown],
        n_layers=record.get("n_layers"), grade=grade, known=agreement,
    )


def collect(out: Path, order: list[str], busy: list[str] = ()) -> list[CensusRow]:
    """Every model of the census directory as rows: those of `order` first, in that order (one without a record
    as a placeholder: busy when another process holds it, else pending), then the directory's other models (other
    runs', other jobs') by name."""
    records: dict[str, dict] = {}
    for path in sorted((out / MODELS).glob(f"*/{RECORD}")):
        record = read_record(path.parent)
        if record and isinstance(record.get("spec"), str):
            records[record["spec"]] = record
    rows = []
    for spec in order:
        if spec in records:
            rows.append(summarize(records.pop(spec)))
        elif spec in busy:
            rows.append(CensusRow(model=spec, status="busy", grade="-", known="-",
                                  error="being detected by another process"))
        else:
            rows.append(CensusRow(model=spec, status="pending", grade="-", known="-", error="not detected yet"))
    rows += [summarize(records[spec]) for spec in sorted(records)]
    return rows


def write_tables(out: Path, rows: list[CensusRow], tables: Tables) -> None:
    csv_text, md_text = tables(rows)
    write_atomic(out / CENSUS_CSV, lambda tmp: tmp.write_text(csv_text, encoding="utf-8"))
    write_atomic(out / CENSUS_MD, lambda tmp: tmp.write_text(md_text, encoding="utf-8"))


def refresh_tables(out: Path, order: list[str], tables: Tables) -> None:
    """Re-read every model record and rewrite the tables, under the directory's lock (so that of two processes
    finishing at once, the later writer's tables hold both)."""
    with holding(out):
        write_tables(out, collect(out, order), tables)


@dataclass(frozen=True)
class CensusHooks:
    """What the caller brings to a census: `load(spec)` returns a loaded model (io/models.Loaded), `detect(loaded)`
    its DetectResult (the CLI gives both its progress displays), `tables(rows)` the (CSV, Markdown) texts of the
    table (report/census.tables: the stage writes them, the report draws them), and `note(event, spec, text)`
    hears of each model: "skip", "busy", "start", "done" or "error"."""

    load: Callable
    detect: Callable
    tables: Tables
    note: Callable[[str, str, str], None] | None = None


def run_census(specs: list[str], out: Path, settings: dict, hooks: CensusHooks) -> CensusOutcome:
    """Detect each model of `specs` not yet done in `out`, one at a time; return the table. Call
    `start(out, settings)` first."""
    load, detect, tables = hooks.load, hooks.detect, hooks.tables
    note = hooks.note or (lambda *_: None)
    outcome = CensusOutcome(rows=[])
    for i, spec in enumerate(specs, 1):
        where = f"[{i}/{len(specs)}]"
        slot = out / MODELS / model_slug(spec)
        prior = read_record(slot)
        if is_done(prior, spec):
            outcome.skipped.append(spec)
            note("skip", spec, f"{where} {spec}: done in an earlier run ({prior.get('finished', '?')}), skipped")
            continue
        try:
            with hold_dir(slot, "census"):
                prior = read_record(slot)  # another process may have finished it while this one looked
                if is_done(prior, spec):
                    outcome.skipped.append(spec)
                    note("skip", spec, f"{where} {spec}: done by another run ({prior.get('finished', '?')}), "
                                       "skipped")
                    continue
                note("start", spec, f"{where} {spec}")
                record = detect_one(spec, load, detect, settings)
                write_json(slot / RECORD, record)
        except RunDirInUseError:
            outcome.busy.append(spec)
            note("busy", spec, f"{where} {spec}: another process is detecting it, skipped")
            continue
        row = summarize(record)
        if row.status == "error":
            outcome.failed.append(spec)
            note("error", spec, f"{spec}: {row.error}")
        else:
            outcome.detected.append(spec)
            note("done", spec, f"{where} {spec}: {done_line(row)}")
        if i < len(specs):  # the tables follow each model (the last one's come just below)
            _try_refresh(out, specs, outcome, tables)
    _try_refresh(out, specs, outcome, tables)
    outcome.rows = collect(out, specs, outcome.busy)  # the files hold finished models; the terminal also the busy
    return outcome


def _try_refresh(out: Path, specs: list[str], outcome: CensusOutcome, tables: Tables) -> None:
    try:
        refresh_tables(out, specs, tables)
        outcome.tables_written = True
    except RunDirInUseError:  # the records are safe; the next run (or the other process) writes the tables
        outcome.tables_written = False


def done_line(row: CensusRow) -> str:
    if not row.coordinates:
        return "no candidate"
    what = {"super": "super weight", "sensitive": "most damaging weight, sensitive"}.get(
        row.grade, "most damaging weight, grade none")
    return (f"{', '.join(row.coordinates)} ({what}; KL {num(row.kl[0], 3)}, PPL x{num(row.ppl_ratio[0], 2)}), "
            f"{row.seconds or 0:.0f} s")
