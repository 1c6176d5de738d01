"""Writer -> reader round trips of the run record: runs made by the CLI on a planted tiny llama (conftest.py) are
read back through io/rundir, the report, compare and the CLI's printers; older records are migrated or refused."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from superweight.cli import app
from superweight.errors import SuperweightError
from superweight.schema.migrate import migrate
from superweight.schema.record import SCHEMA_VERSION, RunRecord
from superweight.io.rundir import RunDir
from superweight.report import terminal, write_report

V1 = Path(__file__).parent / "data" / "v1"
V2 = Path(__file__).parent / "data" / "v2"  # `superweight run` before detect.candidates and seeds had one model each
V3 = Path(__file__).parent / "data" / "v3"  # V2's record as version 3 wrote it: one flat config for every optimiser


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def printed(fn, *args) -> str:
    buf = io.StringIO()
    fn(Console(file=buf, width=140, emoji=False, soft_wrap=True), *args)  # as the CLI's piped stdout (cli/common.py)
    return buf.getvalue()


@pytest.fixture(scope="module")
def all_runs(repair_runs, pipeline_run) -> dict[str, Path]:
    return {name: path for name, (path, _) in repair_runs.items()} | {"pipeline": pipeline_run[0]}


def test_two_patch_rows_through_analyze_sparsify_report_and_compare(repair_runs, tmp_path):
    run, (repaired, analysed, sparsified) = repair_runs["two_rows"]
    assert "Patch row 1:5: ||d|| = " in repaired and "Patch row 1:9: ||d|| = " in repaired
    assert "Smallest top-|d| patch recovering >= 90%" in analysed and "Sparse training" in sparsified
    r = invoke("report", run)
    assert r.exit_code == 0, r.output
    md = (run / "report.md").read_text()
    record = RunDir(run).record()
    assert [g.key for g in record.patch.rows] == ["1:5", "1:9"]
    for g in record.patch.rows:  # the report shows both rows
        assert f"| {g.layer} | {g.row} | " in md
    r = invoke("compare", run, repair_runs["one_row"][0], "--json", tmp_path / "cmp.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "cmp.json").read_text())
    assert [x["run"] for x in rows] == ["two_rows", "one_row"] and rows[0]["norm"] == record.patch.norm


def test_every_record_reads_back_as_written(all_runs, tmp_path):
    for name, run in all_runs.items():
        text = (run / "results.json").read_text()
        record = RunDir(run).record()
        assert json.loads(text)["schema_version"] == record.schema_version == SCHEMA_VERSION, name
        RunDir(tmp_path / name).write(record)  # the writer gives back the very bytes it wrote
        assert (tmp_path / name / "results.json").read_text() == text, name


def test_what_each_run_holds(all_runs):
    one, two, weights, minimal, full = (RunDir(all_runs[n]).record() for n in
                                        ("one_row", "two_rows", "two_weights", "minimal", "pipeline"))
    assert set(one.baselines) == {"oracle", "activation_restore", "random_same_write_1", "random_same_write_2",
                                  "random_same_write_3", "other_row"}
    assert [v.seed for v in one.seeds.values] == [0, 1] and one.sparse_training.points[0].method == "l1"
    assert two.baselines is None and two.seeds is None and [two.sparsity[0].k, two.sparsity[-1].k] == [1, 128]  # the search's k
    assert [(g.key, [c.col for c in g.cols]) for g in weights.patch.rows] == [("1:5", [7]), ("1:9", [3])]
    assert weights.protocol.interventions["broken"] == "ablate 1:5:7, 1:9:3" and weights.weight == "1:5:7, 1:9:3"
    assert minimal.sparsity is None and minimal.analysis is None and minimal.detect is None
    assert full.detect.weight == "1:5:7" and full.timings and full.sparse_training and full.seeds
    assert full.config.data == "packed"


def test_several_weights_in_the_report_and_the_printers(repair_runs):
    run, (repaired,) = repair_runs["two_weights"]
    record = RunDir(run).record()
    assert "Patch row 1:9: ||d|| = " in repaired and "d[3] = " in repaired
    assert printed(terminal.print_repair, record, run).strip() in repaired
    md = write_report(run)[0].read_text()
    assert "| 1 | 5 | " in md and "| 1 | 9 | " in md


def test_printers_read_the_record_the_commands_wrote(repair_runs, pipeline_run):
    run, (repaired, analysed, sparsified) = repair_runs["one_row"]
    record = RunDir(run).record()
    # The commands printed from the record they returned; printing from the one on disk gives the same lines.
    assert printed(terminal.print_repair, record, run).strip() in repaired
    assert printed(terminal.print_sparse, record.sparse_training).strip() in sparsified
    run_dir, result = pipeline_run
    assert printed(terminal.print_run, RunDir(run_dir).record(), run_dir).strip() in result.output


def test_version_1_records_are_migrated():
    record = RunDir(V1 / "run").record()  # every part: detection, baselines, seeds, analysis, sparse training
    raw = json.loads((V1 / "run" / "results.json").read_text())
    assert "schema_version" not in raw and record.schema_version == SCHEMA_VERSION
    assert record.patch.rows[0].norm == raw["patch"]["rows"]["1:5"]["norm"]
    assert record.detect.weight == raw["detect"]["weight"] and record.seeds.mean.norm == raw["seeds"]["mean"]["norm"]
    assert record.config.data == "packed"
    seed_recipe = migrate({**raw, "recipe": "seed"})  # the seed recipe read one wikitext line per sequence
    assert seed_recipe["config"]["data"] == "lines"
    two = RunDir(V1 / "two_rows").record()
    assert [g.key for g in two.patch.rows] == ["1:5", "1:9"]


def test_version_2_records_are_migrated():
    record = RunDir(V2 / "run").record()  # every part: detection, baselines, two seeds, analysis, sparse training
    raw = json.loads((V2 / "run" / "results.json").read_text())
    assert raw["schema_version"] == 2 and record.schema_version == SCHEMA_VERSION
    unchanged = {k: v for k, v in raw.items() if k not in ("sweep", "config")} | {"schema_version": SCHEMA_VERSION}
    assert {k: v for k, v in migrate(raw).items() if k not in ("sweep", "config")} == unchanged  # the rest: defaults
    n = raw["analysis"]["protocol"]["n_tokens"]
    assert [(p.label, p.scale, p.metrics.ppl, p.metrics.n_tokens) for p in record.sweep] == [
        ("base" if p["scale"] == 1 else f"scale{p['scale']:g}", p["scale"], p["ppl"], n) for p in raw["sweep"]]
    assert [v.seed for v in record.seeds.values] == [v["seed"] for v in raw["seeds"]["values"]] == [0, 1]
    assert record.seeds.mean.seed is None and record.seeds.std.norm == raw["seeds"]["std"]["norm"]
    summary = raw["detect"]["candidates"]
    assert [c.model_dump(include=set(summary[0])) for c in record.detect.candidates] == summary
    assert record.detect.candidates[0].controls == [] and record.detect.candidates[0].in_spike is None
    assert record.weight == raw["detect"]["weight"]


def test_version_3_records_get_the_engine_s_union():
    """Version 3 kept one flat config for every optimiser: an lbfgs run's `steps` counted its loss evaluations, and
    the schedule, warm-up and weight decay it held were never read."""
    from superweight.engine.config import LbfgsConfig

    raw = json.loads((V3 / "run" / "results.json").read_text())
    assert raw["schema_version"] == 3 and raw["config"]["optimizer"] == "lbfgs" and "check_rows" in raw["config"]
    record = RunDir(V3 / "run").record()
    assert record.schema_version == SCHEMA_VERSION and isinstance(record.config, LbfgsConfig)
    assert record.config.max_evals == raw["config"]["steps"] and record.config.budget == 6
    assert record.config.check_sequences == raw["config"]["check_rows"]
    assert record.config.progress_tol == raw["config"]["progress_tol"] and record.config.space == "column"
    assert not {"schedule", "warmup", "weight_decay", "steps"} & set(record.config.model_dump())
    unchanged = {k: v for k, v in raw.items() if k != "config"} | {"schema_version": SCHEMA_VERSION}
    assert {k: v for k, v in migrate(raw).items() if k != "config"} == unchanged
    assert RunDir(V2 / "run").record().config == record.config  # the same run, read from either version


def test_records_that_cannot_be_read_are_one_error_line(tmp_path, repair_runs):
    raw = json.loads((repair_runs["minimal"][0] / "results.json").read_text())
    for name, data, message in [
        ("newer", {**raw, "schema_version": SCHEMA_VERSION + 1},
         f"has schema version {SCHEMA_VERSION + 1}, newer than this superweight reads ({SCHEMA_VERSION})"),
        ("typo", {**raw, "recovery": {**raw["recovery"], "nll_gapp": 1.0}},
         "results.json: recovery.nll_gapp: extra inputs are not permitted, got 1.0 (not a run record superweight "
         "can read: undo a hand edit"),
        ("partial", {k: v for k, v in raw.items() if k != "patch"}, "results.json: patch: field required (not a run"),
        ("list", [raw], "holds no results object"),
    ]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(data))
        with pytest.raises(SuperweightError) as exc:
            RunDir(tmp_path / name).record()
        assert message in str(exc.value) and "\n" not in str(exc.value), (name, str(exc.value))
        result = invoke("report", tmp_path / name)
        assert result.exit_code == 1 and result.stderr.count("\n") == 1 and message in result.stderr


def test_a_typo_in_a_stage_is_caught_when_the_record_is_built(repair_runs):
    record = RunDir(repair_runs["minimal"][0]).record()
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        RunRecord.model_validate(record.model_dump() | {"sparsityy": []})


def test_the_old_copy_of_a_run_still_reports(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(V1 / "run", run)
    result = invoke("report", run)
    assert result.exit_code == 0, result.output
    assert "## Detection" in (run / "report.md").read_text()


def test_docs_name_every_part_of_the_record():
    docs = (Path(__file__).parents[1] / "docs" / "results.md").read_text()
    missing = [name for name in RunRecord.model_fields if f"`{name}`" not in docs]
    assert not missing, missing
