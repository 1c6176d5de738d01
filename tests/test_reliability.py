"""The bad-input matrix: for every command, each bad input gives its exit code and one line (no traceback),
nothing already written changes, and docs/errors.md lists the same rows. Plus checkpoints that are not data.

A row is (command, input, args, exit code, message). Args and message may name {model} (a tiny llama
directory), {run} (a finished `repair` run), {tmp} and the damaged copies and files built below; the message is
a prefix of the error line (after "Error: "). docs/errors.md shows each row with the placeholders as in
DOC_NAMES, and a test checks every row is there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from superweight.cli import app

pytestmark = pytest.mark.usefixtures("torch_single_thread")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
FP32 = ["--dtype", "fp32"]
REPAIR = ["repair", "--model", "{model}", "--weight", "1:5:7", "--steps", "4", "--batch-size", "2", "--seq-len",
          "32", "--eval-tokens", "128", "--checkpoint-every", "2", *FP32]
CTX = "is longer than the model's context (512 tokens, max_position_embeddings): use"

M = ["--model", "{model}"]
ROWS = [
    # command, input, args, code, message prefix
    ("info", "no such model", ["info", "--model", "/no/such/dir"], 1, "no such model file or directory: /no/such/dir"),
    ("info", "a directory without config.json", ["info", "--model", "{tmp}"], 1, "model directory '{tmp}' has no config.json"),
    ("info", "--json naming a directory", ["info", *M, "--json", "{tmp}"], 2, "output path '{tmp}' is a directory"),
    ("info", "--json under a file", ["info", *M, "--json", "{file}/x.json"], 2,
     "cannot write '{file}/x.json': '{file}' is a file, not a directory"),
    ("info", "unknown --device", ["info", *M, "--device", "tpu"], 2, "unknown device 'tpu'"),
    ("eval", "bad coordinate", ["eval", *M, "--ablate", "abc"], 2, "invalid weight coordinate 'abc'"),
    ("eval", "layer out of range", ["eval", *M, *FP32, "--ablate", "9:0:0"], 2,
     "layer 9 out of range: the model has 2 layers (0-1)"),
    ("eval", "--max-new-tokens -1", ["eval", *M, "--max-new-tokens", "-1"], 2, "--max-new-tokens must be at least 1, got -1"),
    ("eval", "--max-tokens 1", ["eval", *M, "--max-tokens", "1"], 2, "--max-tokens must be at least 2, got 1"),
    ("eval", "--stride above --max-length", ["eval", *M, "--max-length", "64", "--stride", "100"], 2,
     "stride must be between 1 and max_length (64), got 100"),
    ("eval", "--max-length past the model's context", ["eval", *M, *FP32, "--ablate", "1:5:7", "--max-length", "1000",
                                                "--max-tokens", "900"],
     2, f"--max-length 1000 {CTX} --max-length 512 or less"),
    ("eval", "missing text corpus", ["eval", *M, "--corpus", "text:/no/such/file"], 1,
     "no such text file, directory or glob: /no/such/file"),
    ("eval", "corpus file that is not UTF-8", ["eval", *M, "--corpus", "text:{latin1}"], 1,
     "{latin1} is not UTF-8 text: byte 0xe9 at offset 13 (invalid continuation byte)"),
    ("eval", "binary corpus file", ["eval", *M, "--corpus", "text:{binary}"], 1,
     "{binary} is not UTF-8 text: byte 0x00 at offset 4 (a binary file?)"),
    ("eval", "unknown corpus", ["eval", *M, "--corpus", "nope"], 2, "unknown corpus 'nope'"),
    ("eval", "unknown split", ["eval", *M, "--split", "dev"], 2, "unknown split 'dev'"),
    ("eval", "unknown --bos", ["eval", *M, "--bos", "bogus"], 2, "unknown --bos 'bogus': use auto, on, off"),
    ("detect", "unknown --attribution", ["detect", *M, "--attribution", "magic"], 2, "unknown attribution 'magic'"),
    ("detect", "--calib-tokens 1", ["detect", *M, "--calib-tokens", "1"], 2, "--calib-tokens must be at least 2, got 1"),
    ("detect", "--max-candidates 0", ["detect", *M, "--max-candidates", "0"], 2, "--max-candidates must be at least 1, got 0"),
    ("detect", "--spike-ratio 0", ["detect", *M, "--spike-ratio", "0"], 2, "--spike-ratio must be positive, got 0"),
    ("sweep", "--weight with @SCALE", ["sweep", *M, "--weight", "1:5:7@2"], 2, "--weight takes LAYER:ROW:COL without @SCALE"),
    ("sweep", "bad --scales", ["sweep", *M, "--weight", "1:5:7", "--scales", "x"], 2, "invalid --scales 'x'"),
    ("sweep", "--spread -1", ["sweep", *M, "--weight", "1:5:7", "--spread", "-1"], 2, "--spread must be >= 0, got -1"),
    ("sweep", "--plot naming a directory", ["sweep", *M, "--weight", "1:5:7", "--plot", "{tmp}"], 2,
     "output path '{tmp}' is a directory"),
    ("repair", "unknown --optimizer", [*REPAIR, "--optimizer", "lion", "--out", "{tmp}/new"], 2,
     "invalid --optimizer 'lion': use lbfgs, adamw, adam, sgd"),
    ("repair", "--warmup with lbfgs", [*REPAIR, "--optimizer", "lbfgs", "--warmup", "5", "--out", "{tmp}/new"], 2,
     "--warmup applies to the first-order optimizers (adamw, adam, sgd), not lbfgs"),
    ("repair", "unknown --kl", [*REPAIR, "--kl", "sideways", "--out", "{tmp}/new"], 2,
     "invalid --kl 'sideways': use 'forward' or 'reverse'"),
    ("repair", "unknown --recipe", [*REPAIR, "--recipe", "magic", "--out", "{tmp}/new"], 2, "unknown recipe 'magic'"),
    ("repair", "--steps 0", [*REPAIR, "--steps", "0", "--out", "{tmp}/new"], 2, "--steps must be at least 1, got 0"),
    ("repair", "--seeds 0", [*REPAIR, "--seeds", "0", "--out", "{tmp}/new"], 2, "--seeds must be at least 1, got 0"),
    ("repair", "--checkpoint-every 0", [*REPAIR, "--checkpoint-every", "0", "--out", "{tmp}/new"], 2,
     "--checkpoint-every must be at least 1, got 0"),
    ("repair", "--seq-len past the model's context", [*REPAIR, "--seq-len", "1000", "--out", "{tmp}/new"], 2,
     f"--seq-len 1000 {CTX} --seq-len 512 or less"),
    ("repair", "an ablation that changes nothing", [*REPAIR[:4], "1:5:7@1", *REPAIR[5:], "--out", "{tmp}/new"], 2,
     "ablating 1:5:7@1 changes nothing"),
    ("repair", "corpus too short for one sequence", [*REPAIR, "--corpus", "text:{short}", "--out", "{tmp}/new"], 1, "need at least 32 tokens to pack one sequence"),
    ("repair", "--out naming a file", [*REPAIR, "--out", "{file}"], 2, "--out {file} is a file, not a run directory"),
    ("repair", "--out under a file", [*REPAIR, "--out", "{file}/run"], 2,
     "cannot write '{file}/run/config.json': '{file}' is a file, not a directory"),
    ("repair", "--out holding other files", [*REPAIR, "--out", "{others}"], 2,
     "{others} holds files but no config.json: not a run directory; choose another --out"),
    ("repair", "--out holding a run", [*REPAIR, "--out", "{run}"], 2,
     "{run} already holds a run: pass --resume to continue it, or choose another --out"),
    ("repair", "--resume with other settings", [*REPAIR, "--lr", "0.5", "--out", "{run}", "--resume"], 2,
     "--resume with other settings than {run}/config.json: config differ"),
    ("repair", "--resume on a finished run", [*REPAIR, "--out", "{run}", "--resume"], 0,
     "{run} is finished already (results.json): nothing to resume, nothing changed."),
    ("repair", "--resume, checkpoint that is not data", [*REPAIR, "--out", "{evil_ckpt}", "--resume"], 1,
     "{evil_ckpt}/checkpoints/last.pt holds objects other than tensors and plain data; refused"),
    ("repair", "--resume, truncated checkpoint", [*REPAIR, "--out", "{cut_ckpt}", "--resume"], 1,
     "{cut_ckpt}/checkpoints/last.pt is damaged ("),
    ("repair", "--resume, checkpoint missing keys", [*REPAIR, "--out", "{part_ckpt}", "--resume"], 1,
     "{part_ckpt}/checkpoints/last.pt is not a complete checkpoint: missing or malformed vectors, optimizer, rng"),
    ("repair", "--resume, damaged config.json", [*REPAIR, "--out", "{cut_config}", "--resume"], 1,
     "{cut_config}/config.json is not valid JSON"),
    ("repair", "--out in use by another process", [*REPAIR, "--out", "{busy_new}"], 1,
     "{busy_new} is in use by process"),
    ("repair", "--resume of a run in use", [*REPAIR, "--out", "{busy}", "--resume"], 1, "{busy} is in use by process"),
    ("apply", "no such patch", ["apply", "--patch", "/no/such", "--export", "{tmp}/m"], 1,
     "no such patch (run directory or patch.safetensors): /no/such"),
    ("apply", "--export exists", ["apply", "--patch", "{run}", "--export", "{tmp}"], 2, "--export {tmp} exists already"),
    ("apply", "--export is a dangling symlink", ["apply", "--patch", "{run}", "--export", "{dangling}"], 2,
     "--export {dangling} exists already"),
    ("apply", "truncated patch.safetensors", ["apply", "--patch", "{cut_patch}", "--export", "{tmp}/m"], 1,
     "{cut_patch}/patch.safetensors is damaged ("),
    ("apply", "truncated patch_config.json", ["apply", "--patch", "{cut_patch_config}", "--export", "{tmp}/m"], 1,
     "{cut_patch_config}/patch_config.json is not valid JSON"),
    ("apply", "patch_config.json without rows", ["apply", "--patch", "{rowless}", "--export", "{tmp}/m"], 1,
     "{rowless}/patch_config.json: rows: field required (not a patch config superweight can read"),
    ("apply", "a patch for another model", ["apply", "--patch", "{run}", "--export", "{tmp}/m", "--model", "{other}",
     *FP32], 1, "patch was trained on another model"),
    ("analyze", "no such run directory", ["analyze", "/no/such/run"], 2, "no such run directory: /no/such/run"),
    ("analyze", "a directory without results.json", ["analyze", "{tmp}"], 1, "no results.json in {tmp}"),
    ("analyze", "damaged results.json", ["analyze", "{cut_results}"], 1, "{cut_results}/results.json is not valid JSON"),
    ("analyze", "patch_config.json without rows", ["analyze", "{rowless}"], 1,
     "{rowless}/patch_config.json: rows: field required"),
    ("analyze", "--tokens 1", ["analyze", "{run}", "--tokens", "1"], 2, "--tokens must be at least 2"),
    ("analyze", "unknown --bos", ["analyze", "{run}", "--bos", "bogus"], 2, "unknown --bos 'bogus': use auto, on, off"),
    ("analyze", "a run directory in use", ["analyze", "{busy}"], 1, "{busy} is in use by process"),
    ("sparsify", "bad --l1", ["sparsify", "{run}", "--l1", "x"], 2, "invalid --l1 'x': expected comma-separated numbers"),
    ("sparsify", "no strengths", ["sparsify", "{run}", "--l1", "", "--l0", ""], 2, "no strengths given: set --l1 and/or --l0"),
    ("sparsify", "--tokens 1", ["sparsify", "{run}", "--tokens", "1"], 2, "--tokens must be at least 2, got 1"),
    ("sparsify", "truncated patch.safetensors", ["sparsify", "{cut_patch}"], 1, "{cut_patch}/patch.safetensors is damaged ("),
    ("sparsify", "a run directory in use", ["sparsify", "{busy}"], 1, "{busy} is in use by process"),
    ("report", "no such run directory", ["report", "/no/such/run"], 2, "no such run directory: /no/such/run"),
    ("report", "a directory without results.json", ["report", "{tmp}"], 1, "no results.json in {tmp}"),
    ("report", "results.json from a newer superweight", ["report", "{future}"], 1,
     "{future}/results.json has schema version 99, newer than this superweight reads"),
    ("report", "a run directory in use", ["report", "{busy}"], 1, "{busy} is in use by process"),
    ("compare", "no such run directory", ["compare", "/no/such/run"], 1, "no results.json in /no/such/run"),
    ("compare", "damaged results.json", ["compare", "{run}", "{cut_results}"], 1,
     "{cut_results}/results.json is not valid JSON"),
    ("compare", "--json naming a directory", ["compare", "{run}", "--json", "{tmp}"], 2, "output path '{tmp}' is a directory"),
    ("quantize", "--bits 9", ["quantize", *M, "--bits", "9"], 2, "invalid --bits '9': each must be an integer from 2 to 8"),
    ("quantize", "a block size that divides no matrix", ["quantize", *M, "--block", "64,7"], 2,
     "invalid --block 7: it divides none of the quantized matrices (16x32, 32x32, 32x64, 64x32)"),
    ("quantize", "unknown --clip method", ["quantize", *M, "--clip", "magic:1"], 2, "unknown --clip method 'magic'"),
    ("quantize", "malformed --keep coordinate", ["quantize", *M, "--keep", "11:507"], 2,
     "invalid --keep: invalid weight coordinate '11:507'"),
    ("quantize", "--levels nf at 8 bits", ["quantize", *M, "--levels", "nf", "--bits", "8"], 2,
     "--levels nf has tables for 3 and 4 bits only"),
    ("run", "unknown --recipe", ["run", *M, "--recipe", "nope"], 2, "unknown recipe 'nope'"),
    ("run", "bad --weight", ["run", *M, "--weight", "1:2"], 2, "invalid weight coordinate '1:2'"),
    ("run", "--seeds 0", ["run", *M, "--seeds", "0"], 2, "--seeds must be at least 1, got 0"),
    ("run", "--draws 0", ["run", *M, "--draws", "0"], 2, "--draws must be at least 1, got 0"),
    ("run", "--out holding a run", ["run", *M, "--out", "{run}"], 2, "{run} already exists: choose another --out"),
    ("run", "--out under a file", ["run", *M, "--out", "{file}/run"], 2,
     "cannot write '{file}/run/config.json': '{file}' is a file, not a directory"),
    ("run", "--out naming a file", ["run", *M, "--out", "{file}"], 2, "{file} already exists: choose another --out"),
    ("run", "--out in use by another process", ["run", *M, "--out", "{busy_new}"], 1, "{busy_new} is in use by process"),
    ("run", "--resume of a run in use", ["run", *M, "--out", "{busy}", "--resume"], 1, "{busy} is in use by process"),
]

# How docs/errors.md writes each placeholder.
DOC_NAMES = {"model": "MODEL", "other": "OTHER_MODEL", "tmp": "DIR", "others": "DIR", "busy_new": "DIR",
             "dangling": "LINK",
             **{k: "FILE" for k in ("file", "latin1", "binary", "short")},
             **{k: "RUN" for k in ("run", "evil_ckpt", "cut_ckpt", "part_ckpt", "cut_config", "cut_patch",
                                   "cut_patch_config", "rowless", "cut_results", "future", "busy")}}


class Evil:
    """Unpickling this would run a shell command (touch a file): a checkpoint must never be loaded this way."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def places(tiny_model_dir, tmp_path_factory):
    from conftest import hold_elsewhere
    from tiny import save_tiny_model_dir

    root = tmp_path_factory.mktemp("matrix")
    run = root / "run"
    args = [a.format(model=tiny_model_dir) for a in REPAIR]
    result = CliRunner().invoke(app, [*args, "--out", str(run)])
    assert result.exit_code == 0, result.output
    p = {"model": str(tiny_model_dir), "run": str(run), "tmp": str(root / "empty")}
    (root / "empty").mkdir()

    def copy(name, drop=()):
        target = root / name
        shutil.copytree(run, target)
        for f in drop:
            (target / f).unlink()
        p[name] = str(target)
        return target

    def cut(path: Path):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    cut(copy("cut_patch") / "patch.safetensors")
    cut(copy("cut_patch_config") / "patch_config.json")
    rowless = copy("rowless") / "patch_config.json"
    rowless.write_text(json.dumps({k: v for k, v in json.loads(rowless.read_text()).items() if k != "rows"}))
    (copy("cut_results") / "results.json").write_text("{ half")
    future = copy("future") / "results.json"
    future.write_text(json.dumps({**json.loads(future.read_text()), "schema_version": 99}))
    # Runs killed after training, before results.json: --resume reads the checkpoint.
    evil = copy("evil_ckpt", drop=["results.json"])
    torch.save({"step": 4, "payload": Evil(root / "SENTINEL")}, evil / "checkpoints" / "last.pt")
    cut(copy("cut_ckpt", drop=["results.json"]) / "checkpoints" / "last.pt")
    torch.save({"step": 4, "config": {}, "rows": [], "coords": []},
               copy("part_ckpt", drop=["results.json"]) / "checkpoints" / "last.pt")
    cut(copy("cut_config", drop=["results.json"]) / "config.json")
    others = root / "others"
    others.mkdir()
    (others / "notes.txt").write_text("mine")
    p["others"] = str(others)
    (root / "file").write_text("a file")
    p["file"] = str(root / "file")
    os.symlink(root / "nowhere", root / "dangling")
    p["dangling"] = str(root / "dangling")
    (root / "latin1.txt").write_bytes("Paragraph caf\xe9 text\n".encode("latin-1"))
    p["latin1"] = str(root / "latin1.txt")
    (root / "binary.bin").write_bytes(b"\x7fELF\x00\x01\x02 text")
    p["binary"] = str(root / "binary.bin")
    # One short paragraph in each split (paragraphs are split by crc32, io/corpora.py): 32 tokens cannot be packed.
    import zlib

    paragraphs = [f"Short paragraph {i}." for i in range(100)]
    in_eval = [q for q in paragraphs if zlib.crc32(q.encode()) % 10 == 0][:1]
    in_train = [q for q in paragraphs if zlib.crc32(q.encode()) % 10 != 0][:1]
    (root / "short.txt").write_text("\n\n".join(in_eval + in_train))
    p["short"] = str(root / "short.txt")
    p["other"] = str(save_tiny_model_dir(root / "other_model", family="llama", seed=1))
    p["sentinel"] = str(root / "SENTINEL")
    # Held by another process (as a running `repair` would): the finished run's copy and a new run's directory.
    copy("busy")
    p["busy_new"] = str(root / "busy_new")
    holder = hold_elsewhere(p["busy"], p["busy_new"])
    yield p
    holder.kill()
    holder.wait()


