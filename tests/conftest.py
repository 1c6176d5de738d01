"""Shared fixtures: tiny offline models (see tiny.py) and a hub-free environment."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# `import tiny` from any test module, whatever the rootdir or import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Set before transformers / huggingface_hub are imported (they read these once, at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Nothing about the machine or the shell may change a result (tests/test_hermetic.py checks it): set here, before any
# library is imported and before any session fixture runs (a session fixture runs before a function one's monkeypatch).
# - `--dtype auto` picks bf16 on CPUs with avx512_bf16 and fp32 elsewhere: every test gets fp32, whatever
#   SUPERWEIGHT_AUTO_DTYPE says outside (tests/test_dtype_devices.py sets it to test the choice itself).
AUTO_DTYPE = "SUPERWEIGHT_AUTO_DTYPE"
os.environ[AUTO_DTYPE] = "fp32"
# - a home of its own: matplotlib's, Jupyter's, Hugging Face's and superweight's caches never read the user's.
_HOME = tempfile.mkdtemp(prefix="superweight-tests-home-")
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["HOME"] = _HOME
for _name in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "MPLCONFIGDIR", "JUPYTER_CONFIG_DIR",
              "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "HF_DATASETS_CACHE", "TORCH_HOME"):
    os.environ.pop(_name, None)
os.environ["HF_HOME"] = os.path.join(_HOME, "hf")
# - a terminal width and a text encoding that do not come from the shell (rich and typer read COLUMNS when they
#   make a console); the CLI's own lines do not wrap at any width (test_hermetic.py runs it at 40 and 250 columns).
os.environ["COLUMNS"] = "120"
for _name in ("TERMINAL_WIDTH", "LINES", "FORCE_COLOR", "NO_COLOR"):
    os.environ.pop(_name, None)
os.environ["PYTHONUTF8"] = "1"
# - `make test` runs two pytest-xdist workers on two cores: each computes on one core (set before torch loads), so
#   the workers do not fight over OpenMP threads; tests that share an expensive session fixture (the real models,
#   the tiny CLI runs) run on one worker, which makes the fixture once (pytest_collection_modifyitems below).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"

from tiny import save_tiny_model_dir  # noqa: E402

# Session fixtures worth making once per run: the tests that use one share an xdist group (`--dist loadgroup`).
SHARED = ("smol", "gemma", "pipeline_run", "repair_runs")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items):
    for item in items:
        shared = [name for name in SHARED if name in getattr(item, "fixturenames", ())]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))


@pytest.fixture(scope="session", autouse=True)
def _superweight_cache(tmp_path_factory):
    """Converted-model cache in a temp dir, set before any session fixture loads a model."""
    previous = os.environ.get("SUPERWEIGHT_CACHE")
    os.environ["SUPERWEIGHT_CACHE"] = str(tmp_path_factory.mktemp("superweight_cache"))
    yield
    if previous is None:
        os.environ.pop("SUPERWEIGHT_CACHE", None)
    else:
        os.environ["SUPERWEIGHT_CACHE"] = previous


@pytest.fixture(scope="session")
def _hf_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_home")


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, _hf_home):
    """No test may reach the hub or read/write the user's cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(_hf_home))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv(AUTO_DTYPE, "fp32")  # again for each test: one that changed it (monkeypatch) gets it back


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local model directory (tiny llama + tiny tokenizer) that `superweight.models.load` accepts."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), family="llama", seed=0)


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M-Instruct in fp32, loaded once per pytest run for every test that needs the real
    model (the first load parses the GGUF into the session's empty cache: test_e2e.py checks the second comes from
    it). Tests undo what they do to it (every intervention restores the model exactly)."""
    from superweight.io import models

    return models.load("smollm2-135m", dtype="fp32")


@pytest.fixture(scope="module")
def tok():
    """The tiny offline tokenizer (tiny.py)."""
    from tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def calib(tok):
    """1,024 tokens of the pydoc train split: detection's calibration text on the tiny models."""
    from superweight.io import corpora

    return corpora.tokenize(tok, corpora.load_text("pydoc", "train"), 1024)


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a module's tiny-model tests on one intra-op thread, then restore the previous setting.

    Tiny models do microsecond-sized ops; with several OpenMP threads each op pays a thread barrier, which
    on a busy 2-core machine costs milliseconds (measured: a 4x64x8 matmul 8 ms on 2 threads vs 0.02 ms on 1).
    Use it with `pytestmark = pytest.mark.usefixtures("torch_single_thread")`.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------- real run directories, made once per session
