"""One writer per directory (a run's, a census's), one converter per cache entry: the OS's advisory locks (filelock:
flock on POSIX, LockFileEx on Windows), which the OS drops when their process ends, however it ends (SIGKILL
included). A run directory takes its lock through io/rundir.RunDir.lock.

    with hold_dir(run_dir, "repair"):      # at once, or RunDirInUseError naming the process that holds it
        ...                                # write into run_dir
    with cache_entry_lock(entry):          # waits while another process converts the same model
        ...

A directory's lock is RUN/.superweight.lock; its holder (pid, host, command, since when) is written beside it
in RUN/.superweight.lock.json for the refusal to name. Both are removed when the holder ends. A killed holder
leaves them behind, but not its lock: the next writer takes it and rewrites the holder file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from filelock import FileLock, Timeout

from superweight.errors import RunDirInUseError, SuperweightError
from superweight.io.files import write_json

LOCK, LOCK_HOLDER = ".superweight.lock", ".superweight.lock.json"  # not part of the run


@contextmanager
def hold_dir(run_dir: str | os.PathLike, command: str) -> Iterator[Path]:
    """Hold RUN_DIR's writer lock for the block (made with the directory when it is missing), or refuse at once
    with one error line: the directory is in use, by which process, since when. A directory that this call made
    (and each missing parent) is removed again at the end if nothing but the lock went into it (a command that
    failed early)."""
    run_dir = Path(run_dir)
    made = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
    lock = _take(run_dir)
    try:
        write_json(run_dir / LOCK_HOLDER, {
            "pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "since": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        })
        yield run_dir
    finally:
        try:
            for name in (LOCK_HOLDER, LOCK):  # while still held: the next writer makes them anew
                with suppress(OSError):
                    (run_dir / name).unlink(missing_ok=True)
            for directory in made:
                with suppress(OSError):
                    directory.rmdir()  # only if empty
        finally:
            lock.release()


def _take(run_dir: Path) -> FileLock:
    """RUN_DIR's lock, taken without waiting. The lock file is removed on release, so a lock taken on a file
    that a finishing holder has just removed is worthless: `pin` keeps the opened file alive, and the lock counts
    only if the path still names that file once it is held (else: try again on the new file)."""
    path = run_dir / LOCK
    for _ in range(10):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            pin = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)
        except FileNotFoundError:
            continue  # the directory went with a holder that had made it and failed early
        except OSError as exc:
            raise SuperweightError(f"cannot lock run directory {run_dir}: {exc.strerror or exc}") from None
        try:
            lock = FileLock(str(path), timeout=0)
            try:
                lock.acquire()
            except Timeout:
                raise RunDirInUseError(_in_use(run_dir)) from None
            except (OSError, NotImplementedError) as exc:  # e.g. a file system without locks (older filelock)
                why = getattr(exc, "strerror", None) or exc
                raise SuperweightError(f"cannot lock run directory {run_dir}: {why}") from None
            with suppress(OSError):
                if os.path.samestat(os.fstat(pin), os.stat(path)):
                    return lock
            lock.release()
        finally:
            os.close(pin)
    raise RunDirInUseError(f"{run_dir} is in use: its lock keeps changing hands; try again")


def _in_use(run_dir: Path) -> str:
    """The refusal: who holds RUN_DIR and since when, as its holder file says (it may not be written yet)."""
    try:
        holder = json.loads((run_dir / LOCK_HOLDER).read_text(encoding="utf-8"))
        who = (f"process {int(holder['pid'])} (superweight {holder['command']}, on {holder['host']}) "
               f"since {str(holder['since']).replace('T', ' ')[:19]}")
    except (OSError, ValueError, TypeError, KeyError):
        who = "another process"
    return f"{run_dir} is in use by {who}; wait for it to finish (one writer per run directory)"


@contextmanager
def cache_entry_lock(entry: Path) -> Iterator[None]:
    """Hold the lock of one converted-model cache entry (ENTRY.lock beside it), waiting for another process that
    converts the same model. A cache that cannot be written gets no lock: the conversion then only fails to be
    kept (io/models._write_cache)."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(f"{entry}.lock")
        lock.acquire()
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()
