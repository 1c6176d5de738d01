"""`superweight census` on tiny model directories: the table, resuming, a bad model among good ones, bad input."""

from __future__ import annotations

import csv
import json
import shutil

import pytest
from typer.testing import CliRunner

from superweight.cli import app
from superweight.stages import census as stage
from superweight.stages import detect as detect_stage

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()
SMALL = ["--calib-tokens", "256", "--max-length", "64", "--max-candidates", "2", "--attribution-top", "1"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def rows(out) -> list[dict]:
    with open(out / stage.CENSUS_CSV, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def record_path(out, spec):
    return out / stage.MODELS / stage.model_slug(str(spec)) / stage.RECORD


def error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("Error:")]


@pytest.fixture
def detections(monkeypatch) -> list[str]:
    """The specs `run_detect` is called on from now on (it still runs)."""
    calls = []
    real = detect_stage.run_detect

    def counted(loaded, *args, **kwargs):
        calls.append(loaded.spec)
        return real(loaded, *args, **kwargs)

    monkeypatch.setattr(detect_stage, "run_detect", counted)
    return calls


@pytest.fixture(scope="module")
def census_dir(planted_dir, tiny_model_dir, tmp_path_factory):
    """A census of the planted model (super weight 1:5:7 in 6 layers) and a plain tiny llama (2 layers)."""
    out = tmp_path_factory.mktemp("census") / "c"
    result = invoke("census", planted_dir, tiny_model_dir, "--out", out, *SMALL)
    assert result.exit_code == 0, (result.output, result.exception)
    return out, result


def test_one_row_per_model_with_the_planted_weight_graded_super(census_dir, planted_dir, tiny_model_dir):
    out, result = census_dir
    table = rows(out)
    assert [r["model"] for r in table] == [str(planted_dir), str(tiny_model_dir)]
    planted, plain = table
    assert planted["status"] == "done" and planted["coordinates"] == "1:5:7" and planted["grade"] == "super"
    assert (planted["layer"], planted["n_layers"], planted["depth"]) == ("1", "6", "0.167")
    assert float(planted["kl"]) >= 0.5 and planted["known"] == "not listed"  # no published coordinates for a dir
    assert plain["status"] == "done" and plain["grade"] in {"sensitive", "none"} and plain["n_layers"] == "2"
    md = (out / stage.CENSUS_MD).read_text()
    assert f"| {planted_dir} | 1:5:7 | " in md and "| super | 1/6 | not listed |" in md
    assert "1:5:7" in result.stdout and "Super-weight census" in result.stdout
    record = json.loads(record_path(out, planted_dir).read_text())
    assert record["status"] == "done" and record["detect"]["candidates"][0]["grade"] == "super weight"
    assert record["settings"]["calib_tokens"] == 256 and record["n_layers"] == 6
    assert not error_lines(result)


def test_a_rerun_detects_only_the_models_not_done(census_dir, planted_dir, tiny_model_dir, tmp_path, detections):
    out = tmp_path / "c"
    shutil.copytree(census_dir[0], out)
    done = record_path(out, planted_dir)
    before = (done.read_bytes(), done.stat().st_mtime_ns)
    record_path(out, tiny_model_dir).unlink()  # a census killed after its first model

    result = invoke("census", planted_dir, tiny_model_dir, "--out", out, *SMALL)
    assert result.exit_code == 0, result.output
    assert detections == [str(tiny_model_dir)]
    assert f"{planted_dir}: done in an earlier run" in result.stderr and "skipped" in result.stderr
    assert (done.read_bytes(), done.stat().st_mtime_ns) == before
    assert [r["status"] for r in rows(out)] == ["done", "done"]

    again = invoke("census", planted_dir, tiny_model_dir, "--out", out, *SMALL)  # everything done: nothing runs
    assert again.exit_code == 0 and detections == [str(tiny_model_dir)]
    assert again.stderr.count("done in an earlier run") == 2


def test_a_bad_model_is_an_error_row_and_the_others_are_kept(planted_dir, tmp_path):
    out = tmp_path / "c"
    result = invoke("census", "/no/such/model", planted_dir, "--out", out, *SMALL)
    assert result.exit_code == 1, result.output  # documented: 1 when any model failed, after the whole census
    assert error_lines(result) == ["Error: /no/such/model: no such model file or directory: /no/such/model"]
    bad, good = rows(out)
    assert (bad["model"], bad["status"], bad["grade"]) == ("/no/such/model", "error", "error")
    assert bad["error"] == "no such model file or directory: /no/such/model"
    assert (good["status"], good["coordinates"], good["grade"]) == ("done", "1:5:7", "super")
    assert "| /no/such/model | error: no such model file or directory: /no/such/model |" in (
        out / stage.CENSUS_MD).read_text()
    # A failed model is tried again by the next run; the done one is not.
    again = invoke("census", "/no/such/model", planted_dir, "--out", out, *SMALL)
    assert again.exit_code == 1 and len(error_lines(again)) == 1 and "done in an earlier run" in again.stderr


def test_a_model_another_process_is_detecting_is_left_to_it(census_dir, planted_dir, tiny_model_dir, tmp_path,
                                                            detections):
    from conftest import hold_elsewhere

    out = tmp_path / "c"
    shutil.copytree(census_dir[0], out)
    record_path(out, planted_dir).unlink()  # being redone by another job (say, a requeued one)
    holder = hold_elsewhere(record_path(out, planted_dir).parent)
    try:
        result = invoke("census", planted_dir, "--out", out, *SMALL)
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 0, result.output
    assert detections == [] and "another process is detecting it, skipped" in result.stderr
    table = rows(out)
    assert [(r["model"], r["status"]) for r in table] == [(str(planted_dir), "pending"), (str(tiny_model_dir), "done")]
    assert "being detected by another process" in result.stdout  # the terminal says by whom


def test_table_only_merges_what_the_jobs_wrote(census_dir, planted_dir, tiny_model_dir, tmp_path, detections):
    out = tmp_path / "c"
    shutil.copytree(census_dir[0], out)
    (out / stage.CENSUS_CSV).unlink()
    models = tmp_path / "models.txt"
    models.write_text(f"# the array's list\n{tiny_model_dir}\n/not/run/yet  # its job was killed\n{planted_dir}\n")
    result = invoke("census", "--table-only", "--models-file", models, "--out", out)  # no detection options needed
    assert result.exit_code == 0, result.output
    assert detections == []
    assert [(r["model"], r["status"]) for r in rows(out)] == [
        (str(tiny_model_dir), "done"), ("/not/run/yet", "pending"), (str(planted_dir), "done")]
    assert "not detected yet" in result.stdout
    for bad in ([], ["--out", tmp_path / "nothing"]):
        refused = invoke("census", "--table-only", *bad)
        assert refused.exit_code == 2 and len(refused.stderr.strip().splitlines()) == 1


def test_a_directory_held_too_long_is_one_error_line(census_dir, planted_dir, tmp_path, monkeypatch, detections):
    from conftest import hold_elsewhere

    out = tmp_path / "c"
    shutil.copytree(census_dir[0], out)
    monkeypatch.setattr(stage, "LOCK_WAIT_S", 0.5)
    holder = hold_elsewhere(out)  # e.g. a `repair` pointed at the census directory by mistake
    try:
        result = invoke("census", planted_dir, "--out", out, *SMALL)
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1 and detections == []
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {out} is in use by process"), lines


def test_one_model_in_memory_at_a_time(planted_dir, tiny_model_dir, tmp_path, monkeypatch):
    import gc
    import weakref

    from superweight.io import models

    real, earlier = models.load, []

    def load(spec, *args, **kwargs):
        gc.collect()
        assert all(ref() is None for ref in earlier), "the previous model is still alive at the next load"
        loaded = real(spec, *args, **kwargs)
        earlier.append(weakref.ref(loaded.model))
        return loaded

    monkeypatch.setattr(models, "load", load)
    result = invoke("census", planted_dir, tiny_model_dir, planted_dir, "--out", tmp_path / "c", *SMALL)
    assert result.exit_code == 0, (result.output, result.exception)
    gc.collect()
    assert len(earlier) == 2 and all(ref() is None for ref in earlier)  # the duplicate spec was not loaded


def test_models_file_comments_and_duplicates(tmp_path):
    path = tmp_path / "models.txt"
    path.write_text("# the census\nsmollm2-135m\n\n  gemma3-270m   # Gemma\norg/model#rev\nsmollm2-135m\n")
    assert stage.unique(stage.read_models_file(path)) == ["smollm2-135m", "gemma3-270m", "org/model#rev"]
    assert stage.model_slug("a/b") != stage.model_slug("a_b")
    assert "/" not in stage.model_slug("/some/dir/model")


@pytest.mark.parametrize("case", ["no models", "comments only", "missing file", "out is a file", "not a census",
                                  "other settings", "bad calib", "bad dtype"])
def test_bad_input_is_one_error_line_and_exit_2(case, census_dir, planted_dir, tmp_path, detections):
    out = tmp_path / "c"
    models = [planted_dir]
    options = list(SMALL)
    if case == "no models":
        models = []
    elif case == "comments only":
        (tmp_path / "m.txt").write_text("# nothing yet\n\n")
        models, options = [], [*SMALL, "--models-file", tmp_path / "m.txt"]
    elif case == "missing file":
        options += ["--models-file", tmp_path / "nope.txt"]
    elif case == "out is a file":
        out.write_text("x")
    elif case == "not a census":
        out.mkdir()
        (out / "results.json").write_text("{}")
    elif case == "other settings":
        shutil.copytree(census_dir[0], out)
        options[1] = "128"  # --calib-tokens
    elif case == "bad calib":
        options[1] = "1"
    elif case == "bad dtype":
        options += ["--dtype", "fp8"]
    result = invoke("census", *models, "--out", out, *options)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    assert detections == []
    if case in {"no models", "comments only", "missing file", "bad calib", "bad dtype"}:
        assert not out.exists()  # refused before anything was written
    if case == "other settings":
        assert "other settings (calib_tokens differ)" in lines[0]


def test_help_lists_census_after_detect():
    names = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert names[names.index("detect") + 1] == "census"