@pytest.mark.parametrize("command, what, args, code, message", ROWS, ids=[f"{r[0]}: {r[1]}" for r in ROWS])
def test_bad_input_is_one_line_and_changes_nothing(places, command, what, args, code, message):
    before = {name: _hashes(Path(places[name]))
              for name in ("run", "evil_ckpt", "cut_ckpt", "part_ckpt", "others", "busy", "busy_new")}
    result = CliRunner().invoke(app, [a.format(**places) for a in args])
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output and len(lines) == 1, result.stderr
    expected = message.format(**places)
    assert lines[0].startswith(expected if code == 0 else f"Error: {expected}"), (lines[0], expected)
    for name, hashes in before.items():
        assert _hashes(Path(places[name])) == hashes, f"{what} changed {name}"
    assert not Path(places["sentinel"]).exists()  # nothing in a checkpoint ran
    assert not Path(places["tmp"], "new").exists() and not any(Path(places["tmp"]).iterdir())


def doc_row(command: str, what: str, code: int, message: str) -> str:
    """The row of docs/errors.md's table for one matrix row."""
    text = message.format(**DOC_NAMES)
    return f"| `{command}` | {what} | `{text if code == 0 else 'Error: ' + text}` | {code} |"


def test_every_row_is_in_docs_errors_md():
    doc = DOCS.read_text(encoding="utf-8")
    missing = [doc_row(c, w, code, m) for c, w, _a, code, m in ROWS if doc_row(c, w, code, m) not in doc]
    assert not missing, "\n".join(missing)


