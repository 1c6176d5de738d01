"""The run directory as one object (io/rundir.RunDir): its states, what may start or resume in each, and the text
protocol (--bos) a command that continues a run uses. Files only, no model: the commands on top are test_cli_*'s."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from superweight.errors import SuperweightError, UsageError
from superweight.io.corpora import Bos
from superweight.schema.runconfig import RunConfig
from superweight.io.rundir import CHECKPOINT, REPORT_HTML, RunDir
from superweight.engine.config import RECIPES

V2 = Path(__file__).parent / "data" / "v2" / "run"  # a finished `superweight run` from before --bos: no config.json


def settings(**changes) -> RunConfig:
    return RunConfig(**{"model": "tiny", "recipe": "lbfgs", "config": RECIPES["lbfgs"], "ablate": ["1:5:7"],
                        "rows": [[1, 5]], "corpus": "pydoc", "eval_tokens": 64, "max_length": 64, "baselines": False,
                        "checkpoint_every": 25, **changes})


def test_a_repair_starts_in_a_new_directory_and_resumes_only_with_its_own_settings(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.state() == "new" and run.check_start(settings(), resume=False) == "new" and not run.path.exists()
    assert run.prepare(settings(), resume=False) == "new" and run.state() == "started"
    assert run.config() == settings() and run.bos() == Bos("auto")
    assert run.prepare(settings(seeds=2), resume=False) == "started"  # nothing of value yet: it restarts
    (run.path / CHECKPOINT).parent.mkdir()
    (run.path / CHECKPOINT).write_bytes(b"")
    assert run.state() == "trained"
    with pytest.raises(UsageError, match="already holds a run: pass --resume to continue it"):
        run.check_start(settings(seeds=2), resume=False)
    assert run.check_start(settings(seeds=2), resume=True) == "trained"
    with pytest.raises(UsageError, match=r"--resume with other settings than .*config.json: eval_tokens, seeds differ"):
        run.check_start(settings(eval_tokens=128), resume=True)


def test_a_directory_that_holds_no_run_is_never_written_into(tmp_path):
    other = RunDir(tmp_path / "o")
    other.path.mkdir()
    (other.path / "notes.txt").write_text("mine")
    assert other.state() == "other"
    with pytest.raises(UsageError, match="holds files but no config.json: not a run directory"):
        other.check_start(settings(), resume=True)
    with pytest.raises(UsageError, match="already exists: choose another --out"):
        other.check_run(resume=False)
    with pytest.raises(UsageError, match="no such run directory"):
        RunDir(tmp_path / "missing").check_existing()
    with pytest.raises(SuperweightError, match="no results.json in"):
        other.check_existing()
    file = tmp_path / "f"
    file.write_text("")
    with pytest.raises(UsageError, match="is a file, not a run directory"):
        RunDir(file).state()


def test_a_finished_run_and_its_text_protocol(tmp_path):
    old = RunDir(tmp_path / "old")
    shutil.copytree(V2, old.path)
    assert old.state() == "finished" and old.check_existing() is old
    assert old.record().protocol.bos is None and old.bos() == Bos("off")  # its windows started with no BOS
    assert old.check_run(resume=True) is False  # no report.html: `run --resume` runs its stages again
    (old.path / REPORT_HTML).write_text("")
    assert old.check_run(resume=True) is True  # the report is written last: finished
    mine = RunDir(tmp_path / "mine")
    mine.prepare(settings(bos="on"), resume=False)
    assert mine.bos() == Bos("on") and RunDir(tmp_path / "none").bos() == Bos()  # as started; auto before a run
