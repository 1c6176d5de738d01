"""The run directory as one object: `RunDir` names its files, knows its state and what each allows, holds its writer
lock, and reads and writes its settings, its record, its patch and its text protocol.

RUN_DIR/
  config.json        what was asked (recipe, model, weights, rows, corpus, --bos); a resumed run must match it
  train_log.jsonl    one line per step: step, loss, lr, seconds (io/checkpoint.py reads and writes it)
  checkpoints/last.pt
  patch.safetensors + patch_config.json   (io/patchfile.py)
  results.json       the run record (schema/record.py), which each stage extends (docs/results.md)
  detect.json        the full detection (`superweight run`)
  report.md, report.html, plots/*.png
  .superweight.lock, .superweight.lock.json   while a command writes here (io/lock.py: one writer at a time)

    run = RunDir("runs/x")
    run.check_start(settings, resume)     # writes nothing; refuses a repair that may not start or resume here
    with run.lock("repair"):              # one writer, or RunDirInUseError naming the holder
        run.prepare(settings, resume)     # the same check, then config.json for a repair that starts
        run.write(record)                 # results.json, atomic (io/files.py)
    run.record()                          # migrated from older formats, or one clear error
    run.bos()                             # the text protocol the run used: what a command continuing it uses

A repair starts in a new directory, or one whose run stopped before its first checkpoint; `resume` continues one
with the same settings (config.json). `superweight run` never overwrites a directory (check_new).
Provenance: io/provenance.py.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path

from superweight.core.patching import PatchData
from superweight.errors import SuperweightError, UsageError
from superweight.io.corpora import Bos
from superweight.io.files import check_writable, read_json, write_json
from superweight.io.lock import LOCK, hold_dir
from superweight.schema.migrate import parse
from superweight.schema.record import RunRecord
from superweight.schema.runconfig import RunConfig, parse as parse_settings

CONFIG = "config.json"
RESULTS = "results.json"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT = "checkpoints/last.pt"
DETECT = "detect.json"
REPORT_MD, REPORT_HTML, PLOTS = "report.md", "report.html", "plots"


class RunDir:
    """One run directory (it need not exist yet): its state, lock, settings, record, patch and text protocol."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    # ------------------------------------------------------------------ state
    def holds_files(self) -> bool:
        """Whether the directory holds anything besides a writer's lock (io/lock.py)."""
        return any(not p.name.startswith(LOCK) for p in self.path.iterdir())

    def state(self) -> str:
        """What the directory holds: "new" (absent, empty or only a lock), "started" (config.json, no checkpoint
        yet: nothing of value to lose), "trained" (a checkpoint, no results.json), "finished" (results.json) or
        "other" (files, no config.json)."""
        out = self.path
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out {out} is a file, not a run directory")
        if not out.exists() or not self.holds_files():
            return "new"
        if (out / RESULTS).is_file():
            return "finished"
        if not (out / CONFIG).is_file():
            return "other"
        return "trained" if (out / CHECKPOINT).is_file() else "started"

    def check_new(self) -> None:
        """Refuse a directory that exists and is not empty: a run is never overwritten."""
        out = self.path
        if out.exists() and (not out.is_dir() or self.holds_files()):
            unfinished = (out / CONFIG).is_file() and not (out / REPORT_HTML).is_file()
            hint = "; a killed `run` continues with --resume" if unfinished else ""
            raise UsageError(f"{out} already exists: choose another --out (a run is never overwritten){hint}")
        check_writable(out / CONFIG)  # e.g. --out under a file: refused now, not after the model loads

    def check_start(self, settings: RunConfig, resume: bool) -> str:
        """Check (writing nothing) that a repair with `settings` may start or resume here; returns the state.

        A fresh repair takes a new directory, or one whose run stopped before its first checkpoint (it
        restarts); any other run is never overwritten. `resume` continues from the last checkpoint, from step 0
        when there is none yet, and of a finished run changes nothing; the settings must be the same."""
        out, state = self.path, self.state()
        check_writable(out / CONFIG)
        if state == "other":
            raise UsageError(f"{out} holds files but no {CONFIG}: not a run directory; choose another --out")
        if not resume:
            if state in {"trained", "finished"}:
                raise UsageError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
            return state
        if state == "new":
            return state
        old, new = self.config().model_dump(mode="json"), settings.model_dump(mode="json")
        if old != new:
            changed = sorted(k for k in new if old[k] != new[k])
            raise UsageError(f"--resume with other settings than {out / CONFIG}: {', '.join(changed)} differ")
        return state

    def prepare(self, settings: RunConfig, resume: bool) -> str:
        """`check_start`, then write config.json for a repair that starts (call it once the inputs are known to be
        good, so a late error leaves no directory behind that looks like a run)."""
        state = self.check_start(settings, resume)
        if state in {"new", "started"}:
            write_json(self.path / CONFIG, settings.model_dump(mode="json"))
        return state

    def check_run(self, resume: bool) -> bool:
        """Refuse a directory that `superweight run` may not write into (fresh: a new one; `resume`: a run's);
        True when the run there is finished already (its report written last)."""
        if not resume:
            self.check_new()
            return False
        if self.state() == "other":
            raise UsageError(f"{self.path} holds files but no config.json: not a run directory; choose another --out")
        return (self.path / REPORT_HTML).is_file() and (self.record().timings or {}).get("report") is not None

    def check_existing(self) -> RunDir:
        """Refuse a path that holds no run (a command that studies a finished run), before any model loads."""
        if not self.path.is_dir():
            raise UsageError(f"no such run directory: {self.path}")
        self.record()  # a missing, damaged or unreadable record fails here
        return self

    def lock(self, command: str) -> AbstractContextManager[Path]:
        """Hold the directory's writer lock for a block (made with the directory when missing), or refuse at once
        naming the holder (io/lock.hold_dir)."""
        return hold_dir(self.path, command)

    # ------------------------------------------------------------------ files
    def config(self) -> RunConfig:
        """config.json: the settings the repair was started with (lifted to the current version)."""
        return parse_settings(RunConfig, read_json(self.path / CONFIG, "run settings"), str(self.path / CONFIG))

    def record(self) -> RunRecord:
        """The run record in results.json, lifted to the current schema (schema/migrate.py)."""
        path = self.path / RESULTS
        if not path.is_file():
            raise SuperweightError(f"no results.json in {self.path}: run `superweight repair --out {self.path}` first")
        record = parse(read_json(path, "results"), str(path))
        record._run_dir = self.path
        return record

    def write(self, record: RunRecord) -> Path:
        """Write results.json atomically; parts of stages that have not run are left out."""
        absent = {name for name in RunRecord.model_fields if getattr(record, name) is None}
        record._run_dir = self.path
        return write_json(self.path / RESULTS, record.model_dump(exclude=absent))

    def patch(self) -> PatchData:
        """The patch the repair wrote (patch.safetensors + patch_config.json)."""
        from superweight.io.patchfile import load_patch

        return load_patch(self.path)

    def spec(self, default: str) -> str:
        """The model spec the run was made with (its patch's), else `default`."""
        return self.patch().config.spec or default

    def bos(self) -> Bos:
        """The run's text protocol, what a command continuing it starts every window with: the --bos config.json
        records (the repair's own, which a resume must repeat); for a record made before --bos existed, on when
        its windows started with a BOS and off when none; auto when there is no run yet."""
        config = self.path / CONFIG
        raw = read_json(config, "run settings") if config.is_file() else None
        if isinstance(raw, dict) and "bos" in raw:
            return Bos(self.config().bos)
        if (self.path / RESULTS).is_file():
            return Bos("off" if self.record().protocol.bos is None else "on")
        return Bos(self.config().bos) if raw is not None else Bos()