def test_a_checkpoint_that_is_not_data_is_refused_in_the_library_too(tmp_path):
    from superweight.errors import SuperweightError
    from superweight.io import checkpoint

    (tmp_path / "checkpoints").mkdir()
    torch.save({"step": 1, "x": Evil(tmp_path / "ran")}, tmp_path / "checkpoints" / "last.pt")
    with pytest.raises(SuperweightError, match="holds objects other than tensors"):
        checkpoint.load(tmp_path)
    assert not (tmp_path / "ran").exists()


def test_a_run_stopped_before_its_first_checkpoint_restarts_or_resumes(places, tmp_path):
    args = [a.format(**places) for a in REPAIR]
    stopped = tmp_path / "stopped"
    stopped.mkdir()
    (stopped / "config.json").write_text(Path(places["run"], "config.json").read_text())
    (stopped / "train_log.jsonl").write_text('{"step": 1, "loss": 1.0, "lr": 0.1, "seconds": 0.5}\n{"step": 2, "lo')
    for extra in (["--resume"], []):  # resumed from step 0, then (a finished run) refused without --resume
        result = CliRunner().invoke(app, [*args, "--out", str(stopped), *extra])
        assert result.exit_code == (0 if extra else 2), result.output
    want = Path(places["run"], "patch.safetensors").read_bytes()
    assert Path(stopped, "patch.safetensors").read_bytes() == want
    restarted = tmp_path / "restarted"
    restarted.mkdir()
    (restarted / "config.json").write_text("{}")  # other settings: a fresh run may start over it
    result = CliRunner().invoke(app, [*args, "--out", str(restarted)])
    assert result.exit_code == 0, result.output
    assert Path(restarted, "patch.safetensors").read_bytes() == want
    record = json.loads(Path(restarted, "results.json").read_text())
    assert record["training"]["resumed_from"] is None and record["training"]["seconds"] > 0


