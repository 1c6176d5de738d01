"""Nothing about the machine changes a result: the terminal width (the CLI's lines are never wrapped, so what a test
or a log reader looks for is on one line), the dtype `auto` picks, HOME and its caches (conftest.py pins them for
the whole suite, before anything is imported), and bf16 on a CPU that only emulates it says so."""

from __future__ import annotations

import logging
import os

import pytest

from superweight.io import placement
from superweight.io.models import load

pytestmark = pytest.mark.usefixtures("torch_single_thread")

def test_cli_lines_are_the_same_at_any_terminal_width(planted_dir, tmp_path, monkeypatch):
    """COLUMNS sets the width of the CLI's stderr console (made once, at import; stdout is 140 wide when piped):
    at 40 and at 250 columns every line comes out the same, whole. Here with the machine's own `auto` dtype, whose
    reason is longest on a CPU without bf16 (the line a test once looked for in vain there)."""
    from typer.testing import CliRunner

    from superweight.cli import app, err, out

    monkeypatch.delenv(placement.AUTO_ENV)
    missing = tmp_path / ("a-run-directory-whose-path-is-longer-than-a-narrow-terminal-" * 2)
    runs = {}
    for columns in (40, 250):
        monkeypatch.setattr(err, "width", columns)
        runs[columns] = [CliRunner().invoke(app, [str(a) for a in args]) for args in (
            ["eval", "--model", planted_dir, "--ablate", "1:5:7", "--max-tokens", "128", "--max-length", "64"],
            ["analyze", missing])]
    assert out.width == 140 and out.soft_wrap and err.soft_wrap  # piped: wide tables, lines never wrapped
    (narrow, narrow_error), (wide, wide_error) = runs[40], runs[250]
    assert (narrow.exit_code, narrow_error.exit_code) == (0, 2), narrow.output
    assert (narrow.stdout, narrow.stderr, narrow_error.stderr) == (wide.stdout, wide.stderr, wide_error.stderr)
    choice = placement.choose_dtype("cpu")  # the machine's own choice, with nothing pinned
    assert f"dtype auto: {choice[0]} ({choice[1]})" in narrow.stderr.splitlines(), narrow.stderr
    assert narrow_error.stderr == f"Error: no such run directory: {missing}\n"


def test_bf16_on_a_cpu_without_it_warns_once(monkeypatch, planted_dir, caplog):
    monkeypatch.setattr(placement, "cpu_bf16_flag", lambda cpuinfo=None: None)
    with caplog.at_level(logging.WARNING, logger="superweight"):
        load(str(planted_dir), dtype="bf16")
    slow = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert len(slow) == 1 and "slower than fp32" in slow[0] and "\n" not in slow[0], slow
    monkeypatch.setenv(placement.AUTO_ENV, "bf16")  # a pinned auto is the same request
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="superweight"):
        load(str(planted_dir), dtype="auto")
        load(str(planted_dir), dtype="fp32")
    assert sum("emulated" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(placement, "cpu_bf16_flag", lambda cpuinfo=None: "avx512_bf16")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="superweight"):
        load(str(planted_dir), dtype="bf16")
    assert not any("emulated" in r.getMessage() for r in caplog.records)


def test_the_suite_runs_in_a_home_and_dtype_of_its_own():
    import conftest

    assert os.environ["HOME"] == conftest._HOME and os.path.expanduser("~") == conftest._HOME
    assert os.environ[placement.AUTO_ENV] == "fp32" and placement.choose_dtype("cpu")[0] == "fp32"
    assert os.environ["COLUMNS"] == "120" and "TERMINAL_WIDTH" not in os.environ
