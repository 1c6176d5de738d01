"""`superweight run`, `analyze`, `sparsify`, `report` and `compare` on a planted tiny llama directory."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from superweight.cli import app
from superweight.io.models import save_model_dir
from superweight.io.rundir import RunDir
from tiny import planted, tiny_tokenizer

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()
SMALL = ["--steps", "6", "--eval-tokens", "256", "--analysis-tokens", "256"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(pipeline_run):
    out, result = pipeline_run  # `run --seeds 2 --sparse` on the planted model (conftest.py)
    assert result.output.strip().splitlines()[-1] == f"Report: {out / 'report.html'}"
    assert "confirmed; repairing 1:5:7, a super weight (zeroing it: KL" in result.output
    return out


def test_run_detects_the_planted_weight_and_writes_every_artifact(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "results.json", "detect.json", "patch.safetensors", "train_log.jsonl",
            "report.html", "report.md", "plots"} <= names
    res = json.loads((run_dir / "results.json").read_text())
    assert res["detect"]["weight"] == "1:5:7"
    assert any(c["confirmed"] and (c["layer"], c["row"], c["col"]) == (1, 5, 7) for c in res["detect"]["candidates"])
    # A random tiny model predicts near-uniformly, so its PPL barely moves; KL shows the damage and the repair.
    assert res["broken"]["kl"] > 0.05 and res["recovery"]["kl"] > 0.9  # measured 0.93 -> 2e-5: 99.997%
    # The planted weight is the only thing to put back, and the patch finds it: measured cos 0.999 with the
    # original row, d[7] = 39.7 where 40 was deleted.
    assert res["patch"]["cos_original_row"] > 0.95 and 0.9 < res["patch"]["value_ratio"] < 1.1
    assert [p["k"] for p in res["sparsity"]] == [1, 64]  # the search: one entry answers, the full patch last
    assert set(res["baselines"]) >= {"oracle", "activation_restore", "other_row"}
    baselines = {name: b["recovery"]["kl"] for name, b in res["baselines"].items()}
    assert baselines["oracle"] > 0.99 and abs(baselines["other_row"]) < 0.1  # the deleted value back; another row
    # The oracle restores the only ablated weight through its own row: the intact model, read from the base pass.
    oracle = res["baselines"]["oracle"]
    assert oracle["recovery"] == {"nll_gap": 1.0, "kl": 1.0} and oracle["interval"] == [1.0, 1.0]
    parts = res["cost"]["stages"]["repair"]["parts"]
    assert "eval/oracle" not in parts and "eval/other_row" in parts
    assert "read from the base pass" in res["protocol"]["interventions"]["oracle"]
    # Two seeds, two patches (different training rows), near the same point (measured norms 39.721 and 39.730).
    seeds = res["seeds"]
    assert [v["seed"] for v in seeds["values"]] == [0, 1] and seeds["values"][0]["norm"] != seeds["values"][1]["norm"]
    assert 0 < seeds["std"]["norm"] < 0.01 * seeds["mean"]["norm"]
    assert {"detect", "repair", "analyze", "sparsify"} <= set(res["timings"])
    assert len(res["sparse_training"]["points"]) == 6  # 3 L1 and 3 L0 strengths by default
    html = (run_dir / "report.html").read_text()
    assert "data:image/png;base64," in html and f"{res['patched']['ppl']:.2f}" in html


def test_run_refuses_an_existing_directory_before_loading(run_dir, planted_dir):
    before = (run_dir / "results.json").read_bytes()
    result = invoke("run", "--model", planted_dir, "--out", run_dir)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: {run_dir} already exists: choose another --out (a run is never overwritten)"]
    assert (run_dir / "results.json").read_bytes() == before


def test_run_without_a_confirmed_weight_says_so(tmp_path):
    model_dir = tmp_path / "plain"
    save_model_dir(planted(), tiny_tokenizer(), model_dir)  # nothing planted
    result = invoke("run", "--model", model_dir, *SMALL, "--out", tmp_path / "r")
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("Error: detection found no super weight and no sensitive weight") and "--weight" in line
    # --weight repairs one anyway; the token views cope with targets that never occur in a small vocabulary
    result = invoke("run", "--model", model_dir, *SMALL, "--weight", "1:5:7", "--no-baselines", "--out", tmp_path / "w")
    assert result.exit_code == 0, result.output
    tokens = RunDir(tmp_path / "w").record().tokens
    assert tokens.hurt and all(t.count > 0 for t in tokens.hurt + tokens.healed)


def test_analyze_sparsify_report_and_compare_on_a_repair_run(planted_dir, tmp_path):
    out = tmp_path / "rep"
    r = invoke("repair", "--model", planted_dir, "--weight", "1:5:7", "--steps", "6", "--eval-tokens", "256", "--out", out)
    assert r.exit_code == 0, r.output
    r = invoke("analyze", out, "--tokens", "256", "--draws", "1")
    assert r.exit_code == 0, r.output
    assert "Smallest top-|d| patch recovering >= 90% of the NLL gap" in r.output and "top-|x·d|" in r.output
    r = invoke("sparsify", out, "--l1", "0.5", "--l0", "", "--steps", "3", "--tokens", "256")
    assert r.exit_code == 0, r.output
    res = json.loads((out / "results.json").read_text())
    assert [p["method"] for p in res["sparse_training"]["points"]] == ["l1"]
    assert res["sparsity"] and res["tokens"]["hurt"]
    r = invoke("report", out)
    assert r.exit_code == 0, r.output
    assert (out / "report.html").is_file() and (out / "plots" / "sparsity.png").is_file()
    r = invoke("compare", out, out, "--json", tmp_path / "cmp.json")
    assert r.exit_code == 0, r.output
    rows = json.loads((tmp_path / "cmp.json").read_text())
    assert len(rows) == 2 and rows[0]["weight"] == "1:5:7" and rows[0]["nll_gap"] == res["recovery"]["nll_gap"]


@pytest.mark.parametrize("args, code, message", [
    (["analyze", "/no/such/run"], 2, "Error: no such run directory: /no/such/run"),
    (["report", "/no/such/run"], 2, "Error: no such run directory: /no/such/run"),
    (["sparsify", "/no/such/run", "--l1", "x"], 2, "Error: invalid --l1 'x': expected comma-separated numbers"),
    (["sparsify", "/no/such/run", "--l1", "", "--l0", ""], 2, "Error: no strengths given: set --l1 and/or --l0"),
    (["run", "--recipe", "nope"], 2, "Error: unknown recipe 'nope': use seed, fast, quick, sgd, balanced, lbfgs"),
    (["run", "--weight", "1:2"], 2, None),
    (["compare", "/no/such/run"], 1, None),
])
def test_bad_input_is_one_error_line(args, code, message):
    result = invoke(*args)
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ")
    if message:
        assert lines[0] == message


def test_analyze_of_a_directory_without_a_run(tmp_path):
    result = invoke("analyze", tmp_path)
    assert result.exit_code == 1
    assert result.stderr.strip() == f"Error: no results.json in {tmp_path}: run `superweight repair --out {tmp_path}` first"


def test_analyze_of_a_damaged_results_file_is_one_error_and_leaves_it(tmp_path):
    (tmp_path / "results.json").write_text("{ half")
    result = invoke("analyze", tmp_path)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {tmp_path / 'results.json'} is not valid JSON")
    assert (tmp_path / "results.json").read_text() == "{ half"
