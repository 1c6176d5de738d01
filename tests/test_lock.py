"""One writer per run directory (io/lock.py). While another process holds a run directory, every command that
writes one (repair, run, analyze, sparsify, report, and --resume) is refused in one line that names the holder,
before its model loads, and changes nothing; two real `repair`s into one --out give one finished run and one
refusal; a SIGKILLed holder never blocks the next writer; readers need no lock and never see half a file; two
processes converting the same GGUF convert it once and both load it."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import hold_elsewhere
from typer.testing import CliRunner

from superweight.cli import app
from superweight.io.checkpoint import read_train_log
from superweight.io.lock import LOCK, LOCK_HOLDER
from superweight.io.rundir import RunDir

pytestmark = pytest.mark.usefixtures("torch_single_thread")
TESTS_DIR = Path(__file__).resolve().parent
STEPS = 4
REPAIR = ["repair", "--recipe", "balanced", "--weight", "1:5:7", "--steps", str(STEPS), "--batch-size", "2", "--seq-len", "32",
          "--eval-tokens", "128", "--checkpoint-every", "2", "--dtype", "fp32"]
RUN = ["--weight", "1:5:7", "--steps", "2", "--eval-tokens", "128", "--analysis-tokens", "128", "--no-baselines",
       "--dtype", "fp32"]
# command -> its arguments; {run}: a finished repair run, {new}: a directory a fresh run has just made
WRITERS = {
    "repair": [*REPAIR, "--model", "{model}", "--out", "{new}"],
    "repair --resume": [*REPAIR, "--model", "{model}", "--out", "{run}", "--resume"],
    "run": ["run", "--model", "{model}", *RUN, "--out", "{new}"],
    "run --resume": ["run", "--model", "{model}", *RUN, "--out", "{run}", "--resume"],
    "analyze": ["analyze", "{run}", "--tokens", "64", "--draws", "1"],
    "sparsify": ["sparsify", "{run}", "--l1", "1", "--l0", "", "--steps", "2", "--tokens", "64"],
    "report": ["report", "{run}"],
}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _invoke(args, **places):
    return CliRunner().invoke(app, [a.format(**places) for a in args])


@pytest.fixture(scope="module")
def finished(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lock") / "finished"
    result = _invoke([*REPAIR, "--model", str(tiny_model_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert not (out / LOCK).exists() and not (out / LOCK_HOLDER).exists()  # the lock goes with its holder
    return out


@pytest.fixture(scope="module")
def held(finished, tmp_path_factory):
    """A copy of the finished run and a new directory, both held by another process."""
    root = tmp_path_factory.mktemp("held")
    run, new = root / "run", root / "new"
    shutil.copytree(finished, run)
    proc = hold_elsewhere(run, new)
    yield {"run": run, "new": new, "pid": proc.pid}
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("command", WRITERS)
def test_a_second_writer_is_refused_in_one_line_before_its_model_loads(command, held, tiny_model_dir, monkeypatch):
    import superweight.io.models as models

    def no_load(*_a, **_k):
        raise AssertionError("the model loaded before the refusal")

    monkeypatch.setattr(models, "load", no_load)
    before = {name: _hashes(held[name]) for name in ("run", "new")}
    result = _invoke(WRITERS[command], model=str(tiny_model_dir), run=held["run"], new=held["new"])
    target = held["new"] if "{new}" in WRITERS[command] else held["run"]
    assert result.exit_code == 1, result.output
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output, result.stderr
    assert result.stderr.startswith(
        f"Error: {target} is in use by process {held['pid']} (superweight repair, on {socket.gethostname()}) since "
    ), result.stderr
    assert "wait for it to finish" in result.stderr
    for name, hashes in before.items():
        assert _hashes(held[name]) == hashes, f"{command} changed {name}"


def test_readers_need_no_lock(held):
    result = CliRunner().invoke(app, ["compare", str(held["run"])])
    assert result.exit_code == 0, result.output
    assert RunDir(held["run"]).record().training.steps == STEPS


def test_a_sigkilled_holder_never_blocks_the_next_writer(finished, tiny_model_dir, tmp_path):
    run, new = tmp_path / "run", tmp_path / "new"
    shutil.copytree(finished, run)
    proc = hold_elsewhere(run, new)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (run / LOCK).exists() and json.loads((run / LOCK_HOLDER).read_text())["pid"] == proc.pid  # left behind
    result = _invoke(WRITERS["report"], run=run)
    assert result.exit_code == 0, result.output
    assert (run / "report.html").is_file() and not (run / LOCK).exists() and not (run / LOCK_HOLDER).exists()
    result = _invoke(WRITERS["repair"], model=str(tiny_model_dir), new=new)  # holds nothing but the stale lock
    assert result.exit_code == 0, result.output
    assert (new / "patch.safetensors").read_bytes() == (finished / "patch.safetensors").read_bytes()
    assert not (new / LOCK).exists()


def test_a_run_that_fails_early_leaves_no_directory(tiny_model_dir, tmp_path):
    out = tmp_path / "runs" / "x"
    result = _invoke([*REPAIR, "--model", str(tiny_model_dir), "--weight", "9:0:0", "--out", str(out)])
    assert result.exit_code == 2 and "out of range" in result.stderr
    assert not (tmp_path / "runs").exists()  # made for the lock, removed with it


# A real `superweight repair` that stops while loading its model (holding the lock) until told to go on.
PAUSED = textwrap.dedent("""
    import sys, time
    from pathlib import Path

    import superweight.io.models as models
    from superweight.cli import app

    loading, go, args = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    original = models.load


    def load(*a, **k):
        loading.touch()
        while not go.exists():
            time.sleep(0.02)
        return original(*a, **k)


    models.load = load
    app(args, prog_name="superweight")