# Written by the CLI on a planted tiny llama (super weight 1:5:7), so the report, compare and record tests read
# what the stages really write (tests/test_roundtrip.py, tests/test_report.py, tests/test_cli_run.py).
PLANT = (1, 5, 7)
SMALL_REPAIR = ["--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-tokens", "256"]


def invoke_cli(*args):
    from typer.testing import CliRunner

    from superweight.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, (args, result.output, result.exception)
    return result


@pytest.fixture(scope="session")
def planted_dir(tmp_path_factory) -> Path:
    from superweight.io.models import save_model_dir
    from tiny import planted, tiny_tokenizer

    path = tmp_path_factory.mktemp("planted") / "model"
    save_model_dir(planted(PLANT), tiny_tokenizer(), path)
    return path


@pytest.fixture(scope="session")
def pipeline_run(planted_dir, tmp_path_factory) -> tuple[Path, object]:
    """`superweight run` with detection, baselines, two seeds and sparse training: every part of the record."""
    import torch

    out = tmp_path_factory.mktemp("runs") / "full"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = invoke_cli("run", "--model", planted_dir, "--steps", "6", "--eval-tokens", "256",
                            "--analysis-tokens", "256", "--seeds", "2", "--sparse", "--out", out)
    finally:
        torch.set_num_threads(threads)
    return out, result


@pytest.fixture(scope="session")
def repair_runs(planted_dir, tmp_path_factory) -> dict[str, tuple[Path, list]]:
    """Run directories made by `repair` (then `analyze` / `sparsify` where noted), with each command's output:
    one_row (baselines, 2 seeds, analysed, sparsified), two_rows (--patch-row 1:5 and 1:9, analysed,
    sparsified), two_weights (1:5:7 and 1:9:3 ablated, each row patched; repair only), minimal (repair only)."""
    import torch

    root = tmp_path_factory.mktemp("repairs")
    plans = {
        "one_row": (["--weight", "1:5:7", "--baselines", "--seeds", "2"], True),
        "two_rows": (["--weight", "1:5:7", "--patch-row", "1:5", "--patch-row", "1:9"], True),
        "two_weights": (["--weight", "1:5:7", "--weight", "1:9:3"], False),
        "minimal": (["--weight", "1:5:7"], False),
    }
    runs = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name, (args, study) in plans.items():
            out = root / name
            outputs = [invoke_cli("repair", "--model", planted_dir, *args, *SMALL_REPAIR, "--out", out).output]
            if study:
                outputs.append(invoke_cli("analyze", out, "--tokens", "256", "--draws", "1").output)
                outputs.append(invoke_cli("sparsify", out, "--l1", "0.5", "--l0", "10", "--steps", "2",
                                          "--tokens", "256").output)
            runs[name] = (out, outputs)
    finally:
        torch.set_num_threads(threads)
    return runs


# ---------------------------------------------------------------- another process that holds run directories
_HOLD = """
import contextlib, sys
from superweight.io.rundir import RunDir
with contextlib.ExitStack() as stack:
    for d in sys.argv[1:]:
        stack.enter_context(RunDir(d).lock("repair"))
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin or kills this process
"""


def hold_elsewhere(*run_dirs):
    """A separate process that holds the writer lock of each run directory (as `superweight repair` would) until it
    is killed or its stdin is closed; returns the Popen once every lock is held."""
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", _HOLD, *map(str, run_dirs)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if line != "held":
        proc.kill()
        raise RuntimeError(f"the holder did not take the locks: {line!r}")
    return proc