def test_a_killed_run_continues_with_resume(planted_dir, tmp_path, monkeypatch):
    import superweight.stages.analyze as analyze

    out = tmp_path / "run"
    args = ["run", "--model", str(planted_dir), "--weight", "1:5:7", "--steps", "4", "--eval-tokens", "128",
            "--analysis-tokens", "128", "--no-baselines", "--out", str(out), *FP32]

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt  # stops the process after the repair, as a kill would

    with monkeypatch.context() as m:
        m.setattr(analyze, "run_analyze", interrupted)
        assert CliRunner().invoke(app, args).exit_code == 130
    patch = (out / "patch.safetensors").read_bytes()
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and "a killed `run` continues with --resume" in refused.stderr
    result = CliRunner().invoke(app, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert (out / "report.html").is_file() and (out / "patch.safetensors").read_bytes() == patch
    assert json.loads((out / "results.json").read_text())["timings"]["report"] >= 0
    again = CliRunner().invoke(app, [*args, "--resume"])
    assert again.exit_code == 0 and "finished already" in again.stderr


def test_json_is_strict_a_nan_is_null_and_named(tmp_path, caplog):
    from superweight.io.files import write_json
    from superweight.schema.record import Metrics
    from superweight.measure.recovery import recovery

    write_json(tmp_path / "x.json", {"a": [1.0, float("nan")], "b": {"c": float("inf")}})
    text = (tmp_path / "x.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"a": [1.0, None], "b": {"c": None}}
    assert "a[1] (nan), b.c (inf) not finite, written as null" in caplog.text
    same = Metrics(nll=2.0, ppl=7.39, kl=0.0, top1_agree=1.0, n_tokens=10)
    assert recovery(same, same, same).model_dump() == {"nll_gap": None, "kl": None}  # no damage: null, not NaN
