"""The CLI on a tiny local model directory: happy paths, and bad input as one line + exit code."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from superweight.cli import app

pytestmark = pytest.mark.usefixtures("torch_single_thread")
runner = CliRunner()
FAST = ["--max-tokens", "192", "--max-length", "64", "--max-new-tokens", "3", "--prompt", "Hello"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, code, pattern):
    assert result.exit_code == code, (result.exit_code, result.output, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ") and re.search(pattern, lines[0]), lines[0]
    assert "Traceback" not in result.output


def test_info(tiny_model_dir, tmp_path):
    result = invoke("info", "--model", tiny_model_dir, "--json", tmp_path / "info.json")
    assert result.exit_code == 0, result.output
    assert "llama" in result.stdout
    info = json.loads((tmp_path / "info.json").read_text())
    assert (info["n_layers"], info["d_model"], info["d_ff"]) == (2, 32, 64)
    assert info["down_proj_names"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]


def test_eval_writes_protocol_and_both_conditions(tiny_model_dir, tmp_path):
    out = tmp_path / "sub" / "eval.json"
    result = invoke("eval", "--model", tiny_model_dir, "--ablate", "1:5:7", "--ablate", "0:3:9@2", *FAST,
                    "--json", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert set(doc) == {"protocol", "base", "ablated", "patched", "generations", "tasks"}
    assert doc["patched"] is None and doc["tasks"] is None  # no --patch, no --tasks
    for key in ("nll", "ppl", "kl", "top1_agree", "super_activation"):
        assert key in doc["base"] and key in doc["ablated"]
    p = doc["protocol"]
    assert (p["corpus"], p["split"], p["max_length"], p["stride"], p["dtype"]) == ("pydoc", "eval", 64, 64, "fp32")
    # 192 tokens in 3 windows of 64; the first token of each window has no context inside it (HF recipe).
    assert p["n_tokens"] == 3 * 63 == doc["base"]["n_tokens"]
    assert doc["base"]["kl"] == 0.0 and doc["base"]["top1_agree"] == 1.0
    assert set(doc["base"]["super_activation_by_channel"]) == {"0:3", "1:5"}
    assert doc["generations"][0]["prompt"] == "Hello" and set(doc["generations"][0]) == {"prompt", "base", "ablated"}
    assert "PPL" in result.stdout and "Greedy generations" in result.stdout


@pytest.mark.parametrize(
    "args, code, pattern",
    [
        (["--ablate", "99:0:0"], 2, r"layer 99 out of range: the model has 2 layers \(0-1\)"),
        (["--ablate", "1:9999:0"], 2, r"row 9999 out of range .* d_model is 32"),
        (["--ablate", "1:0:64"], 2, r"column 64 out of range .* d_ff is 64"),
        (["--ablate", "abc"], 2, r"invalid weight coordinate 'abc': expected LAYER:ROW:COL\[@SCALE\]"),
        (["--ablate", "1:2:3", "--ablate", "1:2:3@0.5"], 2, r"given more than once"),
        (["--corpus", "text:/no/such/file"], 1, r"no such text file, directory or glob: /no/such/file"),
        (["--corpus", "nope"], 2, r"unknown corpus 'nope'"),
        (["--split", "dev"], 2, r"unknown split 'dev'"),
        (["--dtype", "fp8"], 2, r"unknown dtype 'fp8'"),
        (["--stride", "100"], 2, r"stride must be between 1 and max_length \(64\)"),
    ],
)
def test_eval_bad_input(tiny_model_dir, args, code, pattern):
    result = invoke("eval", "--model", tiny_model_dir, *FAST, *args)
    assert_one_line_error(result, code, pattern)


def test_missing_model_dir():
    assert_one_line_error(invoke("eval", "--model", "/no/such/dir"), 1, r"no such model file or directory: /no/such/dir")
    assert_one_line_error(invoke("info", "--model", "./nope.gguf"), 1, r"no such model file or directory")


def test_directory_without_config(tmp_path):
    assert_one_line_error(invoke("info", "--model", tmp_path), 1, r"has no config.json")


def test_empty_text_file(tiny_model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    assert_one_line_error(invoke("eval", "--model", tiny_model_dir, "--corpus", f"text:{empty}"), 1, r"is empty")


def test_failed_run_keeps_an_existing_json(tiny_model_dir, tmp_path):
    out = tmp_path / "keep.json"
    out.write_text('{"precious": true}')
    result = invoke("eval", "--model", tiny_model_dir, *FAST, "--ablate", "99:0:0", "--json", out)
    assert result.exit_code == 2
    assert out.read_text() == '{"precious": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["keep.json"]  # no temp files left behind


def test_text_corpus_eval(tiny_model_dir, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"Paragraph {i}: the cat sat on the mat." for i in range(200)))
    result = invoke("eval", "--model", tiny_model_dir, "--corpus", f"text:{corpus}", "--split", "all",
                    "--ablate", "1:5:7", *FAST)
    assert result.exit_code == 0, result.output


def test_detect_json_and_table(tiny_model_dir, tmp_path):
    out = tmp_path / "d.json"
    result = invoke("detect", "--model", tiny_model_dir, "--calib-tokens", "256", "--json", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["candidates"], "attribution always proposes candidates"
    for c in doc["candidates"]:
        assert {"layer", "row", "col", "value", "kl", "ppl_ratio", "confirmed"} <= set(c)
    assert "kl" in doc["field_meanings"] and doc["protocol"]["split"] == "train"
    assert "Confirmed: KL >=" in result.stdout


def test_detect_bad_attribution(tiny_model_dir):
    assert_one_line_error(invoke("detect", "--model", tiny_model_dir, "--attribution", "magic"), 2,
                          r"unknown attribution 'magic'")


def test_sweep_writes_plot_and_json(tiny_model_dir, tmp_path):
    png, out = tmp_path / "s.png", tmp_path / "s.json"
    result = invoke("sweep", "--model", tiny_model_dir, "--weight", "1:5:7", "--scales", "1,0,-1", "--spread", "4",
                    "--max-tokens", "128", "--max-length", "64", "--max-new-tokens", "2", "--prompt", "Hi",
                    "--plot", png, "--json", out)
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads(out.read_text())
    assert [p["label"] for p in doc["points"]] == ["x1", "x0", "x-1", "spread4"]
    x1 = doc["points"][0]["metrics"]
    assert x1["kl"] == 0.0 and x1["nll"] == doc["base"]["nll"]  # scale 1 is the identity


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["--weight", "1:5:7", "--scales", "1,x"], r"invalid --scales '1,x'"),
        (["--weight", "1:5:7@2"], r"without @SCALE"),
        (["--weight", "5:5:7"], r"layer 5 out of range"),
    ],
)
def test_sweep_bad_input(tiny_model_dir, args, pattern):
    result = invoke("sweep", "--model", tiny_model_dir, "--max-tokens", "64", "--max-length", "32", *args)
    assert_one_line_error(result, 2, pattern)


def test_readme_documents_every_command():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for command in app.registered_commands:
        name = command.name or command.callback.__name__
        assert f"superweight {name}" in readme, name
        assert invoke(name, "--help").exit_code == 0


def test_help_lists_the_commands_in_pipeline_order():
    from superweight.cli import COMMANDS

    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    listing = result.output[result.output.index("Commands"):]
    names = re.findall(r"^[^a-z\n]*?([a-z]+)  +\S", listing, flags=re.MULTILINE)
    assert names == list(COMMANDS), names
    assert names[:5] == ["info", "eval", "detect", "census", "sweep"]
    assert names.index("repair") < names.index("analyze") < names.index("run")
    # The README's command table lists them in the same order.
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    assert re.findall(r"^\| `superweight (\w+)", readme, flags=re.MULTILINE) == list(COMMANDS)


def test_coordinates_print_verbatim():
    from superweight.cli import out

    with out.capture() as cap:
        out.print("29:100:1126 [1, 2, 3")
    assert cap.get().strip() == "29:100:1126 [1, 2, 3"


def test_hub_id_without_network_is_one_line():
    # Real hub-loading code path; offline here, so it must fail cleanly (HF_HUB_OFFLINE=1 from conftest).
    assert_one_line_error(invoke("info", "--model", "allenai/OLMo-1B-0724-hf"), 1,
                          r"could not load model 'allenai/OLMo-1B-0724-hf' \(hub\)")


def test_wikitext_without_network_is_one_line(tiny_model_dir):
    result = invoke("eval", "--model", tiny_model_dir, "--corpus", "wikitext2", *FAST)
    assert_one_line_error(result, 1, r"could not load wikitext-2-raw-v1 \(validation\)")


def test_detect_no_verify_reports_unverified_candidates(tiny_model_dir, tmp_path):
    out = tmp_path / "d.json"
    result = invoke("detect", "--model", tiny_model_dir, "--no-verify", "--spike-ratio", "1", "--max-candidates", "2",
                    "--attribution", "none", "--json", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["protocol"] is None and len(doc["candidates"]) == 2
    assert all(c["kl"] is None and c["confirmed"] is False for c in doc["candidates"])
    assert "not verified" in result.stdout


def test_eval_and_detect_with_bos_on_record_it(tiny_model_dir, tmp_path):
    # The tiny tokenizer adds no BOS by itself (auto: none); --bos on puts its BOS (id 0) first in every window.
    out = tmp_path / "eval.json"
    result = invoke("eval", "--model", tiny_model_dir, "--ablate", "1:5:7", *FAST, "--bos", "on", "--json", out)
    assert result.exit_code == 0, result.output
    p = json.loads(out.read_text())["protocol"]
    # Windows of a BOS and 63 tokens: every one of the 192 tokens is scored, the first from the BOS alone.
    assert (p["bos"], p["n_tokens"], p["max_length"], p["stride"]) == (0, 192, 64, 63)
    assert "after BOS" in result.stdout
    auto = tmp_path / "auto.json"
    assert invoke("eval", "--model", tiny_model_dir, *FAST, "--json", auto).exit_code == 0
    assert json.loads(auto.read_text())["protocol"]["bos"] is None
    out = tmp_path / "d.json"
    result = invoke("detect", "--model", tiny_model_dir, "--calib-tokens", "256", "--bos", "on", "--json", out)
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["protocol"]["bos"] == 0


@pytest.mark.parametrize("command", ["info", "eval", "detect", "sweep", "quantize", "repair", "run"])
def test_unknown_bos_mode_is_one_line(tiny_model_dir, tmp_path, command):
    extra = {"sweep": ["--weight", "1:5:7"], "repair": ["--weight", "1:5:7", "--out", tmp_path / "r"],
             "run": ["--out", tmp_path / "r"]}.get(command, [])
    result = invoke(command, "--model", tiny_model_dir, *extra, "--bos", "bogus")
    assert_one_line_error(result, 2, r"unknown --bos 'bogus': use auto, on, off")
    assert not (tmp_path / "r").exists()
