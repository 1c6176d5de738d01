"""Zero-shot tasks through lm-evaluation-harness (measure/tasks.py, `--tasks`), offline, on the local
multiple-choice task in tests/data/tasks (60 easy English and Python-doc questions, 4 choices each)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from superweight.cli import app
from superweight.core.coords import parse_coord
from superweight.core.intervene import Ablation, NoIntervention
from superweight.errors import SuperweightError, UsageError
from superweight.io.rundir import RunDir
import tiny
from tiny import assert_identical, hook_count, planted, snapshot, tiny_tokenizer

pytest.importorskip("lm_eval")
from superweight.measure.tasks import prepare_tasks, run_tasks  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")
TASKS = Path(__file__).parent / "data" / "tasks"
TASK = "superweight_easy_mc"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def local():
    return prepare_tasks(TASK, str(TASKS))


def test_tasks_run_per_condition_on_the_same_model_and_leave_it_as_it_was(local):

    model, tok = planted((1, 5, 7)), tiny_tokenizer()
    loaded = tiny.handle(model, tok)
    before, pad = snapshot(model), tok.pad_token
    rng = random.getstate(), torch.random.get_rng_state()
    # "after" applies nothing, and runs after the ablation was applied and removed.
    res = run_tasks(loaded, local, {"ablated": Ablation(model, [parse_coord("1:5:7")]), "after": NoIntervention()})
    assert list(res.scores) == ["base", "ablated", "after"]
    scores = {c: {m: s.value for m, s in res.scores[c][TASK].items()} for c in res.scores}
    assert all(set(s) == {"acc", "acc_norm"} for s in scores.values())
    assert all(float(v * 60).is_integer() for s in scores.values() for v in s.values())  # items right, of 60
    assert all(res.scores[c][TASK]["acc"].stderr > 0 for c in res.scores)
    # The ablation was applied: it scores differently from base (measured acc_norm 0.40 -> 0.30, acc 0.367
    # both); and removed: the condition after it scores exactly as base.
    assert scores["ablated"] != scores["base"], scores
    assert scores["after"] == scores["base"], scores
    assert res.tasks[TASK] == {"version": 1.0, "n_shot": 0, "samples": 60}
    assert res.harness == __import__("lm_eval").__version__ and res.settings["include_path"] == str(TASKS)
    assert_identical(model, before)
    assert hook_count(model) == 0 and tok.pad_token == pad
    assert random.getstate() == rng[0] and torch.equal(torch.random.get_rng_state(), rng[1])


def test_task_names_are_checked_before_any_model_loads():
    with pytest.raises(UsageError, match="did you mean superweight_easy_mc"):
        prepare_tasks("superweight_easy_mx", str(TASKS))
    with pytest.raises(UsageError, match="--tasks is empty"):
        prepare_tasks(" , ")
    with pytest.raises(UsageError, match="does not exist"):
        prepare_tasks(TASK, str(TASKS / "missing"))
    assert prepare_tasks(f"{TASK},{TASK}", str(TASKS)).names == [TASK]


def test_without_the_harness_the_option_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    with pytest.raises(SuperweightError, match=r"pip install -e '\.\[lm-eval\]'"):
        prepare_tasks(TASK, str(TASKS))
    result = invoke("eval", "--model", "/no/such/model", "--tasks", TASK)
    assert result.exit_code == 1 and result.output.count("\n") == 1
    assert "pip install -e '.[lm-eval]'" in result.output


def test_cli_eval_and_repair_record_the_tasks(planted_dir, repair_runs, tmp_path):
    out = tmp_path / "eval.json"
    result = invoke("eval", "--model", planted_dir, "--dtype", "fp32", "--patch", repair_runs["minimal"][0],
                    "--max-tokens", "64", "--prompt", "Hi", "--max-new-tokens", "2", "--tasks", TASK,
                    "--include-path", TASKS, "--task-limit", "8", "--json", out)
    assert result.exit_code == 0, result.output
    assert "Zero-shot tasks" in result.output
    data = json.loads(out.read_text())
    assert list(data["tasks"]["scores"]) == ["base", "ablated", "patched"] and data["patched"]["nll"] > 0
    assert data["tasks"]["tasks"][TASK]["samples"] == 8

    run = tmp_path / "run"
    result = invoke("repair", "--model", planted_dir, "--weight", "1:5:7", "--steps", "2", "--batch-size", "2",
                    "--seq-len", "32", "--eval-tokens", "64", "--tasks", TASK, "--include-path", TASKS,
                    "--task-limit", "8", "--out", run)
    assert result.exit_code == 0, result.output
    record = RunDir(run).record()
    assert list(record.tasks.scores) == ["base", "broken", "patched"]
    assert invoke("report", run).exit_code == 0
    assert "## Zero-shot tasks" in (run / "report.md").read_text()


def test_task_options_need_tasks(planted_dir):
    result = invoke("eval", "--model", planted_dir, "--include-path", TASKS)
    assert result.exit_code == 2 and "go with --tasks" in result.output


@pytest.mark.slow
def test_the_ablated_embedded_model_is_worse_at_the_local_task(local, smol):
    """SmolLM2-135M answers most of the 60 easy questions; without its super weight it answers fewer."""
    res = run_tasks(smol, local, {"ablated": Ablation(smol.model, [parse_coord("11:507:1229")])})
    base, ablated = (res.scores[c][TASK]["acc"] for c in ("base", "ablated"))
    assert base.value > 0.7  # measured 0.867 (52 of 60)
    assert ablated.value < base.value - 0.1  # measured 0.633 (38 of 60)