""")


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300  # a guard against a hang, not a measurement
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_two_repairs_into_one_directory_give_one_run_and_one_refusal(tiny_model_dir, tmp_path):
    out = tmp_path / "runs" / "x"
    args = [*REPAIR, "--model", str(tiny_model_dir), "--out", str(out)]
    first = subprocess.Popen([sys.executable, "-c", PAUSED, str(tmp_path / "loading"), str(tmp_path / "go"), *args],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(tmp_path / "loading", first)
        second = subprocess.run([sys.executable, "-m", "superweight.cli", *args], capture_output=True, text=True,
                                timeout=300)
        lines = second.stderr.splitlines()
        assert second.returncode == 1 and len(lines) == 1, second.stderr
        assert lines[0].startswith(
            f"Error: {out} is in use by process {first.pid} (superweight repair, on {socket.gethostname()}) since ")
        (tmp_path / "go").touch()
        stdout, stderr = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, stderr
    assert [e["step"] for e in read_train_log(out)] == list(range(1, STEPS + 1))  # each step once
    assert RunDir(out).record().training.steps == STEPS
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no lock, no temp file


WRITER = textwrap.dedent("""
    import sys
    from superweight.io.rundir import RunDir
    from superweight.settings import revalidated

    run = sys.argv[1]
    record = RunDir(run).record()
    other = revalidated(record, timings={f"stage{i}": float(i) for i in range(200)})
    for i in range(300):
        RunDir(run).write(other if i % 2 else record)
""")


def test_a_reader_never_sees_half_a_file(finished, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(run)], stderr=subprocess.PIPE, text=True)
    reads = 0
    while writer.poll() is None or reads == 0:
        RunDir(run).record()  # a torn or missing results.json would raise
        reads += 1
    assert writer.wait() == 0, writer.stderr.read()


# Two processes load the same GGUF with an empty cache. The "conversion" (transformers' GGUF reader, stood in
# for by the tiny model directory) of whichever comes first waits until the other has asked for the entry's lock
# (or, were there no lock, has started converting too): exactly one may convert.
CONVERT = textwrap.dedent("""
    import hashlib, json, sys, time
    from contextlib import contextmanager
    from pathlib import Path

    import superweight.io.models as models

    gguf, tiny_dir, marks, me = sys.argv[1], sys.argv[2], Path(sys.argv[3]), sys.argv[4]
    other = "b" if me == "a" else "a"
    from_pretrained, entry_lock = models._from_pretrained, models.cache_entry_lock


    def converted(where, gguf_file, *a, **k):
        if gguf_file is None:  # reading the cache
            return from_pretrained(where, gguf_file, *a, **k)
        (marks / f"convert-{me}").touch()
        while not ((marks / f"waiting-{other}").exists() or (marks / f"convert-{other}").exists()):
            time.sleep(0.02)
        return from_pretrained(tiny_dir, None, *a, **k)


    @contextmanager
    def announced(entry):
        (marks / f"waiting-{me}").touch()
        with entry_lock(entry):
            yield


    models._from_pretrained, models.cache_entry_lock = converted, announced
    loaded = models.load(gguf)
    digest = hashlib.sha256()
    for name, tensor in sorted(loaded.model.state_dict().items()):
        digest.update(name.encode() + tensor.numpy().tobytes())
    print(json.dumps({"cache": loaded.cache, "weights": digest.hexdigest()}))
""")


def test_two_processes_converting_one_gguf_convert_it_once(tiny_model_dir, tmp_path, monkeypatch):
    from superweight.io.models import gguf_cache_dir

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in: only its hash matters here")
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("SUPERWEIGHT_CACHE", str(tmp_path / "cache"))
    stale = gguf_cache_dir(gguf).with_name(f".{gguf_cache_dir(gguf).name}.killed")  # a killed converter's temp copy
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{")
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(gguf), str(tiny_model_dir), str(marks), me],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in "ab"]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert len(list(marks.glob("convert-*"))) == 1  # one converted, the other waited and read the cache
    assert sorted(r["cache"] is None for r in results) == [False, True]
    assert results[0]["weights"] == results[1]["weights"]
    entries = list((tmp_path / "cache" / "gguf").iterdir())
    assert sorted(p.name.endswith(".lock") for p in entries) == [False, True]  # the entry and its lock, no temp copy
    assert not stale.exists()
    entry = next(p for p in entries if not p.name.endswith(".lock"))
    assert {"config.json", "model.safetensors"} <= {p.name for p in entry.iterdir()}
