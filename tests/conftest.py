"""Shared fixtures: tiny offline models (see tiny.py) and a hub-free environment."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# `import tiny` from any test module, whatever the rootdir or import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Set before transformers / huggingface_hub are imported (they read these once, at import time).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import save_tiny_model_dir  # noqa: E402


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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A local model directory (tiny llama + tiny tokenizer) that `superweight.models.load` accepts."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny_llama"), family="llama", seed=0)


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
