"""The run directory's states and what each allows: new, started, trained, finished (or other files).

    state = check_run_dir_for(out, settings, resume)   # writes nothing; refuses a run that may not start
    prepare_run_dir(out, settings, resume)             # the same, then config.json for a run that starts
    check_new_run_dir(out)                             # `superweight run`: a run is never overwritten

A fresh run takes a new directory, or one whose run stopped before its first checkpoint; `--resume` continues
one with the same settings (config.json). The files themselves are named in io/rundir.py.
"""

from __future__ import annotations

from pathlib import Path

from superweight.errors import UsageError
from superweight.io.files import check_writable, read_json, write_json
from superweight.io.runconfig import RunConfig, parse as parse_settings
from superweight.io.rundir import CHECKPOINT, CONFIG, LOCK, REPORT_HTML, RESULTS


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
