"""`superweight repair` and `superweight apply` on a tiny local model."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from superweight.cli import app
from superweight.core.patching import apply_patch
from superweight.io import models
from superweight.io.patchfile import load_patch
from tiny import save_tiny_model_dir

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()
FAST = ["--recipe", "balanced", "--weight", "1:5:7", "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "128",
        "--checkpoint-every", "2"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    result = invoke("repair", "--model", tiny_model_dir, *FAST, "--baselines", "--out", out)
    assert result.exit_code == 0, result.output
    return out


def test_repair_writes_the_run_directory(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.json", "results.json", "patch.safetensors", "patch_config.json", "train_log.jsonl",
            "checkpoints"} <= names
    res = json.loads((run_dir / "results.json").read_text())
    for key in ("base", "broken", "patched"):
        assert {"nll", "ppl", "kl", "top1_agree", "super_activation"} <= set(res[key])
    assert set(res["recovery"]) == {"nll_gap", "kl"}
    assert {"steps", "seconds", "s_per_step"} <= set(res["training"]) and res["training"]["steps"] == 6
    assert set(res["baselines"]) == {"oracle", "activation_restore", "random_same_write_1", "random_same_write_2",
                                     "random_same_write_3", "other_row"}
    assert res["baselines"]["oracle"]["kl"] < 1e-8  # putting the deleted value back is the intact model
    log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2, 3, 4, 5, 6]
    cfg = json.loads((run_dir / "patch_config.json").read_text())
    assert cfg["ablated"] == ["1:5:7"] and cfg["rows"] == [[1, 5]] and cfg["d_ff"] == {"1": 64}


def test_repair_refuses_to_overwrite_a_run(tiny_model_dir, run_dir):
    before = (run_dir / "results.json").read_bytes()
    result = invoke("repair", "--model", tiny_model_dir, *FAST, "--out", run_dir)
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"Error: {run_dir} already holds a run: pass --resume to continue it, or choose another --out"]
    assert (run_dir / "results.json").read_bytes() == before


def test_an_excluded_column_past_the_row_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    result = invoke("repair", "--model", tiny_model_dir, *FAST, "--exclude", "99999", "--out", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("Error: --exclude: column 99999 is past the patch row")
    assert not out.exists()


def test_resume_with_other_settings_is_refused(tiny_model_dir, run_dir):
    result = invoke("repair", "--model", tiny_model_dir, *FAST, "--lr", "0.5", "--out", run_dir, "--resume")
    assert result.exit_code == 2 and "--resume with other settings" in result.stderr


def test_bad_repair_options(tiny_model_dir, tmp_path):
    for args, pattern in [
        (["--weight", "1:5:7", "--recipe", "magic"], "unknown recipe 'magic'"),
        (["--weight", "1:5:7", "--patch-row", "1-5"], "invalid patch row '1-5'"),
        (["--weight", "1:5:7", "--optimizer", "lion"], "invalid --optimizer 'lion': use lbfgs, adamw, adam, sgd"),
        (["--weight", "1:5:7", "--optimizer", "lbfgs", "--warmup", "5"], "--warmup applies to the first-order optimizers"),
        (["--weight", "1:5:7", "--schedule", "constant"], "--schedule applies to the first-order optimizers"),
        (["--weight", "1:5:7", "--steps", "0"], "steps must be at least 1"),
        (["--weight", "9:5:7"], "layer 9 out of range"),
    ]:
        result = invoke("repair", "--model", tiny_model_dir, *args, "--out", tmp_path / "x")
        assert result.exit_code == 2, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and pattern in lines[0], lines


def test_apply_exports_a_model_equal_to_the_live_patch(tiny_model_dir, run_dir, tmp_path):
    export = tmp_path / "merged"
    result = invoke("apply", "--patch", run_dir, "--export", export, "--model", tiny_model_dir)
    assert result.exit_code == 0, result.output
    merged = models.load(str(export)).model
    live_model = models.load(str(tiny_model_dir)).model
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        live = apply_patch(live_model, load_patch(run_dir))
        expected = live_model(ids).logits
        live.remove()
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
    again = invoke("apply", "--patch", run_dir, "--export", export, "--model", tiny_model_dir)
    assert again.exit_code == 2 and "exists already" in again.stderr


def test_patch_on_the_wrong_model_is_a_clear_error(run_dir, tmp_path):
    other = save_tiny_model_dir(tmp_path / "other", family="llama", seed=1)
    result = invoke("apply", "--patch", run_dir, "--export", tmp_path / "m", "--model", other)
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "Error: patch was trained on another model (" + json.loads((run_dir / "patch_config.json").read_text())["model"]
        + "): weight fingerprint differs"]
    assert not (tmp_path / "m").exists()


def test_errors_raised_mid_run_print_exactly_one_line(tiny_model_dir, tmp_path):
    # Raised after the model loads (inside the progress display): stderr must be just the error line.
    result = invoke("repair", "--model", tiny_model_dir, "--weight", "9:0:0", "--out", tmp_path / "x")
    assert result.exit_code == 2
    assert result.stderr == "Error: layer 9 out of range: the model has 2 layers (0-1)\n"


def test_apply_names_the_missing_patch(tmp_path):
    result = invoke("apply", "--patch", tmp_path / "nope", "--export", tmp_path / "m")
    assert result.exit_code == 1
    assert result.stderr == f"Error: no such patch (run directory or patch.safetensors): {tmp_path / 'nope'}\n"


def test_token_counts_are_checked_under_their_option_names(tiny_model_dir, tmp_path):
    result = invoke("repair", "--model", tiny_model_dir, "--weight", "1:5:7", "--eval-tokens", "1")
    assert result.exit_code == 2 and result.stderr == "Error: --eval-tokens must be at least 2, got 1\n"
    result = invoke("detect", "--model", tiny_model_dir, "--calib-tokens", "1")
    assert result.exit_code == 2 and result.stderr == "Error: --calib-tokens must be at least 2, got 1\n"


def test_repair_with_bos_on_records_it_and_later_commands_follow_the_run(tiny_model_dir, tmp_path):
    out = tmp_path / "bos"
    result = invoke("repair", "--model", tiny_model_dir, *FAST, "--bos", "on", "--out", out)
    assert result.exit_code == 0, result.output
    assert json.loads((out / "config.json").read_text())["bos"] == "on"
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["bos"] == 0 and res["base"]["n_tokens"] == 128  # every eval token, from the BOS on
    again = invoke("repair", "--model", tiny_model_dir, *FAST, "--out", out, "--resume")  # --bos: the run's
    assert again.exit_code == 0 and "is finished already" in again.stderr, again.output
    other = invoke("repair", "--model", tiny_model_dir, *FAST, "--bos", "off", "--out", out, "--resume")
    assert other.exit_code == 2 and "bos differ" in other.stderr
    # The random tiny llama's 1:5:7 does no measurable damage: nothing to repair, recovery n/a (not an error).
    assert res["verdict"] == "nothing to repair" and res["recovery"] == {"nll_gap": None, "kl": None}
    assert "Verdict: nothing to repair" in result.output
    result = invoke("analyze", out, "--tokens", "128", "--draws", "1")
    assert result.exit_code == 0, result.output
    assert "n/a" in result.output and "did no measurable damage" in result.output
    res = json.loads((out / "results.json").read_text())
    assert res["analysis"]["protocol"]["bos"] == 0 and res["sparsity"][0]["kl_recovery"] is None
    assert invoke("report", out).exit_code == 0
    md = (out / "report.md").read_text()
    assert "Verdict: nothing to repair" in md and "n/a" in md and "did no measurable damage" in md
    shown = invoke("compare", out)
    assert shown.exit_code == 0 and "n/a" in shown.output and "did no measurable damage" in shown.output, shown.output
